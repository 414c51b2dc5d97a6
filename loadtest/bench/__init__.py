"""Benchmarks: `loadtest bench NAME` imports loadtest.bench.NAME and calls its `run(args)`.

A benchmark module has `add_arguments(parser)` (optional) and `run(args) -> dict`; it prints
readable lines as it goes, and the CLI prints the returned figures as one JSON object on the
last line of stdout. Figures are measured, never asserted.
"""

from __future__ import annotations

import os
import socket
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))])


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size (VmHWM) of a process, in MiB; this process by default."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc status")


def rss_mb(pid: int | None = None) -> float:
    """Current resident set size (VmRSS) of a process, in MiB."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc status")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
