"""`loadtest replay`: run a phase validation and write its report (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from appliance.config import Settings, load_settings
from appliance.store.manifest import read_manifest
from loadtest import firehose
from loadtest.jetstream_server import speed_arg
from loadtest.replay import faults as fl
from loadtest.replay import feed, report, source, target, verify
from loadtest.replay.monitor import Monitor, progress
from loadtest.replay.stack import Stack, free_port

STALL_TIMEOUT_S = 5.0  # the ingester's, in a replay: a stall fault lasts longer than this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scale", default="day", help="day, week, month (of --per-day events) or N events"
    )
    parser.add_argument("--from", dest="files", nargs="+", metavar="CAPTURE",
                        help="replay recorded captures (files or directories) instead")  # fmt: skip
    parser.add_argument("--speed", type=speed_arg, default=None, help="'max' (default) or a factor")
    parser.add_argument("--path", choices=("websocket", "direct"), default="websocket",
                        help="websocket: through the replay server and the ingester; direct: "
                        "the source straight into the Redis buffer (storage and query "
                        "validation)")  # fmt: skip
    parser.add_argument("--faults", default="", help=f"e.g. {fl.ALL_FAULTS} (or 'all')")
    parser.add_argument("--seed", type=int, default=1, help="stream and fault seed")
    parser.add_argument("--report", default="replay-report", help="report directory")
    parser.add_argument("--target", metavar="URLS",
                        help="a running appliance instead of our own stack: its API "
                        "(http://HOST:PORT) and Redis buffer (redis://HOST:PORT), optionally its "
                        "data root (file:///DIR); fed with --path direct, nothing started or "
                        "stopped there")  # fmt: skip
    parser.add_argument("--target-password-file", metavar="FILE",
                        help="the target's Redis password (default: APPLIANCE_REDIS_PASSWORD)")  # fmt: skip
    parser.add_argument("--target-allow-data", action="store_true",
                        help="feed a target that holds data already; only what this replay "
                        "adds is checked (counts per table and day, no sample searches)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="processes rendering the capture")
    parser.add_argument("--cache", default="var/replay-cache", help="capture cache directory")
    parser.add_argument("--work", help="directory for the stack's data (default: a temporary one)")
    parser.add_argument("--per-day", type=int, default=firehose.DEFAULT_EVENTS_PER_DAY,
                        help="events per day of stream time")  # fmt: skip
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="soak: with --speed F, replay SECONDS of wall time (sets --scale)")  # fmt: skip
    parser.add_argument("--batch-interval", type=float, default=5.0,
                        help="the batcher's flush interval in the replay (default 5 s)")  # fmt: skip
    parser.add_argument("--max-gap", type=float, default=5.0,
                        help="paced replays idle at most this long on a gap in the source")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="give up after (s)")
    parser.add_argument("--progress", choices=("auto", "live", "lines"), default="auto")


def main(args: argparse.Namespace) -> int:
    try:
        if args.target is None and (args.target_password_file or args.target_allow_data):
            raise ValueError("--target-password-file and --target-allow-data need --target")
        spec = fl.parse_faults(args.faults)
        if args.path == "direct" and any(
            spec.counts.get(k) for k in ("kill-ingester", "stall", "drop")
        ):
            raise ValueError("--path direct has no ingester or websocket to fault")
        if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
            raise ValueError(f"--work {args.work}: not empty (a replay starts from nothing)")
        if args.soak is not None and not args.speed:
            raise ValueError("--soak needs --speed F (a factor of real time)")
        events = source.parse_scale(args.scale, args.per_day)
        if args.soak is not None:
            events = max(1, math.ceil(args.soak * args.speed * args.per_day / 86_400))
    except ValueError as exc:
        print(f"loadtest replay: {exc}", file=sys.stderr)
        return 2
    if args.target is not None:
        return target.main(args, events)
    result = replay(args, spec, events)
    print(f"report: {Path(args.report) / 'report.md'}")
    print("verified" if result["verified"] else "NOT verified: " + "; ".join(result["problems"]))
    return 0 if result["verified"] else 1


def _settings(work: Path, data_dir: Path, server_port: int, args: argparse.Namespace) -> Settings:
    return load_settings(
        environ={},
        data_dir=str(data_dir),
        redis_dir=str(work / "redis"),
        redis_port=free_port(),
        redis_password=secrets.token_hex(16),
        ingest_port=free_port(),
        batch_port=free_port(),
        api_port=free_port(),
        jetstream_urls=(f"ws://127.0.0.1:{server_port}/subscribe",),
        stall_timeout_s=STALL_TIMEOUT_S,
        reconnect_max_backoff_s=2.0,
        batch_interval_s=args.batch_interval,
        result_limit=False,  # the verifier compares whole answers
        compact_auto=False,  # compacted after the exact check (see _check)
        log_format="json",
    )


def _server_args(
    args: argparse.Namespace, paths: list[str], planned: list[fl.Planned], frames: int
) -> list[str]:
    out = ["--from", *paths, "--max-gap", str(args.max_gap)]
    out += ["--speed", "max" if args.speed is None else str(args.speed)]
    for kind, flag in (("stall", "--stall-at"), ("drop", "--drop-at")):
        positions = fl.server_positions(planned, kind, frames)
        if positions:
            out += [flag, ",".join(map(str, positions))]
    return [*out, "--stall-seconds", str(STALL_TIMEOUT_S + 3)]


@contextlib.contextmanager
def _data_dir(work: Path, spec: fl.FaultSpec, raw_bytes: int) -> Iterator[tuple[Path, Path | None]]:
    """The data root; on its own tmpfs when a disk-full fault must fill it."""
    if not spec.counts.get("disk-full"):
        yield work / "data", None
        return
    # A cap, not an allocation (a tmpfs uses memory only for what it holds). Parquet is ~10% of
    # the raw JSON, but the compaction after the replay spills into the data root too
    # (.compact-spill): a day's merge overflowed a volume of half the raw bytes.
    size = max(256 << 20, raw_bytes * 3 // 2)
    with fl.tmpfs(work / "volume", size) as mount:
        yield mount / "data", mount


def replay(args: argparse.Namespace, spec: fl.FaultSpec, events: int) -> dict[str, Any]:
    """Prepare, run, verify and report; returns the report's figures."""
    out_dir = Path(args.report)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, expect, prep = source.prepare(args, spec.bad_frames, events)
    planned = fl.plan(spec, args.seed)
    with contextlib.ExitStack() as stack_exit:
        work = (
            Path(args.work)
            if args.work
            else Path(stack_exit.enter_context(tempfile.TemporaryDirectory(prefix="replay-")))
        )
        work.mkdir(parents=True, exist_ok=True)
        data_dir, filler = stack_exit.enter_context(_data_dir(work, spec, expect.raw_bytes))
        server_port = free_port()
        settings = _settings(work, data_dir, server_port, args)
        stack = Stack(settings, work, _server_args(args, paths, planned, expect.frames))
        stack.server_port = server_port
        if args.path == "direct":
            del stack.procs["server"], stack.procs["ingester"]
        run = _run(args, stack, expect, planned, paths, filler)
        figures = report.build(args, events, expect, prep, run, data_dir)
        report.write(out_dir, figures, run["samples"], run["batch_log"])
        if work != Path(args.work or "") and (out_dir / "logs").resolve() != stack.logs:
            shutil.copytree(stack.logs, out_dir / "logs", dirs_exist_ok=True)
    return figures


def _run(
    args: argparse.Namespace,
    stack: Stack,
    expect: source.Expectation,
    planned: list[fl.Planned],
    paths: list[str],
    filler: Path | None,
) -> dict[str, Any]:
    began = time.monotonic()
    stack.start()
    monitor = Monitor(stack)
    monitor.start()
    client = stack.redis()
    feeder = feed.Feeder(stack.settings, paths) if args.path == "direct" else None
    span = max(expect.last_time_us - expect.first_time_us, 1)

    def cursor() -> int:
        raw = client.get(stack.settings.cursor_key)
        return int(raw) if raw else 0

    def ingested() -> bool:
        return feeder.done if feeder else cursor() >= expect.last_time_us

    def fraction() -> float:
        return (monitor.latest.cursor_us - expect.first_time_us) / span

    def drained() -> bool:
        return ingested() and feed.drained(client, stack.settings)

    injector = fl.Injector(
        stack, monitor, planned, fraction, ingested, drained, filler, expect.frames
    )
    injector.start()
    if feeder:
        feeder.start()
    live = {"auto": None, "live": True, "lines": False}[args.progress]
    wall_s, timed_out = 0.0, False
    try:
        with progress(monitor, expect.truth.count(), injector.summary, live) as refresh:
            while True:
                with stack.lock:
                    stack.supervise()
                refresh()
                with contextlib.suppress(redis.RedisError):
                    if not injector.pending and drained():
                        monitor.samples.append(monitor.take())
                        refresh()
                        break
                if time.monotonic() - began > args.timeout:
                    timed_out = True
                    break
                time.sleep(0.5)
        wall_s = time.monotonic() - began
        injector.join()
        result, compact_s = _check(stack, client, expect, drained)
        if timed_out:
            result.problems.append(f"timed out after {args.timeout:g} s")
    finally:
        monitor.close()
        client.close()
        if feeder:
            feeder.stop.set()
        stack.stop()
    result.problems += [f"fault injection: {e}" for e in injector.errors]
    result.problems += [
        f"{f.kind} at {f.at:.2f} did not recover in {fl.RECOVERY_TIMEOUT_S:g} s"
        for f in injector.done
        if not f.recovered
    ]
    return {
        "wall_s": wall_s,
        "compact_s": compact_s,
        "verification": verify.conclude(result),
        "faults": injector.done,
        "samples": monitor.samples,
        "procs": stack.procs,
        "batch_log": stack.logs / "batcher.log",
        "server_log": stack.logs / "server.log",
        "parquet_bytes": _parquet_bytes(Path(stack.settings.data_dir)),
        "path": args.path,
    }


def _check(
    stack: Stack, client: redis.Redis, expect: source.Expectation, drained: Callable[[], bool]
) -> tuple[verify.Verification, float]:
    """Verify the batch files exactly, then compact every day and check the API again.

    The ingester is stopped first (at the end of its source it would reconnect on the stall
    timeout and deliver the last seconds again, which the batcher then deduplicates). The replay
    runs with automatic compaction off: compaction drops deleted and superseded records, and
    which ones depends on when it ran, so exactly-once is checked on the batch files; then the
    replay compacts every day and checks that the API's answers have not changed.
    """
    result = verify.Verification()
    with stack.lock:
        stack.stop_one("ingester")
    if not _wait(drained, 300):
        result.problems.append("the stream did not drain after the ingester stopped")
    api = stack.url("api", "").rstrip("/")
    with contextlib.suppress(TimeoutError):
        stack.wait_ready("api", 120)
    verify.check_rejects(client, stack.settings.dead_letter_key, expect, result)
    data_dir = Path(stack.settings.data_dir)
    verify.check_storage(data_dir, expect, result)
    verify.check_api(api, expect, result, 10**9)
    began = time.monotonic()
    for day in sorted({d for days in expect.truth.tables.values() for d in days}):
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "compact", "--day", day],
            env=stack.env,
            capture_output=True,
        )
        if done.returncode:
            result.problems.append(f"compacting {day} failed: {done.stderr.decode()[-300:]}")
    compact_s = time.monotonic() - began
    after = verify.Verification()
    verify.check_api(api, expect, after, 10**9, stats=False)
    verify.check_compacted(data_dir, after)
    result.searches_compacted = after.searches
    result.problems += [f"after compaction: {p}" for p in after.problems]
    return result, compact_s


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if condition():
                return True
        time.sleep(0.2)
    return False


def _parquet_bytes(data_dir: Path) -> int:
    manifest = read_manifest(data_dir)
    return sum((data_dir / p).stat().st_size for files in manifest.files.values() for p in files)
