"""What a replay watches while it runs: one sample a second of the services' /metrics, Redis
(memory, stream length, pending entries) and every process's RSS and CPU (from /proc), kept for
the report's charts; and the live progress display (rich when available and on a terminal,
otherwise a line every few seconds)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import redis
from prometheus_client.parser import text_string_to_metric_families

from loadtest.replay.stack import Stack, http_get


class Sample(msgspec.Struct):
    t: float  # seconds since the replay started
    received: float = 0.0  # frames the ingester wrote to Redis (valid + dead-lettered)
    stored: float = 0.0  # events the batcher wrote to Parquet
    lag_s: float = 0.0  # the ingester's: wall clock minus the newest time_us (a replay's is old)
    buffer_age_s: float = 0.0  # the batcher's oldest unacknowledged entry: seconds it has waited
    cursor_us: float = 0.0
    circuit_open: float = 0.0
    reconnects: float = 0.0
    stalls: float = 0.0
    redis_memory: float = 0.0
    stream_entries: float = 0.0
    pending: float = 0.0
    batches: float = 0.0
    batch_failures: float = 0.0
    batch_last_success: float = 0.0
    compactions: float = 0.0
    rss: dict[str, int] = msgspec.field(default_factory=dict)
    cpu: dict[str, float] = msgspec.field(default_factory=dict)


COUNTERS = (
    "received",
    "stored",
    "reconnects",
    "stalls",
    "batches",
    "batch_failures",
    "compactions",
)


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {sample name: sum over its label sets} ({} if it does not answer)."""
    try:
        status, body = http_get(url, timeout=3)
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class Monitor:
    """Samples the stack once a second in a thread; `latest` is the newest sample."""

    def __init__(self, stack: Stack, interval_s: float = 1.0) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._redis = stack.redis()
        self._last: dict[str, dict[str, float]] = {"ingester": {}, "batcher": {}}
        # A restarted service's counters start again from 0: keep totals over incarnations.
        self._base: dict[str, float] = {}
        self._prev: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(30)
        self._redis.close()

    @property
    def latest(self) -> Sample:
        return self.samples[-1] if self.samples else Sample(t=0.0)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.take())
            self.stop.wait(self.interval_s)

    def metrics(self, name: str) -> dict[str, float]:
        """The service's metrics now, or the last ones seen while it is down (counters stay)."""
        values = scrape(self.stack.url(name, "/metrics"))
        if values:
            self._last[name] = values
        return self._last[name]

    def _total(self, name: str, value: float) -> float:
        with self._lock:
            if value < self._prev.get(name, 0.0):
                self._base[name] = self._base.get(name, 0.0) + self._prev[name]
            self._prev[name] = value
            return self._base.get(name, 0.0) + value

    def take(self, usage: bool = True) -> Sample:
        """A sample now; without `usage` (the faults' frequent polls) no /proc scan."""
        ing, bat = self.metrics("ingester"), self.metrics("batcher")
        sample = Sample(
            t=time.monotonic() - self.started,
            received=ing.get("appliance_ingest_events_total", 0.0)
            + ing.get("appliance_ingest_dead_letters_total", 0.0),
            stored=bat.get("appliance_batch_events_total", 0.0),
            lag_s=ing.get("appliance_ingest_lag_seconds", 0.0),
            cursor_us=ing.get("appliance_ingest_cursor_time_us", 0.0),
            buffer_age_s=bat.get("appliance_batch_oldest_unacked_age_seconds", 0.0),
            circuit_open=ing.get("appliance_ingest_circuit_open", 0.0),
            reconnects=ing.get("appliance_ingest_reconnects_total", 0.0),
            stalls=ing.get("appliance_ingest_stalls_total", 0.0),
            batches=bat.get("appliance_batch_batches_total", 0.0),
            batch_failures=bat.get("appliance_batch_failures_total", 0.0),
            batch_last_success=bat.get("appliance_batch_last_success_timestamp_seconds", 0.0),
            compactions=bat.get("appliance_compact_runs_total", 0.0),
        )
        for name in COUNTERS:
            setattr(sample, name, self._total(name, getattr(sample, name)))
        s = self.stack.settings
        with contextlib.suppress(redis.RedisError):
            info = self._redis.info("memory")
            sample.redis_memory = float(info["used_memory"])
            sample.stream_entries = float(self._redis.xlen(s.stream_key))
            sample.pending = float(self._redis.xpending(s.stream_key, s.consumer_group)["pending"])
        for name, (rss, cpu) in (self.stack.sample_usage() if usage else {}).items():
            sample.rss[name] = rss
            sample.cpu[name] = cpu
        return sample


def _rate(samples: list[Sample], field: str, window_s: float = 10.0) -> float:
    if len(samples) < 2:
        return 0.0
    last = samples[-1]
    first = next((s for s in samples if s.t >= last.t - window_s), samples[0])
    dt = last.t - first.t
    return (getattr(last, field) - getattr(first, field)) / dt if dt > 0 else 0.0


def status(monitor: Monitor, total: int, faults: str) -> dict[str, Any]:
    """The figures the progress display shows."""
    s = monitor.latest
    rate = _rate(monitor.samples, "stored")
    left = max(total - s.stored, 0)
    return {
        "received": s.received,
        "buffered": s.stream_entries,
        "stored": s.stored,
        "rate": rate,
        "received_rate": _rate(monitor.samples, "received"),
        "buffer_age_s": s.buffer_age_s,
        "redis_mb": s.redis_memory / 2**20,
        "pending": s.pending,
        "batches": s.batches,
        "compactions": s.compactions,
        "faults": faults,
        "eta_s": left / rate if rate > 0 else None,
        "elapsed_s": s.t,
    }


def _line(total: int, st: dict[str, Any]) -> str:
    eta = f"{st['eta_s']:.0f} s" if st["eta_s"] is not None else "?"
    return (
        f"[{st['elapsed_s']:6.0f} s] received {st['received']:,.0f} "
        f"({st['received_rate']:,.0f}/s)  stored {st['stored']:,.0f}/{total:,} "
        f"({st['rate']:,.0f}/s)  buffered {st['buffered']:,.0f} entries  pending "
        f"{st['pending']:,.0f}  redis {st['redis_mb']:,.0f} MB  oldest unstored {st['buffer_age_s']:,.0f} s  "
        f"batches {st['batches']:,.0f}  compactions {st['compactions']:,.0f}  "
        f"faults {st['faults']}  ETA {eta}"
    )


@contextlib.contextmanager
def progress(
    monitor: Monitor, total: int, faults: Callable[[], str], live: bool | None = None
) -> Iterator[Callable[[], None]]:
    """A callable that refreshes the display; rich's live table on a terminal, else log lines."""
    use_rich = sys.stdout.isatty() if live is None else live
    console_live: Any = None
    if use_rich:
        try:
            from rich.live import Live
            from rich.table import Table
        except ImportError:  # the optional `loadtest` extra is not installed
            use_rich = False
    last_line = [0.0]

    def render() -> Any:
        st = status(monitor, total, faults())
        table = Table(title="loadtest replay", show_header=False)
        eta = f"{st['eta_s']:.0f} s" if st["eta_s"] is not None else "?"
        rows = [
            ("elapsed", f"{st['elapsed_s']:.0f} s    ETA {eta}"),
            ("received (ingester)", f"{st['received']:,.0f}   {st['received_rate']:,.0f}/s"),
            ("stored (Parquet)", f"{st['stored']:,.0f} / {total:,}   {st['rate']:,.0f}/s"),
            ("buffered (stream entries)", f"{st['buffered']:,.0f}   pending {st['pending']:,.0f}"),
            ("oldest entry not yet stored", f"{st['buffer_age_s']:,.1f} s ago"),
            ("Redis memory", f"{st['redis_mb']:,.1f} MB"),
            ("batches / compactions", f"{st['batches']:,.0f} / {st['compactions']:,.0f}"),
            ("faults injected", st["faults"] or "none"),
        ]
        for key, value in rows:
            table.add_row(key, value)
        return table

    def refresh() -> None:
        if console_live is not None:
            console_live.update(render())
        elif time.monotonic() - last_line[0] >= 5:
            last_line[0] = time.monotonic()
            print(_line(total, status(monitor, total, faults())), flush=True)

    if use_rich:
        with Live(render(), refresh_per_second=2) as console_live:
            yield refresh
    else:
        yield refresh
