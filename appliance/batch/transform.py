"""Stream entries → Arrow tables: the batcher's transformation, in-process or in workers.

Each stream entry is decoded (`batch.tables`), routed to per-table rows and converted to Arrow
as it arrives; a `Batch` collects the entries of one flush, isolating every entry's failure.
`TransformPool` adds worker processes that transform parts of each read.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from appliance import buffer, events, metrics
from appliance.batch.decode import (
    columns_valid,
    decode_frames,
    decode_joined,
    decode_joined_unchecked,
)
from appliance.batch.tables import Counters, TableBuilder
from appliance.buffer import Entry

log = logging.getLogger("appliance.batch")


@dataclass
class Rejected:
    """A frame that failed decoding in the batcher (the ingester should have caught it)."""

    entry_id: str
    reason: str
    frame: bytes
    detail: str


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
) -> tuple[int, int] | None:
    """`transform_entry` for the usual entry, whose frames the ingester already validated:
    one decode call, the commit checks left to `columns_valid` over the whole part.

    None (nothing added) when the fast path cannot vouch for the entry: `transform_entry` then
    decides. Raises (nothing added) only if adding the rows fails.
    """
    if fields is None:
        return None
    data = fields.get(buffer.FIELD_DATA, b"")
    count_field = fields.get(buffer.FIELD_COUNT, b"0")
    if not count_field.isdigit():  # a foreign or torn entry
        return None
    count = int(count_field)
    decoded = decode_joined_unchecked(data, count, now, builder.max_bytes)
    if decoded is None:
        return None
    mark = builder.mark()
    try:
        builder.add_unchecked(decoded)
        builder.commit_entry()
    except BaseException:
        builder.rollback(mark)
        raise
    return count, len(data) - (count - 1)


_fast_path_failed_logged = False


def _fast_path_failed(exc: Exception) -> None:
    """The fast path raised: the entry is redone by `transform_entry`, which reports a real
    failure; the first time, say so (a fast path that fails where the checked one does not is
    a bug)."""
    global _fast_path_failed_logged
    if not _fast_path_failed_logged:
        _fast_path_failed_logged = True
        log.warning(
            "the unchecked transform raised; the entry is redone checked",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )


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
                    done = _transform_entry_unchecked(builder, fields, now)
                except Exception as exc:
                    _fast_path_failed(exc)
                    done = None
                if done is not None:
                    outcomes.append((*done, [], None))
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
        return min(self.ok, key=buffer.parse_id)

    @property
    def last_id(self) -> str:
        return max(self.ok, key=buffer.parse_id)

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
