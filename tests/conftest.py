"""Shared fixtures: real processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
