"""The batcher: the Redis Stream buffer → date-partitioned Parquet, exactly once.

A batch is a set of stream entries read through the consumer group. Its events are decoded,
routed to tables, deduplicated by natural key (inside the batch, and against stored rows whose
time_us is within `batch_dedupe_margin_s` of the batch's), and written per (table, day) as
`<data_dir>/<table>/date=YYYY-MM-DD/<first-id>_<last-id>.parquet`: the name comes from the batch's
stream range, so a batch redone after a crash overwrites its own files. Order of effects, each
one durable before the next (invariant 3 in docs/architecture.md):

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
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from appliance import buffer, metrics
from appliance.batch.files import StoredKeys, Written, failure_cause, write_batch
from appliance.batch.tables import TableBuilder
from appliance.batch.transform import Batch, TransformPool
from appliance.buffer import ConsumerGroup, Entry
from appliance.config import Settings
from appliance.httpd import serve_probes
from appliance.logs import setup_logging
from appliance.store import layout
from appliance.store.crash import CRASH_POINTS
from appliance.store.manifest import read_manifest

log = logging.getLogger("appliance.batch")

READ_COUNT = 200  # stream entries per XREADGROUP (an entry holds up to ~100 events)
MAX_BACKOFF_S = 60.0


def store_gauges(data_dir: str) -> None:
    """Live files and their bytes per table, from the manifest (the storage dashboard)."""
    manifest = read_manifest(data_dir)
    for table in layout.TABLES:
        paths = manifest.table_files(table)
        size = 0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):  # retired by compaction meanwhile
                size += (Path(data_dir) / path).stat().st_size
        metrics.store_files.labels(table).set(len(paths))
        metrics.store_bytes.labels(table).set(size)


class Batcher:
    """Reads the buffer through the consumer group and writes batches; see the module doc."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.group = ConsumerGroup(client, settings, settings.batch_consumer)
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

    async def _transform(self, batch: Batch, entries: list[Entry]) -> None:
        await asyncio.to_thread(batch.add_entries, entries)

    async def read_own_pending(self) -> Batch:
        """Every entry delivered to this consumer and not acknowledged, as one batch."""
        batch = self.new_batch("pending")
        last = "0"
        while True:
            entries = await self.group.read_pending(last, READ_COUNT * 5)
            if not entries:
                return batch
            await self._transform(batch, entries)
            last = entries[-1][0]

    async def claim_idle(self) -> Batch:
        """Entries pending longer than batch_claim_idle_s with other (dead) consumers."""
        batch = self.new_batch("claimed")
        start = "0-0"
        idle_ms = int(self.settings.batch_claim_idle_s * 1000)
        while True:
            start, claimed, deleted = await self.group.claim(start, idle_ms, READ_COUNT)
            if deleted:
                log.error(
                    "pending entries were deleted from the stream before acknowledgement",
                    extra={"ids": deleted[:20]},
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
                entries = await self.group.read_new(count, max(1, int(min(remaining, 1.0) * 1000)))
            except RedisError as exc:
                await self._failed(exc, 1.0)
                continue
            if entries:
                await self._transform(batch, entries)
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
        metrics.batch_failing.set(1)
        log.error(
            "batch attempt failed",
            extra={"cause": cause, "error": f"{type(exc).__name__}: {exc}", "retry_s": backoff},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), backoff)
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            # Redis lost the stream or the group (a fresh server): create them again.
            with contextlib.suppress(RedisError):
                await self.group.ensure()

    async def _finish(self, batch: Batch) -> None:
        """Dead-letter what must be, acknowledge, trim (after the files are durable)."""
        poison = await self._poison(batch)
        dead = [(r.reason, r.frame, r.detail) for r in batch.rejected]
        for entry_id in poison:
            data = batch.failed_fields.get(entry_id, {}).get(buffer.FIELD_DATA, b"")
            dead.append(("batch_poison", data, f"entry {entry_id}: {batch.failed[entry_id]}"))
        await self.group.ack(batch.ok + poison, dead)
        for r in batch.rejected:
            metrics.batch_dead_letters.labels(r.reason).inc()
        if poison:
            metrics.batch_dead_letters.labels("batch_poison").inc(len(poison))
            log.error("poison entries moved to the dead-letter stream", extra={"ids": poison})
        await self.group.trim()

    async def _poison(self, batch: Batch) -> list[str]:
        """Failed entries delivered batch_max_attempts times or more."""
        out = []
        for entry_id in batch.failed:
            if await self.group.times_delivered(entry_id) >= self.settings.batch_max_attempts:
                out.append(entry_id)
        return out

    def _record(self, batch: Batch, written: Written | None, seconds: float) -> None:
        self.failing = None
        self.last_success = time.time()
        metrics.batch_failing.set(0)
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
        pending, oldest = await self.group.oldest_unacked()
        metrics.batch_pending.set(pending)
        age = 0.0 if oldest is None else max(0.0, time.time() - buffer.parse_id(oldest)[0] / 1000)
        metrics.batch_oldest_unacked_age.set(age)
        try:
            await asyncio.to_thread(store_gauges, self.settings.data_dir)
        except OSError as exc:  # a gauge is not worth stopping the batcher for
            log.warning("could not read the store's files", extra={"error": str(exc)})

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
            metrics.compact_failures.inc()
            log.exception("compaction failed", extra={"cause": failure_cause(exc)})
        else:
            metrics.compact_last_success.set(time.time())

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
                await self.group.ensure()
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
    metrics.batch_interval.set(settings.batch_interval_s)
    metrics.watch_data_root(settings.data_dir)
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
