"""The ingester's Redis side: sealed micro-batches queued, written to the stream in MULTI/EXEC
round trips with the cursor, retried behind a circuit breaker while Redis refuses them, and
accounted in metrics once they are safely in Redis.

The reader (`ingester.Ingester`) seals batches and queues them here; it waits while `held` data
is over its bound. The writer never touches the websocket: when the circuit opens it asks the
reader to drop its connection, and after a retried write it has the reader seal the batch that
was open meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance import buffer, metrics
from appliance.config import Settings
from appliance.ingest.jetstream import backoff_delay, display_url

log = logging.getLogger("appliance.ingest")

# Held (sealed, unwritten) data is bounded by events and by bytes; the reader waits beyond it.
HELD_BYTES_LIMIT = 64 << 20
# Collections labelled by name on the events metric (others are "other"): bounded cardinality.
LABELLED_PREFIXES = ("app.bsky.", "chat.bsky.")
MAX_LABELLED_COLLECTIONS = 200


def redis_error_cause(exc: BaseException) -> str:
    """The `cause` label of a failed Redis write."""
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        return "connection"
    return "other"


class Batch:
    """One micro-batch: the frames of one stream entry, plus what was rejected meanwhile."""

    __slots__ = ("counts", "dead", "dead_bytes", "frames", "max_time_us", "nbytes")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.max_time_us = 0
        # events per collection (commits) or per kind (identity, account)
        self.counts: dict[str, int] = {}
        self.dead: list[tuple[str, bytes, str]] = []  # (reason, frame, detail)
        self.dead_bytes = 0
        self.nbytes = 0  # all frames, set when sealed

    def size(self) -> int:
        return len(self.frames) + len(self.dead)


class Writer:
    """Writes the reader's sealed batches to Redis, in order, until each is accepted.

    `open_events` tells how many events the reader holds in its open batch, `seal_open` seals
    it, `drop` drops the reader's connection (with a cause): the three ways the writer reaches
    the reader.
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        open_events: Callable[[], int],
        seal_open: Callable[[], None],
        drop: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self._open_events = open_events
        self._seal_open = seal_open
        self._drop = drop
        self.pending: collections.deque[Batch] = collections.deque()
        self.held_events = 0  # in sealed batches, pending or being written
        self.held_bytes = 0
        self.held_limit = max(2 * settings.ingest_pipeline_events, 4 * settings.ingest_entry_events)
        self.cursor: int | None = None  # saved in Redis: highest time_us written
        self.wake = asyncio.Event()  # the writer has work
        self.space = asyncio.Event()  # the reader may go on
        self.idle = asyncio.Event()  # nothing held
        self.idle.set()
        self.circuit_open = False
        self.circuit_closed = asyncio.Event()
        self.circuit_closed.set()
        self._circuit_since = 0.0
        self._counters: dict[str, Any] = {}
        self._labelled: set[str] = set()
        self.written_events = 0
        self.dead_letters = 0

    def queue(self, batch: Batch) -> None:
        """Hold a sealed batch until it is written."""
        self.held_events += batch.size()
        self.held_bytes += batch.nbytes
        self.pending.append(batch)
        self.idle.clear()
        self.wake.set()

    def over_limit(self) -> bool:
        return self.held_events >= self.held_limit or self.held_bytes >= HELD_BYTES_LIMIT

    def _take(self) -> list[Batch]:
        """Sealed batches for one round trip: at least one, up to ingest_pipeline_events events."""
        take = [self.pending.popleft()]
        n = take[0].size()
        limit = self.settings.ingest_pipeline_events
        while self.pending and n + self.pending[0].size() <= limit:
            batch = self.pending.popleft()
            n += batch.size()
            take.append(batch)
        return take

    async def run(self) -> None:
        """The writer task: write whatever is queued, forever."""
        while True:
            if not self.pending:
                if self.circuit_open:
                    self.close_circuit()
                if self._open_events() == 0:
                    self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                continue
            take = self._take()
            await self._write_until_done(take)
            if self.circuit_open:
                self._seal_open()  # the batch the reader had open when the circuit opened

    async def _write_until_done(self, take: list[Batch]) -> None:
        """Write batches, retrying with backoff (circuit open) until Redis accepts them."""
        attempt = 0
        while True:
            try:
                cursor = await self._write(take)
                break
            except (RedisError, OSError) as exc:
                attempt += 1
                cause = redis_error_cause(exc)
                metrics.ingest_redis_errors.labels(cause).inc()
                self.open_circuit(cause, exc)
                delay = backoff_delay(attempt, self.settings.reconnect_max_backoff_s)
                if attempt & (attempt - 1) == 0 and attempt > 1:  # 2, 4, 8, ...: not every retry
                    log.warning(
                        "Redis write still failing",
                        extra={
                            "cause": cause,
                            "attempt": attempt,
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "retry_in_s": round(delay, 3),
                        },
                    )
                await asyncio.sleep(delay)
        self.cursor = cursor
        if cursor is not None:
            metrics.ingest_cursor.set(cursor)
        self._account(take)
        self.space.set()

    async def _write(self, take: Sequence[Batch]) -> int | None:
        """One MULTI/EXEC: dead letters, one entry per batch, the cursor. Returns the cursor.

        The cursor is SET once, with the last entry (queue_append); SETs for the entries before
        it would be overwritten in the same transaction anyway, and with one event per entry
        they would double the commands.
        """
        s = self.settings
        cursor = self.cursor
        source = self._source
        last = next((b for b in reversed(take) if b.frames), None)
        pipe = self.redis.pipeline(transaction=True)
        for batch in take:
            for reason, frame, detail in batch.dead:
                buffer.queue_dead_letter(pipe, s, reason, frame, source, detail)
            if not batch.frames:
                continue
            if cursor is None or batch.max_time_us > cursor:
                cursor = batch.max_time_us
            if batch is last:
                buffer.queue_append(pipe, s, batch.frames, cursor)
            else:
                pipe.xadd(s.stream_key, buffer.pack(batch.frames))  # type: ignore[arg-type]
        await pipe.execute()
        return cursor

    @property
    def _source(self) -> str:
        return ",".join(display_url(u) for u in self.settings.jetstream_urls)

    def _account(self, take: Sequence[Batch]) -> None:
        """Metrics for batches now safely in Redis (per round trip, not per event or entry)."""
        totals: dict[str, int] = {}
        nbytes = 0
        for batch in take:
            self.held_events -= batch.size()
            nbytes += batch.nbytes
            self.written_events += len(batch.frames)
            for key, n in batch.counts.items():
                totals[key] = totals.get(key, 0) + n
            for reason, frame, detail in batch.dead:
                self.dead_letters += 1
                metrics.ingest_dead_letters.labels(reason).inc()
                if self.dead_letters <= 10 or self.dead_letters % 10_000 == 0:
                    log.warning(
                        "frame dead-lettered",
                        extra={
                            "reason": reason,
                            "detail": detail[:200],
                            "bytes": len(frame),
                            "dead_letters": self.dead_letters,
                        },
                    )
        self.held_bytes -= nbytes
        metrics.ingest_bytes.inc(nbytes)
        counters = self._counters
        for key, n in totals.items():
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = self._events_counter(key)
            counter.inc(n)

    def _events_counter(self, key: str) -> Any:
        if key in ("identity", "account"):
            return metrics.ingest_events.labels(key, "none")
        label = "other"
        if key.startswith(LABELLED_PREFIXES) and (
            key in self._labelled or len(self._labelled) < MAX_LABELLED_COLLECTIONS
        ):
            self._labelled.add(key)
            label = key
        return metrics.ingest_events.labels("commit", label)

    # --- circuit breaker -----------------------------------------------------------------------

    def open_circuit(self, cause: str, exc: BaseException) -> None:
        if self.circuit_open:
            return
        self.circuit_open = True
        self._circuit_since = time.monotonic()
        self.circuit_closed.clear()
        metrics.ingest_circuit_open.set(1)
        metrics.ingest_circuit_transitions.labels("open").inc()
        log.warning(
            "circuit open: Redis refuses writes; websocket reading paused",
            extra={
                "cause": cause,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "held_events": self.held_events + self._open_events(),
            },
        )
        self._drop("circuit")

    def close_circuit(self) -> None:
        if not self.circuit_open:
            return
        self.circuit_open = False
        metrics.ingest_circuit_open.set(0)
        metrics.ingest_circuit_transitions.labels("closed").inc()
        log.info(
            "circuit closed: Redis accepts writes again; resuming from the cursor",
            extra={
                "open_seconds": round(time.monotonic() - self._circuit_since, 3),
                "cursor": self.cursor,
            },
        )
        self.circuit_closed.set()
