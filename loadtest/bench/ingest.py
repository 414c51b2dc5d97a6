"""Ingester throughput: events/s draining the replay server into a real redis-server.

Starts a redis-server (our redis.conf, temp dir, random password) and the replay server
(`loadtest serve --preload --speed max`) once, then for each repeat and each micro-batch size:

(a) a bare websocket client (a subprocess, same loop and options as the ingester) that only
    receives all N frames: events/s from its first frame to its last;
(b) the ingester (`appliance ingest`, a subprocess) draining the same N events into an empty
    Redis: events/s from the first cursor it saves to the cursor of the last event, by polling
    the cursor; its peak RSS (VmHWM) and CPU time per event.

The figure is the ratio (b)/(a), medians over the repeats. Figures are printed, never asserted.

`--baseline DIR` also runs, in each repeat right after (b), the ingester of another source tree
(DIR holds its `appliance` package, e.g. `git archive <commit> appliance | tar -x -C DIR`) on the
same servers, so that a change is compared with what it replaces in one session on this shared
machine, alternating, rather than across runs minutes apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import redis

from appliance.config import Settings, load_settings, to_environ
from appliance.ingest.command import event_loop_factory
from appliance.ingest.ingester import WS_MAX_QUEUE
from appliance.redis_server import start_redis
from appliance.store.layout import DAY_US
from loadtest.bench import median, peak_rss_mb
from loadtest.firehose import FirehoseConfig, time_at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=1_000_000, help="events to replay")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--entry-events",
        default="100,1",
        help="micro-batch sizes to compare, comma-separated (the first is the headline)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the ingester of the `appliance` package in DIR (an older commit), "
        "alternating with this one, for the headline micro-batch size",
    )


# Runs `python -m appliance ...` from the source tree in argv[1] instead of the installed package
# (first on sys.path, before the working directory), and makes sure that it did.
_BASELINE_LAUNCHER = """
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
import appliance
if not appliance.__file__.startswith(src):
    sys.exit(f"baseline: appliance imported from {appliance.__file__}, not from {src}")
sys.argv = ["appliance", *sys.argv[2:]]
runpy.run_module("appliance", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_replay(
    port: int, events: int, seed: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`loadtest serve --preload --speed max`; returns once it prints its URL."""
    cmd = [sys.executable, "-m", "loadtest", "serve", "--port", str(port)]
    cmd += ["--events", str(events), "--seed", str(seed), "--speed", "max", "--preload"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"replay server exited with {proc.wait()}; see {log_path}")
        if line.startswith(b"listening ws://"):
            # keep draining its stdout so the pipe never fills and blocks it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split()[1].decode()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _bare_receive(url: str, events: int) -> tuple[float, float]:
    """Receive `events` frames and nothing else: events/s and CPU µs/event, first to last frame."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, max_queue=WS_MAX_QUEUE, compression=None) as ws:
        await ws.recv(False)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(events - 1):
            await ws.recv(False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return (events - 1) / elapsed, cpu / (events - 1) * 1e6


def bare_main(argv: list[str]) -> None:
    """Entry of the bare-client subprocess: prints its events/s and CPU µs per event."""
    url, events = argv[0], int(argv[1])
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        rate, cpu = runner.run(_bare_receive(url, events))
        print(rate, cpu, flush=True)


def _run_bare(url: str, events: int, timeout: float) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.ingest", "bare", url, str(events)],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    rate, cpu = out.stdout.decode().split()[-2:]
    return float(rate), float(cpu)


def _run_ingester(
    settings: Settings,
    cfg: FirehoseConfig,
    log_path: Path,
    timeout: float,
    source: str | None = None,
) -> dict[str, float]:
    """One ingester run into an empty Redis; rate from the first saved cursor to the last.

    `source`: a directory holding another `appliance` package to run instead (--baseline).
    """
    client = redis.Redis(port=settings.redis_port, password=settings.redis_password)
    client.flushall()
    last_us = time_at(cfg, cfg.events - 1)
    env = {**os.environ, **to_environ(settings)}
    cmd = [sys.executable, "-m", "appliance", "ingest"]
    if source is not None:
        # Only the settings that differ from the defaults: an older tree rejects newer names.
        defaults = to_environ(load_settings(environ={}))
        ours = {k: v for k, v in to_environ(settings).items() if defaults.get(k) != v}
        env = {**os.environ, **ours}
        cmd = [sys.executable, "-c", _BASELINE_LAUNCHER, source, "ingest"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        first: tuple[float, int] | None = None
        cpu_first = 0.0
        while True:
            raw = client.get(settings.cursor_key)
            now = time.perf_counter()
            if raw is not None:
                cursor = int(raw)
                if first is None:
                    first = (now, cursor)
                    cpu_first = _cpu_seconds(proc.pid)
                if cursor >= last_us:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"ingester exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingester did not drain {cfg.events} events in {timeout} s")
            time.sleep(0.005)
        assert first is not None
        first_index = (first[1] - cfg.start_us) * cfg.events_per_day // DAY_US
        events = cfg.events - 1 - first_index
        if events <= 0:
            raise RuntimeError("drained before the first poll: too few --events to measure")
        elapsed = now - first[0]
        cpu = _cpu_seconds(proc.pid) - cpu_first
        rss = peak_rss_mb(proc.pid)
        entries = int(client.xlen(settings.stream_key))
    finally:
        _stop(proc)
        client.close()
    return {
        "events_per_s": events / elapsed,
        "cpu_us_per_event": cpu / events * 1e6,
        "peak_rss_mb": rss,
        "entries": entries,
    }


def _figures(
    args: argparse.Namespace,
    sizes: list[int],
    bare: list[float],
    bare_cpu: list[float],
    server_cpu: list[float],
    runs: dict[int, list[dict[str, float]]],
    baseline_runs: list[dict[str, float]],
) -> dict[str, Any]:
    """Medians over the repeats; the first micro-batch size is the headline."""
    head = sizes[0]
    bare_rate = median(bare)
    figures: dict[str, Any] = {
        "events": args.events,
        "repeats": args.repeats,
        "entry_events": head,
        "bare_receive_events_per_s": round(bare_rate),
        "bare_receive_cpu_us_per_event": round(median(bare_cpu), 2),
        "replay_server_cpu_us_per_event": round(median(server_cpu), 2),
    }
    for n in sizes:
        rate = median([r["events_per_s"] for r in runs[n]])
        suffix = "" if n == head else f"_entry{n}"
        figures[f"ingest_events_per_s{suffix}"] = round(rate)
        figures[f"ratio{suffix}"] = round(rate / bare_rate, 3)
        figures[f"peak_rss_mb{suffix}"] = round(max(r["peak_rss_mb"] for r in runs[n]), 1)
        figures[f"cpu_us_per_event{suffix}"] = round(
            median([r["cpu_us_per_event"] for r in runs[n]]), 2
        )
    if baseline_runs:
        rate = median([r["events_per_s"] for r in baseline_runs])
        figures["baseline_events_per_s"] = round(rate)
        figures["baseline_ratio"] = round(rate / bare_rate, 3)
        figures["baseline_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in baseline_runs), 1)
        figures["baseline_cpu_us_per_event"] = round(
            median([r["cpu_us_per_event"] for r in baseline_runs]), 2
        )
    return figures


def _base_settings(tmp: Path) -> Settings:
    """The ingester's settings for every run: its own redis-server under `tmp`, free ports."""
    return load_settings(
        environ={},
        redis_dir=str(tmp / "redis"),
        redis_port=_free_port(),
        redis_password=secrets.token_hex(16),
        redis_maxmemory="4gb",
        ingest_port=_free_port(),
        log_format="json",
        stall_timeout_s=30.0,
    )


def _describe(result: dict[str, float]) -> str:
    return (
        f"{result['events_per_s']:,.0f} events/s, "
        f"{result['cpu_us_per_event']:.1f} µs CPU/event, "
        f"peak RSS {result['peak_rss_mb']:.1f} MB"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in str(args.entry_events).split(",") if x.strip()]
    if args.events < 1000 or not sizes or min(sizes) < 1:
        raise SystemExit("--events must be >= 1000 and --entry-events positive integers")
    baseline = None
    if args.baseline:
        baseline = str(Path(args.baseline).resolve())
        if not (Path(baseline) / "appliance" / "__main__.py").is_file():
            raise SystemExit(f"--baseline {args.baseline}: no appliance/__main__.py in it")
    cfg = FirehoseConfig(seed=args.seed, events=args.events)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    base = _base_settings(tmp)
    load = os.getloadavg()
    print(
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"
    )
    bare: list[float] = []
    bare_cpu: list[float] = []
    server_cpu: list[float] = []
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    baseline_runs: list[dict[str, float]] = []
    redis_proc = start_redis(base)
    replay: subprocess.Popen[bytes] | None = None
    try:
        print(f"preloading {args.events:,} events into the replay server ...", flush=True)
        replay, url = _start_replay(_free_port(), args.events, args.seed, tmp / "replay.log")
        print(f"replay server {url}", flush=True)
        settings_for = {
            n: msgspec.structs.replace(base, jetstream_urls=(url,), ingest_entry_events=n)
            for n in sizes
        }
        for repeat in range(args.repeats):
            cpu_before = _cpu_seconds(replay.pid)
            rate, cpu = _run_bare(url, args.events, args.timeout)
            server_cpu.append((_cpu_seconds(replay.pid) - cpu_before) / args.events * 1e6)
            bare.append(rate)
            bare_cpu.append(cpu)
            print(
                f"[{repeat + 1}/{args.repeats}] bare receive: {rate:,.0f} events/s, "
                f"{cpu:.1f} µs CPU/event (replay server {server_cpu[-1]:.1f} µs CPU/event sent)",
                flush=True,
            )
            for n in sizes:
                result = _run_ingester(settings_for[n], cfg, tmp / f"ingest-{n}.log", args.timeout)
                runs[n].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] ingester, {n} events/entry: "
                    f"{_describe(result)}, {result['entries']:,} entries",
                    flush=True,
                )
                if baseline is not None and n == sizes[0]:
                    result = _run_ingester(
                        settings_for[n], cfg, tmp / "baseline.log", args.timeout, baseline
                    )
                    baseline_runs.append(result)
                    print(
                        f"[{repeat + 1}/{args.repeats}] baseline ingester, {n} events/entry: "
                        f"{_describe(result)}",
                        flush=True,
                    )
    finally:
        if replay is not None:
            _stop(replay)
        _stop(redis_proc)
    figures = _figures(args, sizes, bare, bare_cpu, server_cpu, runs, baseline_runs)
    figures["load_average_before"] = round(load[0], 2)
    load = os.getloadavg()
    figures["load_average_after"] = round(load[0], 2)
    print(
        f"ingester {figures['ingest_events_per_s']:,} events/s vs bare receive "
        f"{figures['bare_receive_events_per_s']:,} events/s: ratio {figures['ratio']}, "
        f"peak RSS {figures['peak_rss_mb']} MB",
        flush=True,
    )
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare"]:
        bare_main(sys.argv[2:])
