"""Helpers shared by the test modules (fixtures live in conftest.py): one polling helper,
Jetstream frames, the stream and the batcher, stored rows, the ingester and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import jinja2
import pyarrow.parquet as pq
import redis
from prometheus_client.parser import text_string_to_metric_families

from appliance import buffer, metrics
from appliance.batch import batcher as batch_mod
from appliance.config import Settings, to_environ
from appliance.query.engine import QueryEngine
from appliance.query.model import Filters
from appliance.store import layout
from appliance.store.manifest import read_manifest
from loadtest.firehose import GroundTruth, KeyDigest
from tests.conftest import REPO_ROOT

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    errors: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `condition` until it returns something true, and return that; fail after `timeout`
    seconds naming `what`. Exceptions of the `errors` types count as "not yet" (e.g. OSError
    while a server is still starting); the last one is shown on failure."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except errors as exc:
            last = exc
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last!r})" if last is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{suffix}")
        time.sleep(interval)


def spawn_in_group(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start `args` as a terminal runs its foreground job (leader of its own process group), with
    its output (stdout and stderr) collected line by line into the returned list as it comes."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0
    )
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(
        target=lambda: lines.extend(line.decode(errors="replace") for line in stdout), daemon=True
    ).start()
    return proc, lines


def metric_values(text: str) -> dict[str, float]:
    """Prometheus exposition text as {series: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


DID = "did:plc:" + "a" * 24


T0 = 1_783_175_888_000_000  # 2026-07-04T14:38:08Z


CID = "bafyrei" + "c" * 52


def commit(
    record: dict[str, Any] | None,
    *,
    collection: str = "app.bsky.feed.post",
    rkey: str = "3mptbyoeyc22k",
    rev: str = "3mptbypcq372f",
    did: str = DID,
    time_us: int = T0,
    operation: str = "create",
) -> bytes:
    """A Jetstream commit frame."""
    body: dict[str, Any] = {"rev": rev, "operation": operation, "collection": collection}
    body["rkey"] = rkey
    if record is not None:
        body["record"] = record
        body["cid"] = CID
    frame = {"did": did, "time_us": time_us, "kind": "commit", "commit": body}
    return json.dumps(frame).encode()


def sync_client(settings: Settings) -> redis.Redis:
    return redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_password
    )


def push(settings: Settings, frames: Sequence[bytes], per_entry: int = 100) -> list[str]:
    """XADD the frames as stream entries of `per_entry` frames; return the entry ids."""
    client = sync_client(settings)
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(frames), per_entry):
        pipe.xadd(settings.stream_key, buffer.pack(frames[i : i + per_entry]))  # type: ignore[arg-type]
    ids = [i.decode() for i in pipe.execute()]
    client.close()
    return ids


def truth_of(frames: Sequence[bytes]) -> GroundTruth:
    truth = GroundTruth()
    for frame in frames:
        truth.add(frame)
    return truth


def live_files(data_dir: str | Path, table: str | None = None) -> list[Path]:
    m = read_manifest(data_dir)
    tables = [table] if table else list(m.files)
    return [Path(data_dir) / p for t in tables for p in m.files.get(t, [])]


def stored_digests(data_dir: str | Path) -> dict[str, dict[str, KeyDigest]]:
    """Per table and day: count and digest of the natural keys in the live files.

    Also checks that every row sits in the partition of its time_us and no key is stored twice.
    """
    out: dict[str, dict[str, KeyDigest]] = {}
    for table in layout.TABLES:
        seen: set[tuple[str, ...]] = set()
        for path in live_files(data_dir, table):
            day = path.parent.name.removeprefix("date=")
            columns = [*layout.KEY_COLUMNS[table], "time_us"]
            rows = pq.read_table(path, columns=columns).to_pydict()
            assert {layout.day_of(t) for t in rows["time_us"]} <= {day}, path
            digest = out.setdefault(table, {}).setdefault(day, KeyDigest())
            for key in layout.stored_keys(table, rows):
                assert key not in seen, f"{table} {key} stored twice"
                seen.add(key)
                digest.add(key)
    return {t: d for t, d in out.items() if d}


def assert_stored_equals(data_dir: str | Path, truth: GroundTruth) -> None:
    expected = {t: dict(days) for t, days in truth.tables.items() if days}
    assert stored_digests(data_dir) == expected


def assert_all_parquet_files_open(data_dir: str | Path) -> None:
    for path in Path(data_dir).rglob("*.parquet"):
        pq.ParquetFile(path).metadata  # noqa: B018 - raises on a torn file


def group_state(settings: Settings) -> tuple[int, int]:
    """(pending entries, entries not yet delivered) of the batcher's group."""
    client = sync_client(settings)
    try:
        pending = client.xpending(settings.stream_key, settings.consumer_group)["pending"]
    except redis.ResponseError as exc:  # the batcher has not created its group yet
        assert "NOGROUP" in str(exc)
        client.close()
        return -1, -1
    try:
        groups = client.xinfo_groups(settings.stream_key)
        group = next(g for g in groups if g["name"].decode() == settings.consumer_group)
        first_unread = buffer.next_id(group["last-delivered-id"].decode())
        unread = len(client.xrange(settings.stream_key, min=first_unread))
    finally:
        client.close()
    return int(pending), unread


async def _drain(settings: Settings, timeout: float) -> batch_mod.Batcher:
    client = buffer.connect(settings)
    batcher = batch_mod.Batcher(settings, client)
    task = asyncio.create_task(batcher.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            await asyncio.sleep(0.1)
            if task.done():
                await task
            if batcher.cycles and await asyncio.to_thread(group_state, settings) == (0, 0):
                break
            if loop.time() > deadline:
                raise TimeoutError("the batcher did not drain the stream in time")
    finally:
        batcher.stop.set()
        await asyncio.wait_for(task, 60)
        await client.aclose()
    return batcher


def drain(settings: Settings, timeout: float = 60) -> batch_mod.Batcher:
    """Run a batcher in this process until every entry is acknowledged, then stop it."""
    return asyncio.run(_drain(settings, timeout))


def visible_posts(data_dir: str | Path) -> set[str]:
    """Uris of the posts the query engine shows (what /v1/search and /v1/export return)."""
    engine = QueryEngine(Settings(data_dir=str(data_dir), result_limit=False))
    try:
        return {post.uri for part in engine.export(Filters(), max_rows=10**9) for post in part}
    finally:
        engine.close()


def start_batcher(settings: Settings, log: Path, crash_at: str = "") -> subprocess.Popen[bytes]:
    env = {**os.environ, **to_environ(settings), "APPLIANCE_BATCH_CRASH_AT": crash_at}
    env["APPLIANCE_LOG_FORMAT"] = "json"
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "batch"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )


def all_keys(data_dir: str | Path, table: str) -> list[tuple[str, str]]:
    """(uri, rev) of every stored row of a commit table ((did, seq) of identities, accounts)."""
    files = [str(p) for p in live_files(data_dir, table)]
    columns = ", ".join(layout.KEY_COLUMNS[table])
    if table in (*layout.COMMIT_TABLES, "deletes"):
        columns = f"{layout.uri_sql(table)}, rev"
    return duckdb.sql(f"SELECT {columns} FROM read_parquet($f)", params={"f": files}).fetchall()


def start_ingester(settings: Settings, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m appliance ingest` as a real child process (so it can be killed -9)."""
    env = {**os.environ, **to_environ(settings)}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "ingest", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The ingester's /metrics as {(sample name, sorted labels): value}."""
    status, body = http_get(settings.ingest_port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def client(settings: Settings) -> redis.Redis:
    return redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_password
    )


def sample(name: str, **labels: str) -> float:
    """A sample of the batcher's registry (0 when absent)."""
    return metrics.BATCH.get_sample_value(name, labels) or 0.0


# --- processes and monitoring/ ---------------------------------------------------------------------

MONITORING = REPO_ROOT / "monitoring"


def children_of(pid: int) -> dict[str, int]:
    """Child PIDs of a process by a short name taken from their command lines (`appliance up`'s
    children: redis, replay, ingest, batch, serve, identity)."""
    out = {}
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, raw):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        words = [w.decode() for w in cmd if w]
        if not words:  # exited, not yet reaped
            continue
        if "redis-server" in words[0]:
            out["redis"] = child
        elif "loadtest" in words:
            out["replay"] = child
        else:
            out[words[-1]] = child  # ingest | batch | serve | identity
    return out


def render_alertmanager(**variables: object) -> str:
    """Render monitoring/alertmanager.yml as pyinfra's files.template does (StrictUndefined)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string((MONITORING / "alertmanager.yml").read_text()).render(**variables)
