"""`appliance up --replay`: the whole stack as real processes, as `make run` starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
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


def processes_marked(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds `marker` (inherited by every child)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes() and not _is_zombie(
                int(entry.name)
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _up(settings_env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    """`appliance up --replay` as a shell starts a foreground job: leader of its own process
    group, so a terminal's Ctrl-C is SIGINT to that whole group."""
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "up", "--replay", "--replay-speed", "max",
         "--replay-events", "3000", "--batch-interval", "1", *extra],
        env=settings_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
    )  # fmt: skip


def _collect(proc: subprocess.Popen[bytes]) -> list[str]:
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.decode(errors="replace").rstrip("\n") for line in proc.stdout)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _ctrl_c(proc: subprocess.Popen[bytes], lines: list[str]) -> int:
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError("appliance up did not stop:\n" + "\n".join(lines[-40:])) from None


def test_ctrl_c_stops_every_child_in_order_and_an_immediate_restart_works(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_port=free_port())
    marker = f"FRONTDOOR_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, **to_environ(settings), "FRONTDOOR_TEST_RUN": marker.split("=")[1]}
    env.pop("APPLIANCE_REDIS_PASSWORD")
    api = f"http://127.0.0.1:{settings.api_port}"
    proc = _up(env)
    lines = _collect(proc)
    try:
        wait_until(
            lambda: _get_json(f"{api}/v1/search?q={COMMON_WORD}")["posts"],
            120,
            "posts from /v1/search",
            interval=0.5,
            errors=(OSError, ValueError),
        )
        _get_json(f"{api}/v1/stats")
    except AssertionError:
        print("\n".join(lines[-60:]))
        raise
    finally:
        code = _ctrl_c(proc, lines)
    out = "\n".join(lines)
    assert code == 0, out[-3000:]
    assert "Shutdown interrupted" not in out and "Killing" not in out, out[-3000:]
    assert lines[-1] == "appliance up: stopped", out[-3000:]
    # Each service says it stopped cleanly, and the supervisor saw each exit with status 0,
    # newest first: identity worker, API, batcher, ingester, replay server, Redis.
    assert any("appliance.ingest" in line and ": stopped" in line for line in lines), out
    assert any("batcher stopped" in line for line in lines), out
    assert any("API stopped" in line for line in lines), out
    assert any("identity worker stopped" in line for line in lines), out
    stops = [line for line in lines if "appliance.up: stopped" in line]
    assert [line.split("child=")[1].split()[0] for line in stops] == [
        "identity", "api", "batcher", "ingester", "replay-server", "redis-server"
    ], out  # fmt: skip
    assert all("code=0" in line for line in stops), out
    # Redis saved and exited (no half-written RDB), the API removed its metrics folder.
    assert "ready to exit" in (tmp_path / "redis" / "redis.log").read_text()
    assert not list((tmp_path / "redis").glob("temp-*.rdb"))
    metrics_dirs = [
        line.split("metrics_dir=")[1].split()[0] for line in lines if "metrics_dir=" in line
    ]
    assert metrics_dirs and not any(Path(d).exists() for d in metrics_dirs)
    assert processes_marked(marker) == []  # no child, and no child's child, outlives the stop

    # Straight away, on the same ports (the API's are in TIME-WAIT): it starts and serves again.
    again = _up(env)
    lines = _collect(again)
    try:
        found = wait_until(
            lambda: _get_json(f"{api}/v1/search?q={COMMON_WORD}")["posts"],
            60,
            "posts from the restarted appliance",
            interval=0.5,
            errors=(OSError, ValueError),
        )
        assert found
    except AssertionError:
        print("\n".join(lines[-60:]))
        raise
    finally:
        code = _ctrl_c(again, lines)
    assert code == 0 and lines[-1] == "appliance up: stopped", "\n".join(lines[-40:])
    assert processes_marked(marker) == []

    # Another data dir on the same Redis state (its cursor, its unbatched entries): refused, and
    # nothing is left running.
    other = {**env, "APPLIANCE_DATA_DIR": str(tmp_path / "other-data")}
    refused = _up(other)
    lines = _collect(refused)
    assert refused.wait(60) == 2, "\n".join(lines[-40:])
    out = "\n".join(lines)
    assert "belongs to another run" in out and str(tmp_path / "data") in out
    assert "--redis-dir" in out
    assert not (tmp_path / "other-data").exists() or not any((tmp_path / "other-data").iterdir())
