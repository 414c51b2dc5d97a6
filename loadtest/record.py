"""Capture a Jetstream into rotating zstd-compressed JSON-lines files (replayable data).

Each line is one frame exactly as received (bytes, no re-encoding). A file is written under a
temporary name (`.NAME.tmp`), finished, fsynced and renamed to
`jetstream-<first time_us>-<sequence>.jsonl.zst`, so a file with the final name is complete;
names sort in capture order. A new file starts after `rotate_mb` of compressed output or
`rotate_seconds` of wall time, whichever comes first.

On a dropped connection, an error or a stall the recorder reconnects with `cursor=` the last
time_us it received (Jetstream replays from there, inclusive) and skips the frames of that
same time_us it already wrote, so the capture has no gap and no duplicate across reconnects.
A frame containing a newline cannot be a JSON line: it is skipped, counted and logged.

`loadtest serve --from DIR-or-FILES` replays a capture.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import zstandard
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

log = logging.getLogger("loadtest.record")


class _Meta(msgspec.Struct):
    time_us: int = 0


_meta_decoder = msgspec.json.Decoder(_Meta)


@dataclass
class RecordStats:
    frames: int = 0  # frames written
    files: int = 0  # files completed
    reconnects: int = 0
    duplicates_skipped: int = 0
    unrecordable: int = 0  # frames with a newline inside


def with_cursor(url: str, cursor: int | None) -> str:
    """The subscribe URL with its cursor parameter set (or removed)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "cursor"]
    if cursor is not None:
        query.append(("cursor", str(cursor)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def capture_files(directory: str | Path) -> list[Path]:
    """The complete capture files of a directory, in capture order."""
    return sorted(Path(directory).glob("jetstream-*.jsonl.zst"))


class RotatingWriter:
    """Writes lines into zstd files that appear atomically under their final name."""

    def __init__(self, directory: Path, rotate_bytes: int, rotate_seconds: float) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.sequence = len(capture_files(directory))
        self._raw: IO[bytes] | None = None
        self._zst: Any = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._opened = 0.0
        self.completed: list[Path] = []

    def write(self, frame: bytes, time_us: int) -> None:
        if self._zst is None:
            self._open(time_us)
        self._zst.write(frame + b"\n")
        assert self._raw is not None
        if (
            self._raw.tell() >= self.rotate_bytes
            or time.monotonic() - self._opened >= self.rotate_seconds
        ):
            self.close()

    def _open(self, time_us: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"jetstream-{time_us:016d}-{self.sequence:06d}.jsonl.zst"
        self.sequence += 1
        self._final = self.directory / name
        self._tmp = self.directory / f".{name}.tmp"
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._zst = zstandard.ZstdCompressor(level=3).stream_writer(self._raw, closefd=False)
        self._opened = time.monotonic()

    def close(self) -> None:
        """Finish the current file: end the zstd frame, fsync, rename, fsync the directory."""
        if self._zst is None:
            return
        assert self._raw is not None and self._tmp is not None and self._final is not None
        self._zst.flush(zstandard.FLUSH_FRAME)
        self._zst.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self._final)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("capture file complete: %s", self._final.name)
        self.completed.append(self._final)
        self._zst = self._raw = self._tmp = self._final = None


async def record(
    url: str,
    out_dir: str | Path,
    *,
    rotate_mb: float = 64.0,
    rotate_seconds: float = 3600.0,
    max_events: int | None = None,
    cursor: int | None = None,
    stall_seconds: float = 30.0,
    max_backoff: float = 10.0,
    stop: asyncio.Event | None = None,
) -> RecordStats:
    """Capture `url` into `out_dir` until `stop` is set or `max_events` frames are written."""
    stop = stop or asyncio.Event()
    writer = RotatingWriter(Path(out_dir), int(rotate_mb * 1_000_000), rotate_seconds)
    stats = RecordStats()
    last_time = cursor
    seen_at_last: set[bytes] = set()  # frames already written whose time_us == last_time
    backoff = 0.25
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set() and (max_events is None or stats.frames < max_events):
            target = with_cursor(url, last_time)
            try:
                async with connect(target, max_size=None, open_timeout=10) as ws:
                    log.info("connected: %s", target)
                    backoff = 0.25
                    while max_events is None or stats.frames < max_events:
                        receiving = asyncio.ensure_future(ws.recv(decode=False))
                        done, _ = await asyncio.wait(
                            {receiving, stopping},
                            timeout=stall_seconds,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if receiving not in done:
                            receiving.cancel()
                            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                                await receiving
                            if stopping in done:
                                return stats
                            log.warning("nothing for %.0f s: reconnecting", stall_seconds)
                            break
                        frame = receiving.result()
                        if isinstance(frame, str):  # recv(decode=False) gives bytes; be safe
                            frame = frame.encode()
                        try:
                            time_us = _meta_decoder.decode(frame).time_us
                        except msgspec.DecodeError:
                            time_us = last_time or 0
                        if last_time is not None and time_us == last_time and frame in seen_at_last:
                            stats.duplicates_skipped += 1
                            continue
                        if b"\n" in frame:
                            stats.unrecordable += 1
                            log.warning(
                                "skipped a frame containing a newline (%d bytes)", len(frame)
                            )
                            continue
                        writer.write(frame, time_us)
                        stats.frames += 1
                        if time_us != last_time:
                            last_time = time_us
                            seen_at_last.clear()
                        seen_at_last.add(frame)
            except (ConnectionClosed, OSError, InvalidHandshake, TimeoutError) as exc:
                if stop.is_set():
                    break
                stats.reconnects += 1
                log.warning("connection lost (%s); reconnecting in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)
    finally:
        stopping.cancel()
        writer.close()
        stats.files = len(writer.completed)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="Jetstream subscribe URL (ws:// or wss://)")
    parser.add_argument("--out", required=True, help="directory for the capture files")
    parser.add_argument(
        "--rotate-mb", type=float, default=64.0, help="start a new file after this many MB"
    )
    parser.add_argument(
        "--rotate-seconds", type=float, default=3600.0, help="start a new file after this long"
    )
    parser.add_argument("--cursor", type=int, help="start at this time_us (unix µs)")
    parser.add_argument("--max-events", type=int, help="stop after this many frames")
    parser.add_argument(
        "--stall-seconds", type=float, default=30.0, help="reconnect after this long silent"
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        parts = urlsplit(args.url)
    except ValueError as exc:
        print(f"loadtest record: --url: {exc}", file=sys.stderr)
        return 2
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        print(f"loadtest record: --url must be ws:// or wss://, not {args.url!r}", file=sys.stderr)
        return 2
    if args.rotate_mb <= 0 or args.rotate_seconds <= 0:
        print("loadtest record: --rotate-mb and --rotate-seconds must be > 0", file=sys.stderr)
        return 2

    async def run() -> RecordStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await record(
            args.url,
            args.out,
            rotate_mb=args.rotate_mb,
            rotate_seconds=args.rotate_seconds,
            max_events=args.max_events,
            cursor=args.cursor,
            stall_seconds=args.stall_seconds,
            stop=stop,
        )

    try:
        stats = asyncio.run(run())
    except InvalidURI as exc:
        print(f"loadtest record: {exc}", file=sys.stderr)
        return 2
    print(
        f"recorded {stats.frames} frames into {stats.files} files "
        f"({stats.reconnects} reconnects, {stats.duplicates_skipped} duplicates skipped)"
    )
    return 0
