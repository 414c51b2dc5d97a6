"""Admission control: how many queries a worker runs at once, how many may wait, and a 503 beyond.

Each API worker runs at most `api_max_running` engine calls at once (the worker's query thread
pool has that many threads, plus one kept for /ready). A request that finds them all busy waits
in a bounded queue (`api_max_waiting`) for at most `api_max_wait_s`; past either bound it is
answered at once with 503 and a `Retry-After` (seconds, from the queue length and the recent
query times), instead of a 504 after the query timeout. Probes (/health, /ready, /metrics) never
queue here. The rows of an export that has started are fetched in the same slots but never
refused: its headers are out.
"""

from __future__ import annotations

import asyncio
import collections
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from sanic import HTTPResponse, Request

from appliance import metrics
from appliance.api.http import json_response, request_id
from appliance.api.models import ErrorResponse
from appliance.config import Settings
from appliance.query.model import Busy

T = TypeVar("T")


class Overloaded(Exception):
    """The worker is saturated: HTTP 503 with Retry-After."""

    def __init__(self, retry_after: int, detail: str) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.detail = detail


class Admission:
    """Bounded slots and a bounded, time-limited queue for one worker's engine calls."""

    def __init__(self, running: int, waiting: int, max_wait_s: float) -> None:
        self.running_limit = running
        self.waiting_limit = waiting
        self.max_wait_s = max_wait_s
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(running)
        self._recent: collections.deque[float] = collections.deque(maxlen=64)

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        return cls(settings.api_max_running, settings.api_max_waiting, settings.api_max_wait_s)

    def retry_after(self) -> int:
        """Seconds until the queue ahead has likely drained: waiting calls x recent median
        call time / slots, at least 1."""
        typical = statistics.median(self._recent) if self._recent else 1.0
        return max(1, math.ceil((self.waiting + 1) * typical / self.running_limit))

    async def run(
        self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, refuse: bool = True
    ) -> T:
        """Run fn(*args) in the pool once a slot is free; with `refuse`, raise Overloaded when
        the queue is full or the wait would pass max_wait_s."""
        if refuse and self.running >= self.running_limit and self.waiting >= self.waiting_limit:
            metrics.api_rejected.labels("queue_full").inc()
            raise Overloaded(self.retry_after(), f"{self.waiting} queries already waiting")
        self.waiting += 1
        metrics.api_waiting.inc()
        try:
            if refuse:
                await asyncio.wait_for(self._slots.acquire(), self.max_wait_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            metrics.api_rejected.labels("wait").inc()
            raise Overloaded(
                self.retry_after(), f"no query slot free within {self.max_wait_s:g} s"
            ) from None
        finally:
            self.waiting -= 1
            metrics.api_waiting.dec()
        self.running += 1
        began = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))
        finally:
            self._recent.append(time.perf_counter() - began)
            self.running -= 1
            self._slots.release()


async def admitted(
    request: Request, fn: Callable[..., T], *args: Any, refuse: bool = True, **kwargs: Any
) -> T:
    """Run a blocking engine call through the worker's admission control."""
    admission: Admission = request.app.ctx.admission
    return await admission.run(request.app.ctx.pool, partial(fn, *args, **kwargs), refuse=refuse)


async def on_overloaded(request: Request, exc: Exception) -> HTTPResponse:
    """503 with Retry-After, as JSON like every other error."""
    if isinstance(exc, Busy):  # the engine's long-scan lane stayed taken
        admission: Admission = request.app.ctx.admission
        retry, detail = admission.retry_after(), str(exc)
        metrics.api_rejected.labels("long_scan").inc()
    elif isinstance(exc, Overloaded):
        retry, detail = exc.retry_after, exc.detail
    else:
        raise exc
    body = ErrorResponse(
        error="overloaded",
        detail=f"{detail}; retry after {retry} s",
        parameter=None,
        request_id=request_id(request),
    )
    return json_response(body, status=503, headers={"Retry-After": str(retry)})


def pool_threads(settings: Settings) -> int:
    """Threads of a worker's query pool: one per slot, and one for /ready's ping."""
    return settings.api_max_running + 1
