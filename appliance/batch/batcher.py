"""The batcher: the Redis Stream buffer → date-partitioned Parquet, exactly once.

A batch is a set of stream entries read through the consumer group. Its events are decoded,
routed to tables, deduplicated by natural key (inside the batch, and against stored rows whose
time_us is within `batch_dedupe_margin_s` of the batch's), and written per (table, day) as
`<data_dir>/<table>/date=YYYY-MM-DD/<first-id>_<last-id>.parquet`: the name comes from the batch's
stream range, so a batch redone after a crash overwrites its own files. Order of effects, each
one durable before the next (DESIGN invariant 3):

    temp file → fsync → rename → dir fsync → manifest (files + last_batch) → XACK → XTRIM MINID

Restart recovery: the batcher first reads ALL of its own pending entries (XREADGROUP id 0) and
flushes them as one batch, which is the same set of entries (so the same file names) as the
batch that was interrupted; then it claims entries idle with dead consumers (XAUTOCLAIM); then it
reads new ones. Entries whose transformation fails stay pending and are retried next cycle; after
`batch_max_attempts` deliveries they go to the dead-letter stream and are acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from appliance import buffer, events, metrics
from appliance.batch.tables import (
    Counters,
    TableBuilder,
    columns_valid,
    decode_frames,
    decode_joined,
    decode_joined_unchecked,
)
from appliance.config import Settings
from appliance.httpd import serve_probes
from appliance.logs import setup_logging
from appliance.store import layout
from appliance.store.crash import CRASH_POINTS, crash_point
from appliance.store.manifest import Manifest, read_manifest, update_manifest
from appliance.store.writer import AtomicParquetWriter

log = logging.getLogger("appliance.batch")

ROW_GROUP_ROWS = 131_072  # batch files: row groups small enough to skip by time_us statistics
WRITE_THREADS = 2  # Parquet files written at once (the VM has 2 cores)
READ_COUNT = 200  # stream entries per XREADGROUP (an entry holds up to ~100 events)
MAX_BACKOFF_S = 60.0

# --- stream ids --------------------------------------------------------------------------------


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id`."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- one batch ---------------------------------------------------------------------------------


@dataclass
class Rejected:
    """A frame that failed decoding in the batcher (the ingester should have caught it)."""

    entry_id: str
    reason: str
    frame: bytes
    detail: str


Entry = tuple[str, dict[bytes, bytes] | None]
# Per entry: (frames, raw bytes, rejected frames as (frame, reason, detail), error or None).
Outcome = tuple[int, int, list[tuple[bytes, str, str]], str | None]
# A transformed part: its outcomes in entry order, Arrow chunks per table (as IPC streams when
# they cross a process boundary), and the builder's counters.
PartResult = tuple[list[Outcome], dict[str, list[Any]], Counters]


def transform_entry(
    builder: TableBuilder, fields: dict[bytes, bytes] | None, now: int
) -> tuple[int, int, list[tuple[bytes, str, str]]]:
    """Decode one stream entry into `builder`: (frames, raw bytes, rejected frames).

    All or nothing: if anything raises, the rows this entry added are rolled back first.
    """
    mark = builder.mark()
    try:
        if fields is None:
            raise ValueError("entry was deleted from the stream before it was acknowledged")
        data = fields.get(buffer.FIELD_DATA, b"")
        count = int(fields.get(buffer.FIELD_COUNT, b"0"))
        # Usually the whole entry decodes in one call; otherwise frame by frame.
        fast = decode_joined(data, count, now, builder.max_bytes)
        if fast is None:
            frames = buffer.unpack(fields)  # raises on a torn or foreign entry
            decoded, rejected = decode_frames(frames, now, builder.max_bytes)
            count, raw = len(frames), sum(map(len, frames))
        else:
            decoded, rejected = fast
            raw = len(data) - (count - 1)
        builder.add_events(decoded)
        builder.commit_entry()
    except BaseException:
        builder.rollback(mark)
        raise
    return count, raw, [(frame, error.reason, error.detail) for frame, error in rejected]


def _transform_entry_unchecked(
    builder: TableBuilder, fields: dict[bytes, bytes] | None, now: int
) -> tuple[int, int]:
    """`transform_entry` for the usual entry, whose frames the ingester already validated:
    one decode call, the commit checks left to `columns_valid` over the whole part.

    Raises (with nothing added) for anything unusual; the caller then uses `transform_entry`.
    """
    if fields is None:
        raise ValueError("entry was deleted from the stream")
    data = fields.get(buffer.FIELD_DATA, b"")
    count = int(fields.get(buffer.FIELD_COUNT, b"0"))
    decoded = decode_joined_unchecked(data, count, now, builder.max_bytes)
    if decoded is None:
        raise ValueError("not an entry the fast path can vouch for")
    mark = builder.mark()
    try:
        builder.add_unchecked(decoded)
        builder.commit_entry()
    except BaseException:
        builder.rollback(mark)
        raise
    return count, len(data) - (count - 1)


def transform_part(
    entries: list[Entry],
    now: int,
    max_bytes: int,
    store_cids: bool,
    ipc: bool,
    checked: bool = False,
) -> PartResult:
    """Transform consecutive stream entries with a fresh builder (in a worker or in-process).

    Each entry's failure is isolated and returned as its outcome; only the final Arrow
    conversion can raise, and then the caller redoes the part entry by entry. Entries are
    decoded unchecked and their commits validated column-wise at the end (`columns_valid`);
    if any row fails that, the part is redone with `events.validate` event by event
    (`checked`), which finds the invalid frames and their reasons.
    """
    builder = TableBuilder(max_bytes=max_bytes, store_cids=store_cids)
    outcomes: list[Outcome] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _, fields in entries:
            if not checked:
                try:
                    count, raw = _transform_entry_unchecked(builder, fields, now)
                except Exception:
                    pass  # nothing was added: the checked path below decides
                else:
                    outcomes.append((count, raw, [], None))
                    continue
            try:
                count, raw, rejected = transform_entry(builder, fields, now)
            except Exception as exc:
                outcomes.append((0, 0, [], f"{type(exc).__name__}: {exc}"))
                continue
            outcomes.append((count, raw, rejected, None))
        chunks = builder.take_chunks()
    finally:
        if enabled:
            gc.enable()
    if not checked and not all(
        columns_valid(table, chunk, now) for table, parts in chunks.items() for chunk in parts
    ):
        return transform_part(entries, now, max_bytes, store_cids, ipc, checked=True)
    out: dict[str, list[Any]] = {t: list(c) for t, c in chunks.items()}
    if ipc:
        out = {t: [_to_ipc(b) for b in c] for t, c in chunks.items()}
    return outcomes, out, builder.counters()


def _to_ipc(chunk: pa.RecordBatch) -> bytes:
    # One IPC stream per chunk: chunks of one table may carry different dictionaries.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, chunk.schema) as writer:
        writer.write_batch(chunk)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(chunks: dict[str, list[Any]]) -> dict[str, list[pa.RecordBatch]]:
    out = {}
    for table, parts in chunks.items():
        out[table] = [
            p if isinstance(p, pa.RecordBatch) else pa.ipc.open_stream(p).read_next_batch()
            for p in parts
        ]
    return out


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; the batcher decides, its workers just stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker keeps its call queue's write end open, so it never sees EOF when the batcher is
    # killed (-9): it watches for the parent to go instead, so none is left behind.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _ready() -> int:
    return os.getpid()


class TransformPool:
    """Long-lived worker processes (spawned once) that transform parts of each read.

    Decoding and converting to Arrow is pure Python-bound CPU work; with the VM's two cores the
    batcher's own thread takes one part of every read and `workers` processes the others (the
    entries go out as bytes, the rows come back as Arrow IPC). A worker that dies breaks the
    pool: the part is redone in-process and the pool is started again on the next use.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
            )
        return self._executor

    def start(self) -> None:
        """Spawn the workers now (they import pyarrow: about a second), not in the first batch."""
        futures = [self._get().submit(_ready) for _ in range(self.workers)]
        for future in futures:
            future.result()

    def submit(self, fn: Callable[..., PartResult], *args: Any) -> Future[PartResult]:
        try:
            return self._get().submit(fn, *args)
        except BrokenProcessPool as exc:
            self.failed(exc)
            return self._get().submit(fn, *args)

    def failed(self, exc: BaseException) -> None:
        """A part failed in a worker: log it; start fresh workers if the pool is broken."""
        metrics.batch_failures.labels("worker").inc()
        log.warning(
            "a transform worker failed; its part is redone in-process",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
        if isinstance(exc, BrokenProcessPool) and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def pids(self) -> list[int]:
        """Process ids of the running workers (for measurements)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


@dataclass
class Batch:
    """Stream entries read for one flush, transformed as they arrive.

    Each entry is transformed in isolation: if anything raises, the rows it added are rolled
    back and the entry is recorded in `failed` (left pending, retried, dead-lettered after
    `batch_max_attempts`). `ok` holds the ids of entries that transformed, in stream order.
    """

    source: str  # "pending", "claimed" or "new"
    builder: TableBuilder = field(default_factory=TableBuilder)
    pool: TransformPool | None = None  # worker processes sharing the transformation
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # entry id -> error
    failed_fields: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    frames: int = 0
    raw_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _tables: dict[str, pa.Table] | None = None
    _name: str | None = None

    @property
    def entries(self) -> int:
        return len(self.ok) + len(self.failed)

    def add_entries(self, entries: Iterable[tuple[str, dict[bytes, bytes] | None]]) -> None:
        """Transform stream entries (id, fields); never raises for a bad entry.

        With a `pool`, the entries are split into consecutive parts: this thread transforms
        the first while each worker process transforms one of the others (`transform_part`),
        and the results are merged in stream order.
        """
        now = events.now_us()
        entries = list(entries)
        # The rows are many small tuples that live until the batch is written: automatic
        # collections would rescan them over and over (measured: ~12% of transform time).
        enabled = gc.isenabled()
        gc.disable()
        try:
            if entries:
                self._add_parts(entries, now)
        finally:
            if enabled:
                gc.enable()
        self._name = None

    def _add_parts(self, entries: list[Entry], now: int) -> None:
        builder = self.builder
        pool = self.pool
        n = min(pool.workers + 1 if pool is not None else 1, len(entries))
        step = -(-len(entries) // n)
        parts = [entries[i : i + step] for i in range(0, len(entries), step)]
        args = (now, builder.max_bytes, builder.store_cids)
        futures = []
        if pool is not None:
            futures = [pool.submit(transform_part, part, *args, True) for part in parts[1:]]
        results: list[PartResult | None] = []
        try:
            results.append(transform_part(parts[0], *args, False))
        except Exception:
            results.append(None)  # redone entry by entry below, each failure isolated
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:  # a worker died or could not run: redo its part here
                if pool is not None:
                    pool.failed(exc)
                results.append(None)
        for part, result in zip(parts, results, strict=True):
            if result is None:
                for entry_id, fields in part:
                    self._add_entry(entry_id, fields, now)
                continue
            outcomes, chunks, counters = result
            builder.add_chunks(_from_ipc(chunks), counters)
            for (entry_id, fields), (count, raw, rejected, error) in zip(
                part, outcomes, strict=True
            ):
                if error is not None:
                    self._entry_failed(entry_id, fields, error)
                else:
                    self._entry_ok(entry_id, count, raw, rejected)

    def _add_entry(self, entry_id: str, fields: dict[bytes, bytes] | None, now: int) -> None:
        try:
            count, raw, rejected = transform_entry(self.builder, fields, now)
        except Exception as exc:  # isolate any failure to this entry
            self._entry_failed(entry_id, fields, f"{type(exc).__name__}: {exc}")
            return
        self._entry_ok(entry_id, count, raw, rejected)

    def _entry_failed(self, entry_id: str, fields: dict[bytes, bytes] | None, error: str) -> None:
        self.failed[entry_id] = error
        self.failed_fields[entry_id] = fields or {}
        metrics.batch_failures.labels("transform").inc()
        log.warning("stream entry failed to transform", extra={"entry": entry_id, "error": error})

    def _entry_ok(
        self, entry_id: str, count: int, raw: int, rejected: list[tuple[bytes, str, str]]
    ) -> None:
        self.frames += count
        self.raw_bytes += raw
        for frame, reason, detail in rejected:
            self.rejected.append(Rejected(entry_id, reason, frame, detail))
        self.ok.append(entry_id)

    @property
    def first_id(self) -> str:
        return min(self.ok, key=parse_id)

    @property
    def last_id(self) -> str:
        return max(self.ok, key=parse_id)

    @property
    def name(self) -> str:
        """File name stem of this batch: its stream range (of entries that transformed)."""
        if self._name is None:
            self._name = f"{self.first_id}_{self.last_id}"
        return self._name

    def tables(self) -> dict[str, pa.Table]:
        """The batch's Arrow tables (built once; a retried write reuses them)."""
        if self._tables is None:
            self._tables = self.builder.tables()
            metrics.batch_bad_created_at.inc(self.builder.bad_created_at)
        return self._tables


# --- deduplication against stored rows ---------------------------------------------------------


class StoredKeys:
    """Natural keys of live files near a time window, read from their key columns.

    Row-group time_us statistics are cached per file (keyed by path, size and mtime), so a
    batch reads only the row groups that overlap its window.
    """

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[int, int, list[tuple[int, int, int]]]] = {}

    def _row_groups(self, path: Path) -> list[tuple[int, int, int]]:
        st = path.stat()
        cached = self._ranges.get(str(path))
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        md = pq.ParquetFile(path).metadata
        col = md.schema.to_arrow_schema().get_field_index("time_us")
        out = []
        for i in range(md.num_row_groups):
            stats = md.row_group(i).column(col).statistics
            if stats is not None and stats.has_min_max:
                out.append((i, int(stats.min), int(stats.max)))
            else:
                out.append((i, -(2**63), 2**63 - 1))
        self._ranges[str(path)] = (st.st_size, st.st_mtime_ns, out)
        return out

    def keys(
        self,
        data_dir: Path,
        manifest: Manifest,
        table: str,
        lo: int,
        hi: int,
        exclude: str,
    ) -> pa.Array | None:
        """Keys of stored rows of `table` with lo <= time_us <= hi, skipping files named `exclude`."""
        days = {layout.day_of(lo), layout.day_of(hi)}
        days.update(layout.day_of(t) for t in range(lo, hi, layout.DAY_US))
        pieces = []
        columns = [*layout.KEY_COLUMNS[table], "time_us"]
        for rel in manifest.table_files(table, sorted(days)):
            path = data_dir / rel
            if path.stem == exclude:
                continue  # our own earlier attempt at this batch: about to be overwritten
            groups = [i for i, a, b in self._row_groups(path) if a <= hi and b >= lo]
            if not groups:
                continue
            part = pq.ParquetFile(path).read_row_groups(groups, columns=columns)
            t = part["time_us"]
            part = part.filter(pc.and_(pc.greater_equal(t, lo), pc.less_equal(t, hi)))
            if part.num_rows:
                pieces.append(layout.key_array(table, part))
        if not pieces:
            return None
        return pa.chunked_array([c for p in pieces for c in p.chunks]).combine_chunks()

    def forget(self, path: Path) -> None:
        self._ranges.pop(str(path), None)


def drop_stored_duplicates(
    table: str,
    data: pa.Table,
    stored: StoredKeys,
    data_dir: Path,
    manifest: Manifest,
    margin_us: int,
    exclude: str,
) -> pa.Table:
    """`data` without the rows whose natural key a live file already holds."""
    times = data["time_us"]
    lo = pc.min(times).as_py() - margin_us
    hi = pc.max(times).as_py() + margin_us
    keys = stored.keys(data_dir, manifest, table, lo, hi, exclude)
    if keys is None:
        return data
    seen = pc.is_in(layout.key_array(table, data), value_set=keys)
    dropped = pc.sum(seen).as_py() or 0
    if not dropped:
        return data
    metrics.batch_duplicates.labels("stored").inc(dropped)
    return data.filter(pc.invert(seen))


def split_days(data: pa.Table) -> dict[str, pa.Table]:
    """The rows of `data` per UTC day of time_us."""
    day_numbers = pc.divide(data["time_us"], layout.DAY_US)
    lo, hi = pc.min(day_numbers).as_py(), pc.max(day_numbers).as_py()
    if lo == hi:
        return {layout.day_of(lo * layout.DAY_US): data}
    return {
        layout.day_of(d * layout.DAY_US): data.filter(pc.equal(day_numbers, d))
        for d in pc.unique(day_numbers).to_pylist()
    }


# --- writing -------------------------------------------------------------------------------------


@dataclass
class Written:
    """What a batch wrote: relative paths with row counts and bytes, per table."""

    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def write_batch(settings: Settings, batch: Batch, stored: StoredKeys) -> Written:
    """Write the batch's files and add them to the manifest (steps up to, not including, XACK).

    On any error the files this attempt renamed are removed again (none is in the manifest
    yet), so a failed batch leaves nothing behind; the caller retries or abandons it.
    """
    data_dir = Path(settings.data_dir)
    tables = batch.tables()
    crash_point(settings, "before_write")
    manifest = read_manifest(data_dir)
    margin_us = int(settings.batch_dedupe_margin_s * 1_000_000)
    written = Written()
    renamed: list[Path] = []
    lock = threading.Lock()

    def write(table: str, day: str, part: pa.Table) -> tuple[int | None, str] | None:
        # Errors come back as values: re-raising an exception object from a worker thread in
        # this thread crashed CPython 3.11 here (a segfault in PyException_SetTraceback when two
        # writers failed at once on a full disk).
        try:
            _write(table, day, part)
        except Exception as exc:
            return getattr(exc, "errno", None), f"{type(exc).__name__}: {exc}"
        return None

    def _write(table: str, day: str, part: pa.Table) -> None:
        directory = layout.partition_dir(data_dir, table, day)
        stored.forget(directory / f"{batch.name}.parquet")
        schema = layout.SCHEMAS[table]
        level = settings.parquet_zstd_level
        with AtomicParquetWriter(directory, batch.name, schema, zstd_level=level) as out:
            for offset in range(0, part.num_rows, ROW_GROUP_ROWS):
                out.write(part.slice(offset, ROW_GROUP_ROWS))
                if offset == 0:
                    with lock:
                        if renamed:
                            out.flush()
                            crash_point(settings, "mid_write")
        with lock:
            renamed.append(out.final)
            written.files.setdefault(table, []).append(out.final.relative_to(data_dir).as_posix())
            written.rows[table] = written.rows.get(table, 0) + part.num_rows
            written.bytes[table] = written.bytes.get(table, 0) + out.final.stat().st_size

    try:
        jobs: list[tuple[str, str, pa.Table]] = []
        for table, data in tables.items():
            data = drop_stored_duplicates(
                table, data, stored, data_dir, manifest, margin_us, batch.name
            )
            if data.num_rows:
                jobs.extend((table, day, part) for day, part in split_days(data).items())
        # Files are written by WRITE_THREADS threads (Parquet encoding releases the GIL),
        # largest first so that the threads finish together.
        jobs.sort(key=lambda job: -job[2].num_rows)
        pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="parquet")
        try:
            errors = [f.result() for f in [pool.submit(write, *job) for job in jobs]]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for error in errors:
            if error is not None:
                code, message = error
                raise OSError(code, message) if code is not None else RuntimeError(message)
        written.paths = renamed
        crash_point(settings, "after_rename")
        if written.files or batch.ok:
            with update_manifest(data_dir) as m:
                for table, paths in written.files.items():
                    m.files.setdefault(table, []).extend(paths)
                if m.retired:  # a redone batch may rewrite a file compaction retired
                    added = {p for paths in written.files.values() for p in paths}
                    m.retired = [(p, t) for p, t in m.retired if p not in added]
                m.last_batch = {
                    "time": time.time(),
                    "events": batch.frames,
                    "rows": written.rows,
                    "bytes": written.total_bytes,
                    "raw_bytes": batch.raw_bytes,
                    "stream": [batch.first_id, batch.last_id],
                    "entries": len(batch.ok),
                    "max_time_us": max(
                        (pc.max(t["time_us"]).as_py() for t in tables.values()), default=None
                    ),
                }
    except BaseException:
        # Remove what this attempt renamed, except files a previous attempt of the same batch
        # already made live (the manifest references them; they hold the same rows).
        live = {p for paths in read_manifest(data_dir).files.values() for p in paths}
        for path in renamed:
            if path.relative_to(data_dir).as_posix() not in live:
                path.unlink(missing_ok=True)
        raise
    crash_point(settings, "after_manifest")
    return written


def failure_cause(exc: BaseException) -> str:
    """A metric label for why a batch attempt failed."""
    if isinstance(exc, RedisError):
        return "redis"
    code = getattr(exc, "errno", None)
    text = str(exc)  # pyarrow's I/O errors carry the errno only in their message
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text:
        return "disk_full"
    if (
        code in (errno.EACCES, errno.EPERM, errno.EROFS)
        or "Permission denied" in text
        or "Read-only file system" in text
    ):
        return "unwritable"
    return "io" if isinstance(exc, OSError | pa.ArrowException) else "error"


# --- the service ---------------------------------------------------------------------------------


class Batcher:
    """Reads the buffer through the consumer group and writes batches; see the module doc."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.key = settings.stream_key
        self.group = settings.consumer_group
        self.consumer = settings.batch_consumer
        self.stored = StoredKeys()
        self.entry_events = settings.ingest_entry_events
        self.stop = asyncio.Event()
        self.failing: str | None = None  # cause of the current run of failed attempts
        self.last_success: float | None = None
        self.cycles = 0  # completed read-flush-compact cycles
        self.watermark_us: int | None = read_manifest(settings.data_dir).last_batch.get(
            "max_time_us"
        )
        # Started in run(), closed when run() returns.
        self.pool = TransformPool(settings.batch_workers) if settings.batch_workers else None

    # -- reading -------------------------------------------------------------------------

    def new_batch(self, source: str) -> Batch:
        builder = TableBuilder(
            max_bytes=self.settings.max_event_bytes, store_cids=self.settings.store_cids
        )
        return Batch(source, builder, pool=self.pool)

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) from the start, unless it exists."""
        try:
            await self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _transform(self, batch: Batch, raw: Sequence[Any]) -> None:
        entries = [(_text(entry_id), fields) for entry_id, fields in raw]
        await asyncio.to_thread(batch.add_entries, entries)

    async def read_own_pending(self) -> Batch:
        """Every entry delivered to this consumer and not acknowledged, as one batch."""
        batch = self.new_batch("pending")
        last = "0"
        while True:
            reply: Any = await self.client.xreadgroup(
                self.group, self.consumer, {self.key: last}, count=READ_COUNT * 5
            )
            raw = reply[0][1] if reply else []
            if not raw:
                return batch
            await self._transform(batch, raw)
            last = _text(raw[-1][0])

    async def claim_idle(self) -> Batch:
        """Entries pending longer than batch_claim_idle_s with other (dead) consumers."""
        batch = self.new_batch("claimed")
        start = "0-0"
        idle_ms = int(self.settings.batch_claim_idle_s * 1000)
        while True:
            reply: Any = await self.client.xautoclaim(
                self.key, self.group, self.consumer, idle_ms, start_id=start, count=READ_COUNT
            )
            start = _text(reply[0])
            claimed = reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.error(
                    "pending entries were deleted from the stream before acknowledgement",
                    extra={"ids": [_text(i) for i in deleted][:20]},
                )
            # XAUTOCLAIM also hands back our own entries; those were handled as "pending".
            await self._transform(batch, [e for e in claimed if e[1] is not None])
            if start == "0-0":
                return batch

    async def collect_new(self) -> Batch:
        """New entries until batch_interval_s passes, batch_max_events arrive, or stop is set."""
        batch = self.new_batch("new")
        deadline = time.monotonic() + self.settings.batch_interval_s
        while not self.stop.is_set() and batch.frames < self.settings.batch_max_events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Read no more entries than the events still wanted (entries hold many events).
            per_entry = batch.frames / batch.entries if batch.entries else self.entry_events
            wanted = self.settings.batch_max_events - batch.frames
            count = max(1, min(READ_COUNT, -(-wanted // max(1, int(per_entry)))))
            try:
                reply: Any = await self.client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.key: ">"},
                    count=count,
                    block=max(1, int(min(remaining, 1.0) * 1000)),
                )
            except RedisError as exc:
                await self._failed(exc, 1.0)
                continue
            if reply:
                await self._transform(batch, reply[0][1])
        return batch

    # -- writing ---------------------------------------------------------------------------

    async def flush(self, batch: Batch) -> bool:
        """Write, acknowledge and trim one batch; retry with backoff until done or stopped.

        Returns False if the batch was abandoned (stop requested while failing): nothing was
        acknowledged, so its entries are redone after a restart.
        """
        if not batch.entries:
            return True
        started = time.monotonic()
        backoff = 1.0
        written = None
        if batch.ok:
            while True:
                try:
                    written = await asyncio.to_thread(
                        write_batch, self.settings, batch, self.stored
                    )
                    break
                except Exception as exc:
                    if self.stop.is_set():
                        log.error("stopping: batch abandoned unacknowledged")
                        return False
                    await self._failed(exc, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        backoff = 1.0
        while True:
            try:
                await self._finish(batch)
                break
            except RedisError as exc:
                if self.stop.is_set():
                    log.error("stopping: batch written but not acknowledged (redone on restart)")
                    return False
                await self._failed(exc, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        self._record(batch, written, time.monotonic() - started)
        return True

    async def _failed(self, exc: BaseException, backoff: float) -> None:
        cause = failure_cause(exc)
        metrics.batch_failures.labels(cause).inc()
        self.failing = cause
        log.error(
            "batch attempt failed",
            extra={"cause": cause, "error": f"{type(exc).__name__}: {exc}", "retry_s": backoff},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), backoff)
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            # Redis lost the stream or the group (a fresh server): create them again.
            with contextlib.suppress(RedisError):
                await self.ensure_group()

    async def _finish(self, batch: Batch) -> None:
        """Dead-letter what must be, acknowledge, trim (after the files are durable)."""
        poison = await self._poison(batch)
        async with self.client.pipeline(transaction=True) as pipe:
            for r in batch.rejected:
                buffer.queue_dead_letter(pipe, self.settings, r.reason, r.frame, "batch", r.detail)
            for entry_id in poison:
                fields = batch.failed_fields.get(entry_id, {})
                buffer.queue_dead_letter(
                    pipe,
                    self.settings,
                    "batch_poison",
                    fields.get(buffer.FIELD_DATA, b""),
                    "batch",
                    f"entry {entry_id}: {batch.failed[entry_id]}",
                )
            ack = batch.ok + poison
            for i in range(0, len(ack), 10_000):
                pipe.xack(self.key, self.group, *ack[i : i + 10_000])
            await pipe.execute()
        for r in batch.rejected:
            metrics.batch_dead_letters.labels(r.reason).inc()
        if poison:
            metrics.batch_dead_letters.labels("batch_poison").inc(len(poison))
            log.error("poison entries moved to the dead-letter stream", extra={"ids": poison})
        await self.trim()

    async def _poison(self, batch: Batch) -> list[str]:
        """Failed entries delivered batch_max_attempts times or more."""
        out = []
        for entry_id in batch.failed:
            info = await self.client.xpending_range(
                self.key, self.group, min=entry_id, max=entry_id, count=1
            )
            if info and int(info[0]["times_delivered"]) >= self.settings.batch_max_attempts:
                out.append(entry_id)
        return out

    async def trim(self) -> None:
        """XTRIM MINID below the oldest pending entry, or below the first unread one."""
        summary = await self.client.xpending(self.key, self.group)
        if summary["pending"]:
            floor = _text(summary["min"])
        else:
            groups = await self.client.xinfo_groups(self.key)
            ours = next(g for g in groups if _text(g["name"]) == self.group)
            floor = next_id(_text(ours["last-delivered-id"]))
        await self.client.xtrim(self.key, minid=floor, approximate=False)

    def _record(self, batch: Batch, written: Written | None, seconds: float) -> None:
        self.failing = None
        self.last_success = time.time()
        metrics.batch_batches.inc()
        metrics.batch_duration.observe(seconds)
        metrics.batch_last_success.set(self.last_success)
        metrics.batch_raw_bytes.inc(batch.raw_bytes)
        metrics.batch_duplicates.labels("batch").inc(sum(batch.builder.duplicates.values()))
        for table, n in batch.builder.routed().items():
            metrics.batch_events.labels(table).inc(n)
        fields: dict[str, Any] = {
            "source": batch.source,
            "entries": len(batch.ok),
            "failed_entries": len(batch.failed),
            "events": batch.frames,
            "rejected": len(batch.rejected),
            "duplicates_in_batch": sum(batch.builder.duplicates.values()),
            "seconds": round(seconds, 3),
            "collect_seconds": round(time.monotonic() - batch.started - seconds, 3),
        }
        if written is not None:
            for table, n in written.rows.items():
                metrics.batch_rows.labels(table).inc(n)
                metrics.batch_bytes.labels(table).inc(written.bytes[table])
            if written.total_bytes:
                metrics.batch_compression_ratio.set(batch.raw_bytes / written.total_bytes)
            fields.update(
                stream=[batch.first_id, batch.last_id] if batch.ok else None,
                rows=written.rows,
                bytes=written.total_bytes,
                raw_bytes=batch.raw_bytes,
            )
            if written.rows:
                tables = batch.tables()
                top = max(pc.max(t["time_us"]).as_py() for t in tables.values())
                self.watermark_us = max(self.watermark_us or top, top)
        log.info("batch written", extra=fields)

    async def update_gauges(self) -> None:
        """Pending entries and the age of the oldest unacknowledged entry."""
        summary: Any = await self.client.xpending(self.key, self.group)
        metrics.batch_pending.set(summary["pending"])
        oldest: str | None = _text(summary["min"]) if summary["pending"] else None
        if oldest is None:
            groups = await self.client.xinfo_groups(self.key)
            ours = next(g for g in groups if _text(g["name"]) == self.group)
            unread: Any = await self.client.xrange(
                self.key, min=next_id(_text(ours["last-delivered-id"])), count=1
            )
            oldest = _text(unread[0][0]) if unread else None
        age = 0.0 if oldest is None else max(0.0, time.time() - parse_id(oldest)[0] / 1000)
        metrics.batch_oldest_unacked_age.set(age)

    # -- compaction ----------------------------------------------------------------------

    async def compact_closed_days(self) -> None:
        """Compact the partitions of days closed (in event time) that still hold batch files."""
        if not self.settings.compact_auto or self.watermark_us is None:
            return
        from appliance.store import compact  # imported lazily: duckdb is only needed here

        cutoff = self.watermark_us - int(self.settings.compact_after_s * 1_000_000)
        try:
            await asyncio.to_thread(compact.compact_closed, self.settings, cutoff)
        except Exception as exc:
            # A failed compaction leaves the old files live; the next cycle tries again.
            metrics.batch_failures.labels(failure_cause(exc)).inc()
            log.exception("compaction failed", extra={"cause": failure_cause(exc)})

    # -- the loop ------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, dict[str, object]]:
        try:
            await self.client.ping()
        except RedisError as exc:
            return False, {"redis": f"unavailable: {type(exc).__name__}"}
        details: dict[str, object] = {"redis": "ok", "failing": self.failing}
        if self.last_success:
            details["last_batch_age_s"] = round(time.time() - self.last_success, 1)
        return self.failing is None, details

    async def run(self) -> None:
        """Recover, then batch until stopped (the current batch is finished first)."""
        try:
            if self.pool is not None:
                await asyncio.to_thread(self.pool.start)
            await self._run()
        finally:
            if self.pool is not None:
                await asyncio.to_thread(self.pool.close)

    async def _run(self) -> None:
        while not self.stop.is_set():
            try:
                await self.ensure_group()
                break
            except RedisError as exc:
                await self._failed(exc, 1.0)
        # Each cycle: own pending entries first (after a crash they are exactly the interrupted
        # batch; later, entries whose transformation failed get another attempt), then entries
        # stuck with dead consumers, then new ones.
        while not self.stop.is_set():
            for read in (self.read_own_pending, self.claim_idle, self.collect_new):
                try:
                    batch = await read()
                except RedisError as exc:
                    await self._failed(exc, 1.0)
                    break
                if not await self.flush(batch) or self.stop.is_set():
                    return
            with contextlib.suppress(RedisError):
                await self.update_gauges()
            await self.compact_closed_days()
            self.cycles += 1


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        dest="set_batch_interval_s",
        type=float,
        help="seconds between flushes (APPLIANCE_BATCH_INTERVAL_S)",
    )
    parser.add_argument(
        "--max-events",
        dest="set_batch_max_events",
        type=int,
        help="flush early at this many events (APPLIANCE_BATCH_MAX_EVENTS)",
    )
    parser.add_argument(
        "--data-dir", dest="set_data_dir", help="root of the Parquet datasets (APPLIANCE_DATA_DIR)"
    )


async def serve(settings: Settings) -> None:
    """Run the batcher with its probe endpoint until SIGTERM/SIGINT."""
    client = buffer.connect(settings)
    batcher = Batcher(settings, client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, batcher.stop.set)
    server = await serve_probes(
        settings.batch_host, settings.batch_port, metrics.BATCH, batcher.ready
    )
    log.info(
        "batcher started",
        extra={
            "stream": settings.stream_key,
            "group": settings.consumer_group,
            "consumer": settings.batch_consumer,
            "data_dir": settings.data_dir,
            "port": settings.batch_port,
        },
    )
    try:
        await batcher.run()
    finally:
        server.close()
        await client.aclose()
    log.info("batcher stopped")


def main(settings: Settings, args: argparse.Namespace) -> int:
    setup_logging(settings.log_level, settings.log_format)
    if settings.batch_crash_at and settings.batch_crash_at not in CRASH_POINTS:
        log.error(
            "APPLIANCE_BATCH_CRASH_AT must be one of: " + ", ".join(CRASH_POINTS),
            extra={"value": settings.batch_crash_at},
        )
        return 2
    asyncio.run(serve(settings))
    return 0
