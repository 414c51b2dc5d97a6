"""Shared fixtures: real processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings, load_settings
from appliance.redis_server import start_redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10
) -> None:
    """Stop a child we started, by its PID; escalate to SIGKILL."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


class RedisProcess:
    """A real redis-server with our redis.conf; can be killed -9 and restarted on the same port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc = start_redis(settings)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        self.proc = start_redis(self.settings)

    def stop(self) -> None:
        stop_process(self.proc)


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test: everything under tmp_path, a random Redis password, free ports."""
    values: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "redis_dir": str(tmp_path / "redis"),
        "redis_port": free_port(),
        "redis_password": secrets.token_hex(16),
        "ingest_port": free_port(),
        "batch_port": free_port(),
        "api_port": free_port(),
        "log_format": "text",
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def redis_proc(settings: Settings) -> Iterator[RedisProcess]:
    server = RedisProcess(settings)
    yield server
    server.stop()


# --- the Jetstream replay server (loadtest serve) ------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerHandle:
    """A running `loadtest serve` subprocess: `url` (ws://127.0.0.1:PORT/subscribe), `port`,
    `proc`, `log_path` (its stderr), `stop()` (SIGTERM by PID, then SIGKILL) and `kill9()`."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        self.proc = proc
        self.log_path = log_path

    def stop(self) -> None:
        stop_process(self.proc)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_jetstream_server(
    log_dir: Path,
    *,
    events: int | None = 1000,
    seed: int = 1,
    speed: str | float = "max",
    files: list[str | Path] | None = None,
    timeout: float = 60.0,
    **options: object,
) -> ServerHandle:
    """Start `python -m loadtest serve --port 0 ...` and wait for its "listening" line.

    `files` serves recorded JSON-lines files instead of the generator. Every other keyword is a
    `loadtest serve` flag with underscores for dashes: a list becomes "1,2,3", True a bare flag,
    None/False is left out. E.g. drop_at=[500], stall_at=[200], stall_seconds=3, bad_at=[10, 20],
    preload=True, per_day=86_400, start="2026-07-01T00:00:00Z", malformed=0.01, oversized=0.001.
    """
    cmd = [sys.executable, "-m", "loadtest", "serve", "--port", "0", "--speed", str(speed)]
    if files:
        cmd += ["--from", *(str(f) for f in files)]
    else:
        cmd += ["--events", str(events), "--seed", str(seed)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            cmd.append(flag)
        elif isinstance(value, list | tuple | set | frozenset):
            cmd += [flag, ",".join(str(v) for v in value)]
        else:
            cmd += [flag, str(value)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"jetstream-server-{secrets.token_hex(4)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            stop_process(proc)
            raise TimeoutError(f"loadtest serve not listening after {timeout} s: {cmd}")
        chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            raise RuntimeError(f"loadtest serve exited: {log_path.read_text()[-2000:]}")
        line += chunk
    if not line.startswith(b"listening ws://"):
        stop_process(proc)
        raise RuntimeError(f"unexpected first line from loadtest serve: {line!r}")
    return ServerHandle(line.split()[1].decode(), proc, log_path)


@pytest.fixture
def jetstream_server(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """Factory fixture: `start(events=1000, seed=1, speed="max", files=None, **flags)` runs our
    Jetstream replay server (`loadtest serve`) as a subprocess on a free loopback port and
    returns a ServerHandle (url, port, proc, stop(), kill9()). Every server started is stopped
    by PID at teardown. See `start_jetstream_server` for the flags, and
    loadtest/jetstream_server.py for the protocol and the drop/stall/bad-frame hooks.

        def test_x(jetstream_server):
            server = jetstream_server(events=5000, seed=7, drop_at=[1000])
            ... connect to server.url ...
    """
    handles: list[ServerHandle] = []

    def start(**kwargs: Any) -> ServerHandle:
        handle = start_jetstream_server(tmp_path / "jetstream", **kwargs)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()
