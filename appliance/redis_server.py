"""Render our redis.conf and run redis-server from PATH (for `appliance up` and the tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

import redis

from appliance.config import Settings

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_template(name: str, values: dict[str, object]) -> str:
    """Fill {{ name }} placeholders of a packaged template; every placeholder must be given."""
    text = resources.files("appliance").joinpath("templates", name).read_text()

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template {name} needs a value for {key!r}")
        return str(values[key])

    return _PLACEHOLDER.sub(sub, text)


def render_redis_conf(settings: Settings, bind: str = "127.0.0.1 -::1") -> str:
    if not settings.redis_password:
        raise ValueError("APPLIANCE_REDIS_PASSWORD must be set: our redis.conf requires a password")
    return render_template(
        "redis.conf",
        {
            "bind": bind,
            "port": settings.redis_port,
            "password": settings.redis_password,
            "dir": Path(settings.redis_dir).resolve(),
            "maxmemory": settings.redis_maxmemory,
        },
    )


def start_redis(settings: Settings, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """Start redis-server with our config under settings.redis_dir; wait until it answers PING."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError(
            "redis-server is not on PATH: `apt-get install redis-server` (make run does this)"
        )
    directory = Path(settings.redis_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "redis.conf"
    conf.write_text(render_redis_conf(settings))
    conf.chmod(0o600)  # it holds the password
    log = open(directory / "redis.log", "ab")  # noqa: SIM115 - owned by the child
    # Its own session: a terminal's Ctrl-C reaches only whoever started it, which stops it in
    # turn (SIGTERM: Redis saves and exits), never mid-save.
    proc = subprocess.Popen(
        [exe, str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    client = redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_password
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {proc.returncode}; see {directory}/redis.log"
            )
        try:
            if client.ping():
                break
        except redis.exceptions.BusyLoadingError:
            pass
        except redis.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("redis-server did not answer PING in time")
        time.sleep(0.02)
    client.close()
    return proc
