"""Synthetic firehose speed: generator events/s, replay server events/s to a client that only
receives (generating as it serves, with --preload, and from a .zst capture of the same events),
and appliance.events.decode events/s.
Each figure is the median of several runs.

On a shared machine wall-clock rates move with the load, so each figure also comes per CPU
second of the process doing the work (`*_per_cpu_s`): events / (user + system time).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from websockets.asyncio.client import connect

from appliance import events as ev
from loadtest import firehose as fh
from loadtest.bench import median
from loadtest.replay import source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--offset",
        type=int,
        default=30_000_000,
        help="first index of the mid-stream and render figures (a chunk of a long capture)",
    )


def _rate(events: int, seconds: float) -> float:
    return events / max(seconds, 1e-9)


def bench_generator(cfg: fh.FirehoseConfig, runs: int) -> tuple[float, float]:
    rates, cpu_rates = [], []
    for _ in range(runs):
        fh._generator.cache_clear()  # include the per-config set-up, as a fresh process would
        started, cpu = time.perf_counter(), time.process_time()
        count = 0
        for _frame in fh.generate(cfg):
            count += 1
        rates.append(_rate(count, time.perf_counter() - started))
        cpu_rates.append(_rate(count, time.process_time() - cpu))
    return median(rates), median(cpu_rates)


def bench_generator_at(cfg: fh.FirehoseConfig, offset: int, runs: int) -> tuple[float, float]:
    """Events from `offset` on in a fresh generator, as a worker rendering one chunk of a long
    capture makes them: its references reach far back into blocks it never generated."""
    rates, cpu_rates = [], []
    for _ in range(runs):
        fh._generator.cache_clear()
        started, cpu = time.perf_counter(), time.process_time()
        count = 0
        for _frame in itertools.islice(fh.generate(cfg, offset), cfg.events - offset):
            count += 1
        rates.append(_rate(count, time.perf_counter() - started))
        cpu_rates.append(_rate(count, time.process_time() - cpu))
    return median(rates), median(cpu_rates)


def bench_render(cfg: fh.FirehoseConfig, offset: int, runs: int) -> tuple[float, float]:
    """A capture chunk from `offset` as `loadtest replay` renders it: generate, compute the
    expectation's facts (ground truth, sample searches), compress (one process)."""
    queries = source.sample_queries(
        fh.time_at(cfg, 0), fh.time_at(cfg, cfg.events - 1), "did:plc:" + "a" * 24, "good morning"
    )
    rates, cpu_rates = [], []
    for _ in range(runs):
        fh._generator.cache_clear()
        started, cpu = time.perf_counter(), time.process_time()
        source._render((cfg, queries, offset, cfg.events, ev.now_us()))
        rates.append(_rate(cfg.events - offset, time.perf_counter() - started))
        cpu_rates.append(_rate(cfg.events - offset, time.process_time() - cpu))
    return median(rates), median(cpu_rates)


def bench_decode(frames: list[bytes], runs: int) -> tuple[float, float]:
    rates, cpu_rates = [], []
    now = ev.now_us()
    decode = ev.decode
    for _ in range(runs):
        gc.disable()
        try:
            started, cpu = time.perf_counter(), time.process_time()
            for frame in frames:
                decode(frame, now=now)
            rates.append(_rate(len(frames), time.perf_counter() - started))
            cpu_rates.append(_rate(len(frames), time.process_time() - cpu))
        finally:
            gc.enable()
    return median(rates), median(cpu_rates)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh_:
        fields = fh_.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(
    cfg: fh.FirehoseConfig, preload: bool, capture: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "loadtest", "serve", "--port", "0"]
    if capture:
        cmd += ["--from", capture]
    else:
        cmd += ["--events", str(cfg.events), "--seed", str(cfg.seed)]
    if preload:
        cmd.append("--preload")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"listening "):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"loadtest serve did not start: {line!r}")
    return proc, line.split()[1].decode()


async def _receive_all(url: str, events: int) -> float:
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.recv(decode=False)
        started = time.perf_counter()
        for _ in range(events - 1):
            await ws.recv(decode=False)
        return _rate(events - 1, time.perf_counter() - started)


def bench_server(
    cfg: fh.FirehoseConfig, runs: int, preload: bool, capture: str | None = None
) -> tuple[float, float]:
    """Events/s the client received, and events per CPU second of the server process."""
    proc, url = _start_server(cfg, preload, capture)
    rates, cpu_rates = [], []
    try:
        for _ in range(runs):
            cpu = _cpu_seconds(proc.pid)
            rates.append(asyncio.run(_receive_all(url, cfg.events)))
            cpu_rates.append(_rate(cfg.events, _cpu_seconds(proc.pid) - cpu))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return median(rates), median(cpu_rates)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = fh.FirehoseConfig(seed=args.seed, events=args.events)
    frames = list(fh.generate(cfg))
    mean_bytes = sum(map(len, frames)) / len(frames)
    print(f"{cfg.events} events per run, {args.runs} runs, mean frame {mean_bytes:.0f} B")
    print(f"{'':26}{'events/s':>12}{'per CPU s':>12}")
    figures: dict[str, Any] = {"events": cfg.events, "runs": args.runs}

    def report(name: str, label: str, rates: tuple[float, float]) -> None:
        figures[f"{name}_events_per_s"] = round(rates[0])
        figures[f"{name}_events_per_cpu_s"] = round(rates[1])
        print(f"{label:26}{rates[0]:>12,.0f}{rates[1]:>12,.0f}")

    report("generator", "generator", bench_generator(cfg, args.runs))
    far = fh.FirehoseConfig(seed=args.seed, events=args.offset + args.events)
    report(
        "generator_mid",
        f"generator from {args.offset:,}",
        bench_generator_at(far, args.offset, args.runs),
    )
    report("render", "render (gen+facts+zstd)", bench_render(far, args.offset, args.runs))
    report("decode", "events.decode", bench_decode(frames, args.runs))
    with tempfile.TemporaryDirectory() as tmp:
        capture = os.path.join(tmp, "capture.jsonl.zst")
        with fh.open_output(capture) as out:
            out.write(b"".join(frame + b"\n" for frame in frames))
        del frames
        report("server", "server (generating)", bench_server(cfg, args.runs, preload=False))
        report("server_preload", "server (--preload)", bench_server(cfg, args.runs, preload=True))
        report("server_file", "server (--from .zst)", bench_server(cfg, args.runs, False, capture))
    figures["mean_frame_bytes"] = round(mean_bytes)
    return figures
