"""A newcomer who reads only README.md: its marked shell blocks, run as written (only the API port
differs, so the test never collides with an appliance already running here) against a replay."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.helpers import spawn_in_group, wait_until

pytestmark = pytest.mark.slow

_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```sh\n(.*?)```", re.S)
README_PORT = "127.0.0.1:8080"


def readme_blocks() -> list[tuple[str, str]]:
    return _BLOCK.findall((REPO_ROOT / "README.md").read_text())


def test_the_readme_marks_a_start_a_search_and_an_export() -> None:
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds.count("start") == 1 and "search" in kinds and "export" in kinds
    start = next(body for kind, body in readme_blocks() if kind == "start")
    assert start.strip().startswith("make run")


def test_following_the_readme_runs_searches_and_exports(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "APPLIANCE_API_PORT": str(port),
        "APPLIANCE_REDIS_PORT": str(free_port()),
        "APPLIANCE_INGEST_PORT": str(free_port()),
        "APPLIANCE_BATCH_PORT": str(free_port()),
        "APPLIANCE_DATA_DIR": str(tmp_path / "data"),
        "APPLIANCE_REDIS_DIR": str(tmp_path / "redis"),
        "APPLIANCE_IDENTITY_PORT": str(free_port()),
        # The identity worker resolves handles on the internet; here nothing answers (loopback).
        "APPLIANCE_PLC_URL": "http://127.0.0.1:9",
        "APPLIANCE_IDENTITY_WEB_ORIGIN": "http://127.0.0.1:9",
        "APPLIANCE_IDENTITY_DNS": "127.0.0.1:9",
        "APPLIANCE_LOG_FORMAT": "text",
    }
    env.pop("APPLIANCE_REDIS_PASSWORD", None)
    blocks = readme_blocks()
    start = next(body for kind, body in blocks if kind == "start")
    # As a terminal runs it: the foreground job, leader of its own process group.
    proc, lines = spawn_in_group(["bash", "-c", start], env, cwd=REPO_ROOT)
    api = f"http://127.0.0.1:{port}"

    def posts() -> object:
        with urllib.request.urlopen(f"{api}/v1/search?q=lighthouse", timeout=10) as resp:
            return json.loads(resp.read())["posts"]

    try:
        wait_until(posts, 180, "the first posts", interval=1, errors=(OSError, ValueError))
        for kind, body in blocks:
            if kind == "start":
                continue
            result = subprocess.run(
                [
                    "bash",
                    "-e",
                    "-o",
                    "pipefail",
                    "-c",
                    body.replace(README_PORT, f"127.0.0.1:{port}"),
                ],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, f"{body}\n{result.stdout}\n{result.stderr}"
            if kind == "search":
                assert json.loads(result.stdout)["posts"], body
            else:
                assert result.stdout.startswith("# export complete: rows="), result.stdout
                (exported,) = tmp_path.glob("posts-*.csv")
                assert exported.read_text().startswith("uri,did,")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert any("appliance up: stopped" in line for line in lines), "".join(lines[-40:])
