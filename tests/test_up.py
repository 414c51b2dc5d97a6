"""`appliance up --replay`: the whole stack as real processes, as `make run` starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from appliance.config import to_environ
from loadtest.firehose import COMMON_WORD
from tests.conftest import free_port, make_settings, stop_process
from tests.helpers import children_of, wait_until

pytestmark = pytest.mark.slow


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_up_with_replay_serves_posts_restarts_children_and_stops_cleanly(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_port=free_port())
    env = {**os.environ, **to_environ(settings)}
    env.pop("APPLIANCE_REDIS_PASSWORD")  # `up` generates one, as on a fresh machine
    api = f"http://127.0.0.1:{settings.api_port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "up",
            "--replay",
            "--replay-speed",
            "max",
            "--replay-events",
            "30000",
            "--batch-interval",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[bytes] = []
    try:
        assert proc.stdout is not None
        banner = b"".join(proc.stdout.readline() for _ in range(7)).decode()
        assert "starting redis-server, ingester, batcher, API and identity worker" in banner
        assert f"{api}/v1/search" in banner and f"{api}/docs" in banner
        # Keep the rest of the output (for a failure message) without ever blocking the children.
        threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()

        try:
            wait_until(
                lambda: _get_json(f"{api}/v1/search?q={COMMON_WORD}")["posts"],
                120,
                "posts from /v1/search",
                interval=0.5,
                errors=(OSError, ValueError),
            )
        except AssertionError:
            print(b"".join(output[-60:]).decode(errors="replace"))
            raise

        before = children_of(proc.pid)
        assert {"redis", "replay", "ingest", "batch", "serve", "identity"} <= set(before)
        os.kill(before["batch"], signal.SIGKILL)
        wait_until(
            lambda: children_of(proc.pid).get("batch") not in (None, before["batch"]),
            30,
            "the batcher to be restarted",
            interval=0.5,
            errors=(OSError, ValueError),
        )
    finally:
        try:
            kids = children_of(proc.pid) if proc.poll() is None else {}
        finally:
            stop_process(proc, timeout=60)
    assert proc.returncode == 0
    for name, pid in kids.items():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"{name} still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
