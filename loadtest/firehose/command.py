"""`loadtest generate`: its options (shared with `loadtest serve`), parallel chunks written in
order, and the output file."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO

import msgspec

from appliance import events as ev
from loadtest.firehose.config import DEFAULT_EVENTS_PER_DAY, DEFAULT_START_US, FirehoseConfig
from loadtest.firehose.stream import generate
from loadtest.firehose.truth import GroundTruth


def parse_instant(text: str) -> int:
    """An instant as unix µs, or an ISO 8601 date/datetime (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix µs nor ISO 8601") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def add_generator_arguments(parser: argparse.ArgumentParser, events_required: bool) -> None:
    """Options that describe a synthetic stream (shared by generate and serve)."""
    parser.add_argument(
        "--events", type=_non_negative, required=events_required, help="events in the stream"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--start",
        type=parse_instant,
        default=DEFAULT_START_US,
        help="time_us of the first event: unix µs or ISO 8601 (default 2026-07-01T00:00:00Z)",
    )
    parser.add_argument(
        "--per-day",
        type=int,
        default=DEFAULT_EVENTS_PER_DAY,
        help=f"events per day of stream time (default {DEFAULT_EVENTS_PER_DAY})",
    )
    parser.add_argument(
        "--malformed", type=_fraction, default=0.0, help="fraction of malformed frames"
    )
    parser.add_argument(
        "--oversized", type=_fraction, default=0.0, help="fraction of oversized frames"
    )
    parser.add_argument(
        "--oversized-bytes", type=int, default=1_100_000, help="size of an oversized frame"
    )
    parser.add_argument(
        "--population", type=_non_negative, default=0, help="DIDs (0 = per-day / 8)"
    )


def config_from_args(args: argparse.Namespace) -> FirehoseConfig:
    try:
        return FirehoseConfig(
            seed=args.seed,
            events=args.events or 0,
            events_per_day=args.per_day,
            start_us=args.start,
            malformed_fraction=args.malformed,
            oversized_fraction=args.oversized,
            oversized_bytes=args.oversized_bytes,
            population=args.population,
        )
    except ValueError as exc:
        raise SystemExit(f"loadtest: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser, events_required=True)
    parser.add_argument(
        "--out", default="-", help="output file ('-' = stdout; a .zst suffix compresses)"
    )
    parser.add_argument("--truth", help="also write the ground truth as JSON to this file")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes (events are independent: chunks "
        "are generated in parallel and written in order)",
    )  # fmt: skip
    parser.add_argument(
        "--chunk", type=int, default=100_000, help="events per work unit (default 100000)"
    )


def render_chunk(
    cfg: FirehoseConfig, start: int, stop: int, compress: bool, truth: bool, now: int
) -> tuple[bytes, GroundTruth | None]:
    """Events [start, stop) as JSON lines (a complete zstd frame if `compress`), and their
    ground truth if asked. Concatenated chunks are the same file as one sequential run."""
    part = GroundTruth(deleted_post_uris=None) if truth else None
    frames = []
    for frame in itertools.islice(generate(cfg, start), stop - start):
        frames.append(frame)
        if part is not None:
            part.add(frame, now=now)
    frames.append(b"")
    data = b"\n".join(frames)
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    return data, part


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.jobs < 1 or args.chunk < 1:
        raise SystemExit("loadtest generate: --jobs and --chunk must be >= 1")
    truth = GroundTruth(deleted_post_uris=None) if args.truth else None
    now = ev.now_us()
    started = time.perf_counter()
    compress = args.out.endswith(".zst")
    ranges = [(a, min(a + args.chunk, cfg.events)) for a in range(0, cfg.events, args.chunk)]
    with contextlib.ExitStack() as stack:
        out = sys.stdout.buffer if args.out == "-" else stack.enter_context(open(args.out, "wb"))
        if args.jobs == 1:
            parts: Iterable[tuple[bytes, GroundTruth | None]] = (
                render_chunk(cfg, a, b, compress, truth is not None, now) for a, b in ranges
            )
        else:
            import multiprocessing

            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(args.jobs))
            parts = pool.imap(
                _render_chunk_star,
                [(cfg, a, b, compress, truth is not None, now) for a, b in ranges],
            )
        for data, part in parts:
            out.write(data)
            if truth is not None and part is not None:
                truth.merge(part)
        out.flush()
    elapsed = time.perf_counter() - started
    if truth is not None:
        with open(args.truth, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(truth)))
    print(
        f"generated {cfg.events} events in {elapsed:.2f} s "
        f"({cfg.events / max(elapsed, 1e-9):,.0f}/s, {args.jobs} jobs) -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _render_chunk_star(
    args: tuple[FirehoseConfig, int, int, bool, bool, int],
) -> tuple[bytes, GroundTruth | None]:
    return render_chunk(*args)


@contextlib.contextmanager
def open_output(path: str) -> Iterator[IO[bytes]]:
    """stdout for '-', else a file; zstd-compressed when the name ends in .zst."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as fh:
        if path.endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False) as zfh:
                yield zfh
        else:
            yield fh
