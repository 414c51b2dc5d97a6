"""Seeded, reproducible faults: `--faults kill-ingester:5,kill-batcher:5,kill-redis:2,kill-api:2,
stall:3,drop:3,bad-frames:0.001,redis-oom:1,disk-full:1`.

Each fault is placed at a point of the replay's progress drawn from `random.Random(seed)`:

- `kill-<process>:N`: kill -9 the ingester, batcher, redis-server or API and start it again;
- `stall:N`, `drop:N`: the replay server sends nothing for longer than the ingester's stall
  timeout, or aborts the TCP connection, before the event at that position (its test hooks);
- `bad-frames:F`: that fraction of the source's frames is malformed (the generator renders them,
  so the ground truth knows each one and its reject reason);
- `redis-oom:N`: Redis's maxmemory is squeezed below its use until the ingester's circuit
  opens, then restored;
- `disk-full:N`: the data directory (a tmpfs mounted for the replay) is filled until the batcher
  fails a batch loudly, then freed.

The injector fires one fault at a time, in order, and times how long the pipeline takes to
recover from each (process ready again and data moving again); stalls and drops fire in the
server, and are timed from the server's log line to the moment the ingester's cursor moves on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import redis

from loadtest.replay.monitor import Monitor
from loadtest.replay.stack import Stack, http_get

COUNTED = (
    "kill-ingester",
    "kill-batcher",
    "kill-redis",
    "kill-api",
    "stall",
    "drop",
    "redis-oom",
    "disk-full",
)
KINDS = (*COUNTED, "bad-frames")
ALL_FAULTS = (
    "kill-ingester:5,kill-batcher:5,kill-redis:2,kill-api:2,stall:3,drop:3,"
    "bad-frames:0.001,redis-oom:1,disk-full:1"
)
RECOVERY_TIMEOUT_S = 300.0
# Faults fire between these fractions of the replay's progress.
EARLIEST, LATEST = 0.08, 0.85


class FaultSpec(msgspec.Struct, frozen=True):
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    bad_frames: float = 0.0

    @property
    def empty(self) -> bool:
        return not any(self.counts.values()) and not self.bad_frames


def parse_faults(text: str) -> FaultSpec:
    """`kind:value,...`; 'all' is every kind (the issue's standard mix)."""
    if not text:
        return FaultSpec()
    if text == "all":
        text = ALL_FAULTS
    counts: dict[str, int] = {}
    bad = 0.0
    for part in text.split(","):
        kind, sep, value = part.strip().partition(":")
        if kind not in KINDS:
            raise ValueError(f"--faults: unknown fault {kind!r} (known: {', '.join(KINDS)})")
        if not sep:
            raise ValueError(f"--faults: {kind} needs a value ({kind}:N)")
        try:
            if kind == "bad-frames":
                bad = float(value)
                if not 0.0 <= bad <= 0.5:
                    raise ValueError
            else:
                counts[kind] = int(value)
                if not 0 <= counts[kind] <= 100:
                    raise ValueError
        except ValueError:
            limit = "a fraction in [0, 0.5]" if kind == "bad-frames" else "a count in 0..100"
            raise ValueError(f"--faults: {kind}:{value!r} is not {limit}") from None
    return FaultSpec(counts, bad)


class Planned(msgspec.Struct, frozen=True):
    kind: str
    at: float  # fraction of the replay's progress


def plan(spec: FaultSpec, seed: int) -> list[Planned]:
    """Every counted fault at a seeded point of progress, in order."""
    rng = random.Random(f"faults-{seed}")
    out = [
        Planned(kind, round(rng.uniform(EARLIEST, LATEST), 4))
        for kind in COUNTED
        for _ in range(spec.counts.get(kind, 0))
    ]
    return sorted(out, key=lambda p: (p.at, p.kind))


def server_positions(planned: list[Planned], kind: str, events: int) -> list[int]:
    return sorted({int(p.at * events) for p in planned if p.kind == kind})


class Injected(msgspec.Struct):
    kind: str
    at: float  # planned fraction of progress
    injected_s: float  # seconds since the replay started
    recovered: bool = False
    recovery_s: float | None = None  # from injection until ready and moving again
    detail: str = ""


class Injector:
    """Fires the planned process, Redis and disk faults as progress passes their point."""

    def __init__(
        self,
        stack: Stack,
        monitor: Monitor,
        planned: list[Planned],
        progress: Callable[[], float],
        finished: Callable[[], bool],
        drained: Callable[[], bool],
        filler_dir: Path | None,
        frames: int = 0,
    ) -> None:
        self.stack, self.monitor = stack, monitor
        self.queue = [p for p in planned if p.kind not in ("stall", "drop")]
        self.server_faults = {k: sum(p.kind == k for p in planned) for k in ("stall", "drop")}
        self.progress, self.finished, self.drained = progress, finished, drained
        self.filler_dir = filler_dir
        self.frames = frames  # the source's, to place a server fault's position in progress
        self.done: list[Injected] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="faults", daemon=True)
        self._server_log = stack.logs / "server.log"
        self._server_log_offset = 0

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(RECOVERY_TIMEOUT_S + 60)

    @property
    def pending(self) -> int:
        return len(self.queue)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.done:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return ", ".join(f"{k} {n}" for k, n in counts.items())

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._watch_server()
            if self.queue and self.progress() >= self.queue[0].at:
                planned = self.queue.pop(0)
                try:
                    self.done.append(self._inject(planned))
                except Exception as exc:  # a failed injection is a finding: report it
                    self.errors.append(f"{planned.kind}: {type(exc).__name__}: {exc}")
            self.stop.wait(0.2)

    def _now(self) -> float:
        return time.monotonic() - self.monitor.started

    def _moving(self, cursor0: float) -> bool:
        s = self.monitor.take(usage=False)
        return s.cursor_us > cursor0 or self.finished()

    def _wait(self, condition: Callable[[], bool], timeout_s: float = RECOVERY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, redis.RedisError):
                if condition():
                    return True
            time.sleep(0.1)
        return False

    def _ready(self, name: str) -> bool:
        return http_get(self.stack.url(name, "/ready"), timeout=2)[0] == 200

    def _inject(self, planned: Planned) -> Injected:
        fault = Injected(planned.kind, planned.at, self._now())
        began = time.monotonic()
        cursor0 = self.monitor.take(usage=False).cursor_us
        kind = planned.kind
        if kind.startswith("kill-"):
            name = {"kill-redis": "redis", "kill-api": "api"}.get(kind, kind[5:])
            with self.stack.lock:
                self.stack.kill(name)
                self.stack.restart(name)
            if name == "api":
                ok = self._wait(lambda: self._ready("api"))
            elif name == "batcher":
                t_kill = time.time()
                ok = self._wait(
                    lambda: (
                        self._ready("batcher")
                        and (
                            self.monitor.take(usage=False).batch_last_success > t_kill
                            or self.drained()
                        )
                    )
                )
            else:  # the ingester, or Redis (the ingester's circuit closes, data flows again)
                ok = self._wait(
                    lambda: self._ready("ingester") and self._moving(cursor0)
                    and not self.monitor.take(usage=False).circuit_open
                )  # fmt: skip
        elif kind == "redis-oom":
            ok = self._redis_oom(fault, cursor0)
        elif kind == "disk-full":
            ok = self._disk_full(fault)
        else:
            raise ValueError(kind)
        fault.recovered = ok
        fault.recovery_s = round(time.monotonic() - began, 2) if ok else None
        return fault

    def _redis_oom(self, fault: Injected, cursor0: float) -> bool:
        client = self.stack.redis()
        try:
            original = str(client.config_get("maxmemory")["maxmemory"])
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", max(used // 2, 1 << 20))
            opened = self._wait(lambda: self.monitor.take(usage=False).circuit_open > 0, 120)
            fault.detail = f"maxmemory {max(used // 2, 1 << 20)} (was {original}); " + (
                "circuit opened" if opened else "circuit did not open in 120 s"
            )
            client.config_set("maxmemory", original)
        finally:
            client.close()
        return opened and self._wait(
            lambda: not self.monitor.take(usage=False).circuit_open and self._moving(cursor0)
        )

    def _disk_full(self, fault: Injected) -> bool:
        if self.filler_dir is None:
            raise RuntimeError("disk-full needs the data directory on its own tmpfs")
        filler = self.filler_dir / "filler"
        failures0 = self.monitor.take(usage=False).batch_failures
        began = time.monotonic()
        size = fill(filler)
        fill_s = time.monotonic() - began
        failed = self._wait(lambda: self.monitor.take(usage=False).batch_failures > failures0, 180)
        freed_at = time.time()
        full_s = time.monotonic() - began - fill_s
        filler.unlink()
        fault.detail = f"filled {size:,} bytes in {fill_s:.1f} s; " + (
            f"the batcher failed loudly; freed {full_s:.1f} s later"
            if failed
            else "no batch failed within 180 s"
        )
        return failed and self._wait(
            lambda: self.monitor.take(usage=False).batch_last_success > freed_at or self.drained()
        )

    def _watch_server(self) -> None:
        """Stalls and drops fire in the server: time each from its log line until data moves."""
        try:
            with open(self._server_log, "rb") as fh:
                fh.seek(self._server_log_offset)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._server_log_offset += end
        for line in data[:end].splitlines():
            for kind in ("stall", "drop"):
                if f"hook: {kind}".encode() in line:
                    detail = line.decode().split("hook: ")[1]
                    position = detail.rsplit("position ", 1)[-1].split()[0]
                    at = int(position) / self.frames if position.isdigit() and self.frames else 0.0
                    fault = Injected(kind, round(at, 4), self._now(), detail=detail)
                    began, cursor0 = time.monotonic(), self.monitor.take(usage=False).cursor_us
                    fault.recovered = self._wait(functools.partial(self._moving, cursor0))
                    if fault.recovered:
                        fault.recovery_s = round(time.monotonic() - began, 2)
                    self.done.append(fault)


def fill(path: Path) -> int:
    """Allocate a file at `path` until the volume has no room left; returns its size. It grows
    in steps, halved when one does not fit: one allocation of all the free space fails whenever
    the batcher writes meanwhile, and each failed try on a tmpfs allocates and frees it all."""
    size, step = 0, 64 << 20
    with open(path, "wb") as fh:
        while step >= 4096:
            try:
                os.posix_fallocate(fh.fileno(), size, step)
                size += step
            except OSError:
                step //= 2
    return size


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of that size at `path` for the replay (disk-full needs a volume to fill)."""
    if os.geteuid() != 0:
        raise PermissionError(
            "--faults disk-full mounts a tmpfs as the data directory: run as root"
        )
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
