"""The ingester: Jetstream websocket → Redis Stream buffer, lossless across crashes and outages.

One asyncio process with four small tasks around two shared pieces of state (the open
micro-batch and the queue of sealed batches not yet written):

- the reader receives frames, decodes and validates each one (`events.decode`), appends valid
  frames to the open batch and rejected ones to its dead letters, and seals the batch every
  `ingest_entry_events` events. Per event it does nothing else.
- the writer takes sealed batches, up to `ingest_pipeline_events` events per round trip, and writes
  them in one MULTI/EXEC: the dead letters, one stream entry per batch and the cursor (the
  highest time_us written). The cursor therefore never runs ahead of the buffered data, and a
  kill -9 at any moment loses nothing: a restart resumes from the saved cursor minus
  `cursor_rewind_s`, and Jetstream replays from there.
- the ticker seals a partial batch every `ingest_flush_ms` and detects a silent stall.
- the sampler samples XLEN and logs a progress line.

This module holds the reader's side (the connection, the reader, the ticker's watchdog); the
writer, the held-data bound and the circuit breaker are `writer.Writer`; `appliance ingest` is
`command`.

Failures:
- a dropped, failed or stalled websocket → reconnect with capped exponential backoff and jitter,
  trying the configured URLs in turn, each time with a fresh URL carrying the current cursor;
- the first event after a (re)connect later than the resume point by more than
  `ingest_gap_tolerance_s` is recorded as a gap (metrics and a WARNING line), never hidden;
- any Redis write error (unreachable, OOM under noeviction, READONLY, ...) opens the circuit: the
  websocket is closed so Jetstream does not buffer for us, the unwritten batches stay in memory
  (bounded), the write is retried with backoff, and once Redis accepts it the held batches are
  flushed, the circuit closes and the reader reconnects from the cursor.

Duplicates: the rewind on every (re)connect re-delivers a few seconds of events. They are NOT
removed here: Jetstream is not strictly time-ordered, so a time_us high-water mark cannot tell a
re-delivered event from a late one, and a crash can leave a batch written but its successor not.
The batcher removes them by natural key (invariant 2 in docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidURI

from appliance import buffer, events, metrics
from appliance.config import Settings
from appliance.httpd import serve_probes
from appliance.ingest.frames import FrameConnection
from appliance.ingest.jetstream import (
    backoff_delay,
    display_url,
    subscribe_url,
)
from appliance.ingest.writer import Batch, Writer, redis_error_cause

log = logging.getLogger("appliance.ingest")

# A batch holding this many bytes of rejected frames is sealed early (they may be large).
DEAD_LETTER_SEAL_BYTES = 1 << 20
SAMPLE_INTERVAL_S = 2.0
SHUTDOWN_FLUSH_S = 10.0
# Frames the websocket library queues before it pauses reading the socket (its default; 256
# and 1024 measured no faster in `loadtest bench ingest`, and bound memory less tightly). The
# benchmark's bare client uses it; FrameConnection bypasses that queue and uses WS_HELD_BYTES.
WS_MAX_QUEUE = 16

_KIND_KEY = {events.IdentityEvent: "identity", events.AccountEvent: "account"}


class CursorError(ValueError):
    """The saved cursor in Redis is not a time_us; resuming from it would guess."""


class Ingester:
    """The ingester service; `await run()` until `stop()` (SIGTERM / SIGINT)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = buffer.connect(
            settings,
            socket_timeout=10,
            socket_connect_timeout=2,
            # We retry ourselves, with the circuit breaker; the library must fail fast.
            retry=Retry(NoBackoff(), 0),
        )
        self._open = Batch()
        self._generation = 0  # bumped on every seal
        self._received_max = 0  # highest valid time_us received (sealed batches)
        self._now_us = events.now_us()
        self._stopping = asyncio.Event()
        self.writer = Writer(
            settings,
            self.redis,
            open_events=lambda: self._open.size(),
            seal_open=self._seal,
            drop=self._drop,
        )

        self._reader: asyncio.Task[None] | None = None
        self._drop_cause = ""
        self._session = 0
        self._blocked = False  # the reader waits for the writer (not a stall)
        self._connected = False

        self.received_events = 0  # valid events sealed into batches

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading, flush what is held, exit (signal handler)."""
        if not self._stopping.is_set():
            log.info("stopping: flushing held events")
            self._stopping.set()
            self._drop("stop")

    async def run(self) -> int:
        """Serve until stopped; 0 when everything received was written, 1 otherwise."""
        s = self.settings
        metrics.ingest_lag.set_function(self._lag_seconds)
        metrics.ingest_held_events.set_function(lambda: self.writer.held_events + self._open.size())
        probes = await serve_probes(s.ingest_host, s.ingest_port, metrics.INGEST, self._ready)
        port = probes.sockets[0].getsockname()[1] if probes.sockets else s.ingest_port
        log.info(
            "ingester starting",
            extra={
                "probes": f"{s.ingest_host}:{port}",
                "urls": [display_url(u) for u in s.jetstream_urls],
                "wanted_collections": list(s.wanted_collections),
                "wanted_dids": len(s.wanted_dids),
                "entry_events": s.ingest_entry_events,
            },
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                if not await self._load_cursor():
                    return 0  # stopped before Redis ever answered; nothing was received
            except CursorError as exc:
                log.critical("cannot resume: %s; fix or delete the key", exc)
                return 2
            tasks = [
                asyncio.create_task(self.writer.run(), name="writer"),
                asyncio.create_task(self._tick_loop(), name="ticker"),
                asyncio.create_task(self._sample_loop(), name="sampler"),
            ]
            connection = asyncio.create_task(self._connection_loop(), name="connection")
            tasks.append(connection)
            stopping = asyncio.create_task(self._stopping.wait(), name="stopping")
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if stopping not in done:
                stopping.cancel()
                crashed = next(iter(done))
                log.critical(
                    "internal task ended unexpectedly",
                    exc_info=crashed.exception(),
                    extra={"task": crashed.get_name()},
                )
                return 1
            await connection
            self._seal()
            try:
                await asyncio.wait_for(self.writer.idle.wait(), SHUTDOWN_FLUSH_S)
            except TimeoutError:
                log.error(
                    "stopped with events not written; a restart re-fetches them from the cursor",
                    extra={"held_events": self.writer.held_events, "cursor": self.writer.cursor},
                )
                return 1
            log.info(
                "stopped",
                extra={
                    "cursor": self.writer.cursor,
                    "events_received": self.received_events,
                    "events_written": self.writer.written_events,
                },
            )
            return 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            probes.close()
            await self.redis.aclose()

    async def _load_cursor(self) -> bool:
        """Read the saved cursor, retrying (circuit open) while Redis does not answer."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                self.writer.cursor = await buffer.read_cursor(self.redis, self.settings)
            except (RedisError, OSError) as exc:
                attempt += 1
                metrics.ingest_redis_errors.labels(redis_error_cause(exc)).inc()
                self.writer.open_circuit(redis_error_cause(exc), exc)
                await self._sleep(backoff_delay(attempt, self.settings.reconnect_max_backoff_s))
                continue
            except ValueError as exc:
                raise CursorError(
                    f"{self.settings.cursor_key} does not hold a time_us integer: {exc}"
                ) from None
            if self.writer.cursor is not None and self.writer.cursor < events.MIN_TIME_US:
                raise CursorError(
                    f"{self.settings.cursor_key} = {self.writer.cursor} is not a time_us in µs"
                )
            if self.writer.circuit_open:
                self.writer.close_circuit()
            if self.writer.cursor is not None:
                metrics.ingest_cursor.set(self.writer.cursor)
                self._received_max = self.writer.cursor
            log.info("cursor loaded", extra={"cursor": self.writer.cursor})
            return True
        return False

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- websocket -----------------------------------------------------------------------------

    def _resume_us(self) -> int | None:
        """Highest time_us received so far (written or held), or the saved cursor at start."""
        best = max(self._received_max, self._open.max_time_us)
        return best or None

    async def _connection_loop(self) -> None:
        s = self.settings
        urls = s.jetstream_urls
        failures = 0
        index = 0
        rewind_us = int(s.cursor_rewind_s * 1_000_000)
        while not self._stopping.is_set():
            if self.writer.circuit_open:
                await self._wait_any(self.writer.circuit_closed)
                continue
            resume = self._resume_us()
            request = None if resume is None else resume - rewind_us
            base = urls[index % len(urls)]
            try:
                ws = await self._connect(subscribe_url(base, s, request))
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                failures += 1
                index += 1
                metrics.ingest_reconnects.labels("connect_failed").inc()
                delay = backoff_delay(failures, s.reconnect_max_backoff_s)
                log.warning(
                    "connect failed",
                    extra={
                        "url": display_url(base),
                        "error": f"{type(exc).__name__}: {exc}",
                        "retry_in_s": round(delay, 3),
                    },
                )
                await self._sleep(delay)
                continue
            if ws is None:
                return  # stopped while connecting
            if self.writer.circuit_open or self._stopping.is_set():
                await ws.close()
                continue
            log.info(
                "connected",
                extra={"url": display_url(base), "cursor": request, "resume_from": resume},
            )
            generation = self._generation
            cause = await self._run_session(ws, resume)
            delivered = self._generation != generation or self._open.size() > 0
            if cause == "stop":
                return
            metrics.ingest_reconnects.labels(cause).inc()
            if cause == "circuit":
                failures = 0
                continue  # reconnect as soon as the circuit closes
            if delivered and cause != "stall":
                failures = 0
            else:
                failures += 1
                index += 1  # fail over to the next URL
            delay = backoff_delay(max(failures, 1), s.reconnect_max_backoff_s)
            log.warning(
                "disconnected",
                extra={"url": display_url(base), "cause": cause, "retry_in_s": round(delay, 3)},
            )
            await self._sleep(delay)

    async def _connect(self, url: str) -> FrameConnection | None:
        """Open a websocket (a fresh URL each attempt); None if stopped meanwhile."""

        async def opening() -> FrameConnection:
            ws = await connect(
                url,
                # Larger than max_event_bytes, so an oversized frame is dead-lettered instead
                # of closing the connection with 1009.
                max_size=4 * self.settings.max_event_bytes,
                max_queue=WS_MAX_QUEUE,
                compression=None,
                open_timeout=10,
                close_timeout=2,
                user_agent_header="bluesky-appliance-ingester",
                create_connection=FrameConnection,
            )
            assert isinstance(ws, FrameConnection)
            return ws

        task = asyncio.create_task(opening())
        await self._wait_any(task)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        return task.result()

    async def _wait_any(self, event: asyncio.Event | asyncio.Task[Any]) -> None:
        """Wait for an event to be set (or a task to finish), or for stop."""
        first = event if isinstance(event, asyncio.Task) else asyncio.ensure_future(event.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([first, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if first is not event:
                first.cancel()

    async def _run_session(self, ws: FrameConnection, resume: int | None) -> str:
        """Read one connection until it closes or is dropped; return the cause."""
        self._drop_cause = ""
        self._session += 1
        self._connected = True
        metrics.ingest_connected.set(1)
        reader = asyncio.create_task(self._read(ws, resume), name="reader")
        self._reader = reader
        try:
            await asyncio.wait([reader])
        finally:
            self._reader = None
            self._connected = False
            metrics.ingest_connected.set(0)
            reader.cancel()
            await ws.close()
        if reader.cancelled():
            return self._drop_cause or "stop"
        exc = reader.exception()
        if isinstance(exc, ConnectionClosedOK):
            return "closed"
        if isinstance(exc, ConnectionClosed):
            log.warning("connection lost", extra={"error": str(exc)})
            return "closed"
        if exc is not None:
            raise exc
        return "closed"

    def _drop(self, cause: str) -> None:
        """Stop the current reader (stall, circuit, stop); the connection loop handles the rest."""
        if self._reader is not None and not self._reader.done():
            self._drop_cause = self._drop_cause or cause
            self._reader.cancel()

    async def _read(self, ws: FrameConnection, resume: int | None) -> None:
        """The hot loop: per frame only decode+validate and an append; per batch a seal."""
        recv_frames = ws.recv_frames
        decode = events.decode
        rejected = events.Rejected
        commit_type = events.CommitEvent
        kinds = _KIND_KEY
        max_bytes = self.settings.max_event_bytes
        per_entry = self.settings.ingest_entry_events
        first = resume is not None
        while True:
            received = await recv_frames()
            now = self._now_us
            # The open batch changes only here or in a task that runs while this one awaits, so
            # its parts are held in locals and top (its max_time_us) stored back before an await.
            batch = self._open
            frames, counts, top = batch.frames, batch.counts, batch.max_time_us
            for frame in received:
                try:
                    event = decode(frame, now, max_bytes)
                except rejected as exc:
                    batch.max_time_us = top
                    if self._hold_rejected(exc, frame) and self.writer.over_limit():
                        await self._wait_for_space()
                    batch = self._open
                    frames, counts, top = batch.frames, batch.counts, batch.max_time_us
                    continue
                t = event.time_us
                if first:
                    first = False
                    self._check_gap(resume, t)
                frames.append(frame)
                if t > top:
                    top = t
                key = event.commit.collection if type(event) is commit_type else kinds[type(event)]
                counts[key] = counts.get(key, 0) + 1
                if len(frames) >= per_entry:
                    batch.max_time_us = top
                    self._seal()
                    if self.writer.over_limit():
                        await self._wait_for_space()
                    batch = self._open
                    frames, counts, top = batch.frames, batch.counts, batch.max_time_us
            batch.max_time_us = top

    def _hold_rejected(self, exc: events.Rejected, frame: bytes) -> bool:
        """Keep a rejected frame for the dead-letter stream; True if the batch was sealed."""
        batch = self._open
        batch.dead.append((exc.reason, frame, exc.detail))
        batch.dead_bytes += len(frame)
        if batch.size() >= self.settings.ingest_entry_events or (
            batch.dead_bytes >= DEAD_LETTER_SEAL_BYTES
        ):
            self._seal()
            return True
        return False

    def _check_gap(self, resume: int | None, first_us: int) -> None:
        """Record a gap when the first event lies beyond the resume point by more than tolerated."""
        if resume is None:
            return
        ahead_s = (first_us - resume) / 1e6
        if ahead_s > self.settings.ingest_gap_tolerance_s:
            metrics.ingest_gaps.inc()
            metrics.ingest_gap_seconds.inc(ahead_s)
            log.warning(
                "gap: events between the cursor and the first event received are missing",
                extra={
                    "gap_from_time_us": resume,
                    "gap_to_time_us": first_us,
                    "gap_seconds": round(ahead_s, 3),
                },
            )

    async def _wait_for_space(self) -> None:
        self._blocked = True
        try:
            while self.writer.over_limit():
                self.writer.space.clear()
                await self.writer.space.wait()
        finally:
            self._blocked = False

    # --- batches and the writer ----------------------------------------------------------------

    def _seal(self) -> None:
        """Close the open batch and queue it for the writer."""
        batch = self._open
        if not batch.frames and not batch.dead:
            return
        self._open = Batch()
        self._generation += 1
        batch.nbytes = sum(map(len, batch.frames)) + batch.dead_bytes
        self.received_events += len(batch.frames)
        if batch.max_time_us > self._received_max:
            self._received_max = batch.max_time_us
        self.writer.queue(batch)

    # --- periodic work -------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        """Seal partial batches every ingest_flush_ms; detect a silent connection (stall)."""
        s = self.settings
        period = s.ingest_flush_ms / 1000
        last_sig: tuple[int, int, int] = (-1, -1, -1)
        last_progress = time.monotonic()
        while True:
            await asyncio.sleep(period)
            self._now_us = events.now_us()
            if self._open.size() and not self.writer.circuit_open:
                self._seal()
            now = time.monotonic()
            sig = (self._session, self._generation, self._open.size())
            if not self._connected or self._blocked or sig != last_sig:
                last_sig = sig
                last_progress = now
            elif now - last_progress >= s.stall_timeout_s:
                metrics.ingest_stalls.inc()
                log.warning(
                    "stall: no frame within the stall timeout; reconnecting",
                    extra={"stall_timeout_s": s.stall_timeout_s},
                )
                self._drop("stall")
                last_progress = now

    async def _sample_loop(self) -> None:
        """Sample XLEN (not per event) and log a progress line every ingest_log_interval_s."""
        s = self.settings
        last_log = time.monotonic()
        last_written = self.writer.written_events
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            length: int | None = None
            if not self.writer.circuit_open:
                try:
                    length = int(await self.redis.xlen(s.stream_key))
                    metrics.buffer_length.set(length)
                except (RedisError, OSError):
                    pass  # the writer notices and opens the circuit
            now = time.monotonic()
            if now - last_log >= s.ingest_log_interval_s:
                rate = (self.writer.written_events - last_written) / (now - last_log)
                log.info(
                    "progress",
                    extra={
                        "events_written": self.writer.written_events,
                        "events_per_s": round(rate, 1),
                        "dead_letters": self.writer.dead_letters,
                        "cursor": self.writer.cursor,
                        "lag_s": round(self._lag_seconds(), 3),
                        "buffer_entries": length,
                        "held_events": self.writer.held_events + self._open.size(),
                        "connected": self._connected,
                        "circuit_open": self.writer.circuit_open,
                    },
                )
                last_log, last_written = now, self.writer.written_events

    def _lag_seconds(self) -> float:
        newest = self._resume_us()
        return max(0.0, (events.now_us() - newest) / 1e6) if newest else 0.0

    async def _ready(self) -> tuple[bool, dict[str, object]]:
        try:
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        details: dict[str, object] = {
            "redis": redis_ok,
            "websocket": self._connected,
            "circuit_open": self.writer.circuit_open,
            "cursor": self.writer.cursor,
        }
        return redis_ok and self._connected, details
