"""Shared fixtures: real processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings, load_settings
from appliance.redis_server import start_redis
from loadtest.bench import free_port


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
        # Identity lookups stay on loopback: nothing listens on the discard port, so a handle
        # nobody knows fails fast as "unavailable" (tests of resolution start their own fakes).
        "plc_url": "http://127.0.0.1:9",
        "identity_web_origin": "http://127.0.0.1:9",
        "identity_dns": ("127.0.0.1:9",),
        "identity_port": free_port(),
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


# --- hand-made Parquet datasets (query engine and API tests) --------------------------------

T0_US = 1_780_272_000_000_000  # 2026-06-01T00:00:00Z
_TID_CHARS = "234567abcdefghijklmnopqrstuvwxyz"


def _utc(micros: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(micros / 1e6, tz=UTC)


def tid(micros: int, clock: int = 0) -> str:
    """An atproto TID for a timestamp: 13 base32-sortable chars, string order = time order."""
    value = (micros << 10) | (clock & 1023)
    return "".join(_TID_CHARS[(value >> (5 * i)) & 31] for i in range(12, -1, -1))


class ParquetData:
    """Rows we choose, written as live Parquet files the way the batcher does it.

    `post()`, `delete()` and `identity()` queue rows; `flush()` writes each table's rows of a day
    to one new file with the batcher's `write_file` and registers them with its `publish`.
    Every test therefore knows exactly which rows exist and what a query must return.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.flushes = 0
        self._clock = 0

    def post(
        self,
        text: str | None,
        *,
        t: int,
        did: str = "did:plc:alice",
        rkey: str | None = None,
        rev: str | None = None,
        operation: str = "create",
        **fields: Any,
    ) -> dict[str, Any]:
        """Queue a posts row (a create unless `operation="update"`); returns the row."""
        self._clock += 1
        rkey = rkey or tid(t, self._clock)
        row: dict[str, Any] = {
            "uri": f"at://{did}/app.bsky.feed.post/{rkey}",
            "did": did,
            "rkey": rkey,
            "rev": rev or tid(t, self._clock),
            "cid": f"bafyrei{self._clock:052d}",
            "operation": operation,
            "time_us": t,
            "created_at": _utc(t),
            "text": text,
            "langs": None,
            "reply_root": None,
            "reply_parent": None,
            "quote_uri": None,
            "embed_kind": None,
            "external_uri": None,
            "mentions": None,
            "links": None,
            "tags": None,
        }
        unknown = set(fields) - set(row)
        assert not unknown, f"not a posts column: {unknown}"
        row.update(fields)
        self.pending.setdefault("posts", []).append(row)
        return row

    def delete(self, uri: str, *, t: int, rev: str | None = None) -> dict[str, Any]:
        """Queue a deletes row for `uri` (rev defaults to a TID of t: later than older revs).

        The row stores the uri's parts (did, collection, rkey); readers derive the uri again.
        """
        self._clock += 1
        did, collection, rkey = uri.removeprefix("at://").split("/")
        row = {
            "uri": uri,
            "did": did,
            "collection": collection,
            "rkey": rkey,
            "rev": rev or tid(t, self._clock),
            "time_us": t,
        }
        self.pending.setdefault("deletes", []).append(row)
        return row

    def identity(self, did: str, handle: str | None, *, t: int) -> None:
        self._clock += 1
        self.pending.setdefault("identities", []).append(
            {
                "did": did,
                "seq": self._clock,
                "time_us": t,
                "time": _utc(t),
                "handle": handle,
            }
        )

    def flush(self) -> list[str]:
        """Write the queued rows (one file per table and day) and publish them in the manifest,
        through the batcher's own file writer and manifest update (`batch.files`)."""
        import pyarrow as pa

        from appliance.batch.files import publish, split_days, write_file
        from appliance.store import layout

        self.flushes += 1
        written: dict[str, list[str]] = {}
        for table, rows in self.pending.items():
            rows.sort(key=lambda r: r["time_us"])
            arrow = pa.Table.from_pylist(rows, schema=layout.SCHEMAS[table])
            for day, part in split_days(arrow).items():
                name = f"test-{self.flushes:04d}"
                path = write_file(self.data_dir, table, day, name, part, zstd_level=3)
                written.setdefault(table, []).append(str(path.relative_to(self.data_dir)))
        self.pending = {}
        events = sum(map(len, written.values()))
        publish(self.data_dir, written, {"time": time.time(), "events": events})
        return [p for paths in written.values() for p in paths]


@pytest.fixture
def parquet_data(settings: Settings) -> ParquetData:
    """An empty data root to fill with `post()`/`delete()`/`identity()` + `flush()`."""
    return ParquetData(Path(settings.data_dir))
