"""`appliance identity`: the background worker that gives post authors their handles.

It runs beside the pipeline, never in it: it reads the Parquet files the manifest lists (posts:
authors and mentioned DIDs; identities: firehose identity events), so ingest and batching never
wait for it. DIDs without a fresh handle are resolved at `identity_rate` per second (a token
bucket; a few resolutions in flight so slow handle hosts do not lower the rate) and the answers
are kept in the identity store with a TTL (`identity_ttl_s`).

- A firehose identity event newer than what is known replaces it at once (store.apply_events).
- A PLC 429 pauses every resolution for its Retry-After; a PLC that does not answer pauses them
  with a backoff doubling from 1 s to 60 s. Each failed DID backs off on its own (1 min doubling
  to 6 h), keeping what was known.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from appliance import metrics
from appliance.config import Settings
from appliance.httpd import serve_probes
from appliance.identity.resolver import (
    RateLimited,
    Resolver,
    Unavailable,
    dns_txt_lookup,
    with_timeout,
)
from appliance.identity.store import Store
from appliance.logs import setup_logging
from appliance.store import layout
from appliance.store.manifest import read_manifest

log = logging.getLogger("appliance.identity")

POLL_S = 1.0  # manifest and queue polling
IN_FLIGHT = 16  # resolutions at once at most
LEASE_S = 300.0  # a claimed DID is due again after this if the worker dies mid-resolution
INVALID_TTL_CAP_S = 3600.0  # handle.invalid is checked again sooner than a verified handle
PLC_BACKOFF_MAX_S = 60.0
LOG_INTERVAL_S = 30.0
GAUGE_INTERVAL_S = 10.0  # the store's counts scan every DID (0.2 s for a million): not each poll
SCAN_BATCH_ROWS = 1_000_000


def did_backoff(failures: int) -> float:
    """Seconds before a DID that failed `failures` times in a row is tried again (±10%)."""
    base = min(60.0 * 2 ** max(failures - 1, 0), 6 * 3600.0)
    return base * random.uniform(0.9, 1.1)


class TokenBucket:
    """`rate` tokens per second, a burst of about one second's worth; `pause_until` stops it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = 1.0
        self.stamp = time.monotonic()
        self.paused_until = 0.0  # monotonic

    def paused(self) -> bool:
        return time.monotonic() < self.paused_until

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)
        self.tokens = 0.0

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            if now < self.paused_until:
                await asyncio.sleep(self.paused_until - now)
                self.stamp = time.monotonic()
                continue
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


def scan_files(store: Store, data_dir: Path, ttl_s: float) -> int:
    """Read the live posts and identities files not read yet; returns how many were read."""
    manifest = read_manifest(data_dir)
    live: set[str] = set()
    read = 0
    for table in ("posts", "identities"):
        for rel in manifest.files.get(table, []):
            live.add(rel)
            if store.is_scanned(rel):
                continue
            path = data_dir / rel
            try:
                if table == "posts":
                    _scan_posts(store, path, rel)
                else:
                    _scan_identities(store, path, rel, ttl_s)
            except FileNotFoundError:
                continue  # retired by a compaction since the manifest was read
            metrics.identity_files.labels(table).inc()
            read += 1
    store.forget_scanned(live)
    return read


def _scan_posts(store: Store, path: Path, rel: str) -> None:
    """Posts per author and the mentioned DIDs of one file, counted in Arrow a million rows at
    a time (a compacted day holds millions of rows, but far fewer distinct DIDs)."""
    # A compaction output holds rows already counted in the batch files it replaced.
    counted = not path.name.startswith(layout.COMPACTED_PREFIX)
    counts: Counter[str] = Counter()
    mentioned: set[str] = set()
    source = pq.ParquetFile(path)
    for batch in source.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=["did", "mentions"]):
        authors = pc.value_counts(batch.column("did").drop_null())
        dids = authors.field("values").to_pylist()
        if counted:
            counts.update(dict(zip(dids, authors.field("counts").to_pylist(), strict=True)))
        else:
            counts.update(dict.fromkeys(dids, 0))
        flat = pc.list_flatten(batch.column("mentions")).drop_null()
        mentioned.update(pc.unique(flat).to_pylist())
    found = dict(counts)
    for did in mentioned:
        if did.startswith("did:"):
            found.setdefault(did, 0)
    store.add_dids(found, rel)


def _scan_identities(store: Store, path: Path, rel: str, ttl_s: float) -> None:
    table = pq.read_table(path, columns=["did", "time_us", "handle"]).sort_by("time_us")
    events = zip(
        table.column("did").to_pylist(),
        table.column("time_us").to_pylist(),
        table.column("handle").to_pylist(),
        strict=True,
    )
    metrics.identity_events.inc(store.apply_events(events, ttl_s))
    store.add_dids({}, rel)


class Worker:
    """The scan loop and the resolution loop over one store."""

    def __init__(self, settings: Settings, store: Store, resolver: Resolver) -> None:
        self.settings = settings
        self.store = store
        self.resolver = resolver
        self.data_dir = Path(settings.data_dir)
        self.bucket = TokenBucket(settings.identity_rate) if settings.identity_rate > 0 else None
        self.slots = asyncio.Semaphore(IN_FLIGHT)
        self.plc_pause = 0.0  # the current PLC outage backoff (0 while the PLC answers)
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.outcomes: Counter[str] = Counter()
        self.queue = 0
        self.summary: dict[str, object] = {}
        self.gauges_due = 0.0  # monotonic time of the next update of the store's gauges

    async def scan_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(
                    scan_files, self.store, self.data_dir, self.settings.identity_ttl_s
                )
                if time.monotonic() >= self.gauges_due:
                    await asyncio.to_thread(self.update_gauges)
                    self.gauges_due = time.monotonic() + GAUGE_INTERVAL_S
            except Exception:  # a bad file or a busy store: logged, tried again next poll
                log.exception("identity scan failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), POLL_S)

    def update_gauges(self) -> None:
        summary = self.store.summary()
        self.summary = summary
        self.queue = summary["queue"]
        metrics.identity_queue.set(summary["queue"])
        metrics.identity_dids.labels("verified").set(summary["verified"])
        metrics.identity_dids.labels("invalid").set(summary["invalid"])
        metrics.identity_dids.labels("not_found").set(summary["not_found"])
        metrics.identity_dids.labels("pending").set(
            summary["dids"] - summary["verified"] - summary["invalid"] - summary["not_found"]
        )
        share = summary["posts_with_handle"]
        metrics.identity_posts_with_handle.set(share if share is not None else float("nan"))

    async def resolve_loop(self) -> None:
        if self.bucket is None:
            log.info("identity_rate is 0: no DID is resolved in the background")
            await self.stopping.wait()
            return
        while not self.stopping.is_set():
            due = await asyncio.to_thread(self.store.claim_due, time.time(), IN_FLIGHT, LEASE_S)
            if not due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), POLL_S)
                continue
            started = 0
            try:
                for did in due:
                    await self.bucket.take()
                    await self.slots.acquire()
                    task = asyncio.create_task(self.resolve_one(did))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                    started += 1
            finally:  # stopped while waiting (e.g. out a Retry-After): the rest are due again
                if started < len(due):
                    self.store.release(due[started:], 0.0)

    async def resolve_one(self, did: str) -> None:
        started = time.time()
        try:
            result = await with_timeout(
                self.resolver.resolve_did(did), self.settings.identity_timeout_s * 3
            )
        except RateLimited as exc:
            assert self.bucket is not None
            self.bucket.pause(exc.retry_after_s)
            self._count("rate_limited")
            log.warning("PLC directory rate limit", extra={"retry_after_s": exc.retry_after_s})
            await asyncio.to_thread(self.store.release, [did], time.time() + exc.retry_after_s)
            return
        except Unavailable as exc:
            self._count("unavailable")
            if exc.plc:  # the directory is down, not this DID: every resolution waits
                assert self.bucket is not None
                if not self.bucket.paused():  # requests sent before the pause do not double it
                    self.plc_pause = min(max(self.plc_pause * 2, 1.0), PLC_BACKOFF_MAX_S)
                    self.bucket.pause(self.plc_pause)
                    log.warning(
                        "PLC directory unavailable",
                        extra={"error": str(exc), "pause_s": self.plc_pause},
                    )
                await asyncio.to_thread(self.store.release, [did], time.time() + self.plc_pause)
            else:  # this DID's own host (did:web, its handle's DNS or HTTPS) failed
                delay = await asyncio.to_thread(self.store.failed, did, did_backoff)
                log.info(
                    "resolution failed", extra={"did": did, "error": str(exc), "retry_s": delay}
                )
            return
        finally:
            self.slots.release()
        self.plc_pause = 0.0
        self._count(result.outcome)
        ttl = self.settings.identity_ttl_s
        if result.outcome == "invalid":
            ttl = min(ttl, INVALID_TTL_CAP_S)
        await asyncio.to_thread(
            self.store.resolved, did, result.outcome, result.handle, started, time.time() + ttl
        )

    def _count(self, outcome: str) -> None:
        metrics.identity_resolutions.labels(outcome).inc()
        self.outcomes[outcome] += 1

    async def log_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), LOG_INTERVAL_S)
            log.info("identity progress", extra={**dict(self.outcomes), **self.summary})
            self.outcomes.clear()


async def run(settings: Settings) -> None:
    """Serve probes and run the loops until SIGINT/SIGTERM."""
    store = Store(settings.data_dir)
    txt = dns_txt_lookup(settings.identity_dns, settings.identity_timeout_s)
    resolver = Resolver(
        plc_url=settings.plc_url,
        timeout_s=settings.identity_timeout_s,
        txt=txt,
        web_origin=settings.identity_web_origin,
    )
    worker = Worker(settings, store, resolver)
    metrics.identity_rate.set(settings.identity_rate)
    bucket = worker.bucket
    if bucket is not None:
        metrics.identity_paused.set_function(lambda: 1.0 if bucket.paused() else 0.0)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stopping.set)

    async def ready() -> tuple[bool, dict[str, object]]:
        return True, {"queue": worker.queue}

    server = await serve_probes(
        settings.identity_host, settings.identity_port, metrics.IDENTITY, ready
    )
    log.info(
        "identity worker started",
        extra={
            "plc_url": settings.plc_url,
            "rate": settings.identity_rate,
            "store": str(store.path),
            "metrics": f"http://{settings.identity_host}:{settings.identity_port}/metrics",
        },
    )
    loops = [
        asyncio.create_task(worker.scan_loop()),
        asyncio.create_task(worker.resolve_loop()),
        asyncio.create_task(worker.log_loop()),
    ]
    try:
        await worker.stopping.wait()
        for task in loops[1:]:
            task.cancel()  # the resolve loop may be waiting out a Retry-After
        await asyncio.gather(*loops, return_exceptions=True)
        if worker.tasks:
            await asyncio.wait(worker.tasks, timeout=settings.identity_timeout_s * 3)
    finally:
        server.close()
        await resolver.aclose()
        store.close()
        log.info("identity worker stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", dest="set_data_dir", metavar="DIR", help="root of the Parquet datasets"
    )
    parser.add_argument(
        "--rate", dest="set_identity_rate", metavar="N", type=float, help="resolutions per second"
    )
    parser.add_argument("--plc-url", dest="set_plc_url", metavar="URL", help="PLC directory")


def main(settings: Settings, args: argparse.Namespace) -> int:
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    asyncio.run(run(settings))
    return 0
