"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
