"""What bounds a request's query: a timer that interrupts its cursor (`Guard`), and the small
result cache (`LRU`)."""

from __future__ import annotations

import collections
import threading
from typing import Any

import duckdb

from appliance import metrics
from appliance.query.model import QueryTimeout


class LRU:
    """A small thread-safe LRU map (the result cache); size 0 disables it."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class Guard:
    """Interrupts a cursor's running query once `seconds` have passed.

    A query that finishes in the same instant the timer fires still counts as timed out, so a
    request never outlives its timeout by racing the interrupt.
    """

    def __init__(self, cur: duckdb.DuckDBPyConnection, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._cur = cur
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._cur.interrupt()

    def __enter__(self) -> Guard:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self._timer.cancel()
        if self.fired or isinstance(exc, duckdb.InterruptException):
            metrics.api_query_timeouts.inc()
            raise QueryTimeout(f"query interrupted after {self.seconds:g} s") from exc
