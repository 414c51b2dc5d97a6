"""Where the replay server's events come from: the synthetic generator (generating as it
serves, or preloaded into memory) or recorded capture files (JSON lines, plain or .zst), each
as `Item`s in stream order that can start at a cursor."""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

import msgspec

from loadtest import firehose
from loadtest.firehose import FirehoseConfig, Item


class Source(Protocol):
    """Where frames come from: `items(cursor)` yields Items with time_us >= cursor, in order."""

    def items(self, cursor: int | None) -> Iterator[Item]: ...


class GeneratorSource:
    """The synthetic firehose; a cursor seeks in O(1) (no earlier event is generated)."""

    def __init__(self, cfg: FirehoseConfig) -> None:
        self.cfg = cfg

    def items(self, cursor: int | None) -> Iterator[Item]:
        start = 0 if cursor is None else firehose.index_at(self.cfg, cursor)
        return firehose.generate_items(self.cfg, start)


class _Meta(msgspec.Struct):
    did: str = ""
    time_us: int = 0
    kind: str = ""
    commit: _MetaCommit | None = None


class _MetaCommit(msgspec.Struct):
    collection: str = ""


_meta_decoder = msgspec.json.Decoder(_Meta)


def open_lines(path: str | Path) -> IO[bytes]:
    """A binary line reader over a plain or zstd-compressed (.zst) JSON-lines file."""
    fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if str(path).endswith(".zst"):
        import zstandard

        # read_across_frames: `loadtest generate --jobs` writes one zstd frame per chunk.
        reader = zstandard.ZstdDecompressor().stream_reader(
            fh, closefd=True, read_across_frames=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return fh


def read_items(paths: Sequence[str | Path]) -> Iterator[Item]:
    """Every line of the files in order, as Items (position = line number across files).

    A line that is not a JSON object with did/time_us is still served (it is what was
    recorded); it carries the previous line's time_us and matches no DID filter.
    """
    position = 0
    last_time = 0
    for path in paths:
        with open_lines(path) as fh:
            for line in fh:
                frame = line.rstrip(b"\r\n")
                if not frame:
                    continue
                try:
                    meta = _meta_decoder.decode(frame)
                except msgspec.DecodeError:
                    meta = _Meta(time_us=last_time)
                last_time = meta.time_us
                collection = meta.commit.collection if meta.commit is not None else ""
                yield Item(position, meta.time_us, meta.did, collection, frame)
                position += 1


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its *.jsonl and *.jsonl.zst files in name order
    (a capture's names sort in capture order; dot-files, i.e. unfinished ones, are left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if f.name.endswith((".jsonl", ".jsonl.zst")) and not f.name.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"no .jsonl or .jsonl.zst files in {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file: {p}")
    return out


SEEK_SUFFIX = ".seek.json"


class SeekPoint(msgspec.Struct, array_like=True):
    """Where a zstd frame of a time-ordered capture starts: its first time_us, its byte
    offset in the file and the position (line number) of its first line."""

    time_us: int
    offset: int
    position: int


def seek_path(path: str | Path) -> Path:
    """The seek index beside a capture (`loadtest replay` writes one for each it renders)."""
    return Path(f"{path}{SEEK_SUFFIX}")


class FileSource:
    """Recorded JSON-lines files (plain or .zst) or capture directories, replayed in order; a
    cursor skips every line whose time_us is below it (recordings are nearly, not strictly,
    time-ordered). A single time-ordered .zst file with a seek index beside it starts at the
    zstd frame holding the cursor instead of reading every line before it: a reconnect deep
    into a day's capture would otherwise take longer than a client's stall timeout."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = expand_paths(paths)
        self.seek: list[SeekPoint] = []
        index = seek_path(self.paths[0]) if len(self.paths) == 1 else None
        if index is not None and index.is_file():
            self.seek = msgspec.json.decode(index.read_bytes(), type=list[SeekPoint])

    def items(self, cursor: int | None) -> Iterator[Item]:
        if cursor is None:
            return read_items(self.paths)
        if self.seek:
            k = bisect.bisect_right([p.time_us for p in self.seek], cursor) - 1
            if k > 0:
                return self._from(self.seek[k], cursor)
        return (item for item in read_items(self.paths) if item.time_us >= cursor)

    def _from(self, point: SeekPoint, cursor: int) -> Iterator[Item]:
        import zstandard

        with open(self.paths[0], "rb") as raw:
            raw.seek(point.offset)
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            lines = io.BufferedReader(reader, buffer_size=1 << 20)
            position, last_time = point.position, point.time_us
            for line in lines:
                frame = line.rstrip(b"\r\n")
                if not frame:
                    continue
                try:
                    meta = _meta_decoder.decode(frame)
                except msgspec.DecodeError:
                    meta = _Meta(time_us=last_time)
                last_time = meta.time_us
                if meta.time_us >= cursor:
                    collection = meta.commit.collection if meta.commit is not None else ""
                    yield Item(position, meta.time_us, meta.did, collection, frame)
                position += 1


class PreloadedSource:
    """Every item of another source rendered into memory first (so serving is not limited by
    generation or decompression). Seeks by bisection when the source is time-ordered."""

    def __init__(self, source: Source) -> None:
        self.frames = list(source.items(None))
        self.times = [item.time_us for item in self.frames]
        self.ordered = all(a <= b for a, b in zip(self.times, self.times[1:], strict=False))

    def items(self, cursor: int | None) -> Iterator[Item]:
        if cursor is None:
            return iter(self.frames)
        if self.ordered:
            start = bisect.bisect_left(self.times, cursor)
            return (self.frames[k] for k in range(start, len(self.frames)))
        return (item for item in self.frames if item.time_us >= cursor)
