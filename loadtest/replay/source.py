"""The capture a replay feeds, and what the pipeline must make of it (the expectation).

A synthetic replay renders its events once into a zstd JSON-lines capture, in parallel chunks
(`--jobs`), cached under a key of everything that decides its bytes (seed, events, events per
day, bad-frame fractions and the generator's own source code), so a second run of the same
scale starts at once. The same pass computes the expectation: the ground truth (per table and
day, count and digest of natural keys; rejects by reason), the raw bytes, and the answers of a
few sample searches, computed from the frames with plain Python, independently of the query
engine. Recorded captures (`--from`) get their expectation from one pass over the files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import zstandard

from appliance import buffer
from appliance import events as ev
from loadtest import firehose
from loadtest.firehose import (
    ABSENT_WORD,
    COMMON_WORD,
    RARE_WORD,
    FirehoseConfig,
    GroundTruth,
)
from loadtest.sources import SeekPoint, open_lines, seek_path

SCALES = {"day": 1, "week": 7, "month": 30}
POST = "app.bsky.feed.post"
_POST_MARK = b'"app.bsky.feed.post"'
DELETED_SAMPLE = 50


def parse_scale(text: str, per_day: int = firehose.DEFAULT_EVENTS_PER_DAY) -> int:
    """day | week | month (in days of `per_day` events) or a number of events."""
    if text in SCALES:
        return SCALES[text] * per_day
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"--scale {text!r}: day, week, month or a number of events") from None
    if value < 1:
        raise ValueError(f"--scale {text!r}: at least one event")
    return value


class Query(msgspec.Struct, frozen=True):
    """A sample search: its API parameters and the same predicate in plain Python."""

    name: str
    terms: tuple[str, ...] = ()  # lower-case substrings that must all occur (a phrase is one)
    author: str = ""
    lang: str = ""
    tag: str = ""
    since_us: int = 0
    until_us: int = 0

    def params(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.terms:
            out["q"] = " ".join(f'"{t}"' if " " in t else t for t in self.terms)
        for name in ("author", "lang", "tag"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.since_us:
            out["since"] = _iso(self.since_us)
        if self.until_us:
            out["until"] = _iso(self.until_us)
        return out

    def matches(self, did: str, time_us: int, text: str, langs: list[str], tags: list[str]) -> bool:
        if self.author and did != self.author:
            return False
        if self.since_us and time_us < self.since_us:
            return False
        if self.until_us and time_us >= self.until_us:
            return False
        if self.lang and not any(
            x.lower() == self.lang or x.lower().startswith(self.lang + "-") for x in langs
        ):
            return False
        if self.tag and self.tag not in (t.lower() for t in tags):
            return False
        lowered = text.lower()
        return all(t in lowered for t in self.terms)


def _iso(time_us: int) -> str:
    return datetime.fromtimestamp(time_us // 1_000_000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sample_queries(first_us: int, last_us: int, author: str, phrase: str) -> list[Query]:
    """Common, rare and absent words, an author, a language, a tag, a date range, a phrase."""
    span = max(last_us - first_us, 2_000_000)
    since = (first_us + span * 2 // 5) // 1_000_000 * 1_000_000
    until = (first_us + span * 3 // 5) // 1_000_000 * 1_000_000
    return [
        Query("common word", terms=(COMMON_WORD,)),
        Query("rare word", terms=(RARE_WORD,)),
        Query("absent word", terms=(ABSENT_WORD,)),
        Query("author", author=author),
        Query("lang", lang="ko"),
        Query("tag", tag="caturday"),
        Query("date range", terms=(COMMON_WORD,), since_us=since, until_us=until),
        Query("phrase", terms=(phrase,)),
    ]


class SearchCase(msgspec.Struct):
    query: Query
    expected: list[tuple[int, str]]  # (time_us, uri) of the visible matches, newest first


class Expectation(msgspec.Struct):
    """What the pipeline must store and answer, computed from the source alone."""

    source: str
    frames: int
    raw_bytes: int
    first_time_us: int
    last_time_us: int  # of the last valid event: the ingester's cursor reaches it at the end
    truth: GroundTruth
    searches: list[SearchCase]
    deleted_sample: list[str]  # uris of stored posts that were deleted later: must not show
    # Distinct rejected frames by reason (what a dead-letter stream keeps of a frame: its first
    # DEAD_LETTER_BYTES; the same bytes twice are one, as a redelivered frame is)
    rejected_distinct: dict[str, int] = msgspec.field(default_factory=dict)


class _Facts(msgspec.Struct):
    """One chunk's share of the expectation (merged in stream order)."""

    truth: GroundTruth
    raw_bytes: int = 0
    first_time_us: int = 0
    last_time_us: int = 0
    # uri -> (rev, time_us, bitmask of matching queries) of its newest version, for posts that
    # matched a query in some version; uri -> rev of the newest delete of every post delete.
    versions: dict[str, tuple[str, int, int]] = msgspec.field(default_factory=dict)
    deletes: dict[str, str] = msgspec.field(default_factory=dict)
    rejected: set[tuple[str, bytes]] = msgspec.field(default_factory=set)

    def merge(self, other: _Facts) -> None:
        self.truth.merge(other.truth)
        self.raw_bytes += other.raw_bytes
        self.first_time_us = self.first_time_us or other.first_time_us
        self.last_time_us = max(self.last_time_us, other.last_time_us)
        for uri, version in other.versions.items():
            mine = self.versions.get(uri)
            if mine is None or version[0] > mine[0]:
                self.versions[uri] = version
        for uri, rev in other.deletes.items():
            if rev > self.deletes.get(uri, ""):
                self.deletes[uri] = rev
        self.rejected |= other.rejected


def _post_fields(record: Any) -> tuple[str, list[str], list[str]]:
    if not isinstance(record, dict):
        return "", [], []
    text = record.get("text")
    langs = [x for x in record.get("langs") or [] if isinstance(x, str)]
    tags = [x for x in record.get("tags") or [] if isinstance(x, str)]
    for facet in record.get("facets") or []:
        for feature in (facet.get("features") or []) if isinstance(facet, dict) else []:
            if isinstance(feature, dict) and isinstance(feature.get("tag"), str):
                tags.append(feature["tag"])
    return text if isinstance(text, str) else "", langs, tags


def scan(frames: Iterable[bytes], queries: list[Query], now: int) -> _Facts:
    """The expectation's facts of a run of frames (one chunk, or a whole capture)."""
    facts = _Facts(truth=GroundTruth(deleted_post_uris=None))
    truth = facts.truth
    decode = msgspec.json.decode
    first_us = last_us = 0
    for frame in frames:
        facts.raw_bytes += len(frame)
        event = truth.add(frame, now=now)  # the appliance's own decoder, once per frame
        if isinstance(event, str):  # rejected, for this reason
            facts.rejected.add((event, dead_letter_digest(frame)))
            continue
        time_us = event.time_us
        if type(event) is ev.CommitEvent and event.commit.collection == POST:
            commit = event.commit
            record = decode(commit.record) if commit.operation != "delete" else None
            _add_post(facts, queries, event.did, time_us, commit, record)
        first_us = first_us or time_us
        if time_us > last_us:
            last_us = time_us
    facts.first_time_us, facts.last_time_us = first_us, last_us
    return facts


def dead_letter_digest(frame: bytes) -> bytes:
    """What identifies a rejected frame in the dead-letter stream (which keeps its head)."""
    return hashlib.blake2b(frame[: buffer.DEAD_LETTER_BYTES], digest_size=16).digest()


def _add_post(
    facts: _Facts,
    queries: list[Query],
    did: str,
    time_us: int,
    commit: ev.Commit,
    record: Any,
) -> None:
    uri = f"at://{did}/{POST}/{commit.rkey}"
    rev = commit.rev
    if commit.operation == "delete":
        if rev > facts.deletes.get(uri, ""):
            facts.deletes[uri] = rev
        return
    text, langs, tags = _post_fields(record)
    mask = 0
    for bit, query in enumerate(queries):
        if query.matches(did, time_us, text, langs, tags):
            mask |= 1 << bit
    mine = facts.versions.get(uri)
    if mine is not None and mine[0] >= rev:
        return
    # Every update is kept, matching or not: in another chunk it may replace a version that
    # matched (chunks are merged by rev), and the post then no longer matches.
    if mask or mine is not None or commit.operation == "update":
        facts.versions[uri] = (rev, time_us, mask)


def finish(source: str, facts: _Facts, queries: list[Query]) -> Expectation:
    """The merged facts as an expectation: each query's visible matches, newest first."""
    expected: list[list[tuple[int, str]]] = [[] for _ in queries]
    deleted: list[str] = []
    for uri, (rev, time_us, mask) in facts.versions.items():
        if facts.deletes.get(uri, "") > rev:
            deleted.append(uri)
            continue
        for bit in range(len(queries)):
            if mask >> bit & 1:
                expected[bit].append((time_us, uri))
    for rows in expected:
        rows.sort(reverse=True)
    deleted.sort(key=lambda u: hashlib.blake2b(u.encode(), digest_size=8).digest())
    return Expectation(
        source=source,
        frames=facts.truth.frames,
        raw_bytes=facts.raw_bytes,
        first_time_us=facts.first_time_us,
        last_time_us=facts.last_time_us,
        truth=facts.truth,
        searches=[SearchCase(q, rows) for q, rows in zip(queries, expected, strict=True)],
        deleted_sample=deleted[:DELETED_SAMPLE],
        rejected_distinct=_count_reasons(facts.rejected),
    )


def _count_reasons(rejected: set[tuple[str, bytes]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason, _ in rejected:
        out[reason] = out.get(reason, 0) + 1
    return out


# --- synthetic captures ---------------------------------------------------------------------------


def generator_version() -> str:
    """A digest of the generator's source: a changed generator never reuses a stale capture."""
    module = Path(firehose.__file__)
    files = sorted(module.parent.glob("*.py")) if module.name == "__init__.py" else [module]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


CAPTURE_FORMAT = 2  # part of a capture's key: bump when a capture's file layout changes
EXPECTATION_VERSION = 4  # bump when what an expectation holds or how it is computed changes


def cache_key(cfg: FirehoseConfig) -> str:
    parts = msgspec.json.encode(cfg) + f"{generator_version()}/{CAPTURE_FORMAT}".encode()
    return f"s{cfg.seed}-n{cfg.events}-" + hashlib.sha256(parts).hexdigest()[:16]


def probes(frames: Iterable[bytes]) -> tuple[str, str]:
    """(author, phrase) for the sample searches: the author of the first post, and the first two
    words of the first post whose text starts with two plain ASCII words."""
    author, phrase = "", ""
    for frame in itertools.islice(frames, 200_000):
        if _POST_MARK not in frame or b'"operation":"create"' not in frame:
            continue
        try:
            event = msgspec.json.decode(frame)
            did, text = str(event["did"]), str(event["commit"]["record"].get("text", ""))
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
            continue  # a malformed frame
        author = author or did
        words = text.split()[:2]
        if len(words) == 2 and all(w.isascii() and w.isalpha() for w in words):
            phrase = " ".join(words).lower()  # search is case-insensitive
        if author and phrase:
            break
    return author or "did:plc:" + "a" * 24, phrase or "good morning"


def _render(args: tuple[FirehoseConfig, list[Query], int, int, int]) -> tuple[bytes, _Facts]:
    cfg, queries, start, stop, now = args
    frames = list(itertools.islice(firehose.generate(cfg, start), stop - start))
    facts = scan(frames, queries, now)
    frames.append(b"")
    return zstandard.ZstdCompressor(level=3).compress(b"\n".join(frames)), facts


def synthetic(
    cfg: FirehoseConfig, cache_dir: Path, jobs: int, chunk: int = 100_000
) -> tuple[Path, Expectation, bool]:
    """(capture, expectation, from_cache) of a synthetic stream, rendered once per key."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg)
    capture = cache_dir / f"{key}.jsonl.zst"
    expect_path = cache_dir / f"{key}.expect-v{EXPECTATION_VERSION}.json"
    if capture.is_file() and expect_path.is_file():
        return capture, msgspec.json.decode(expect_path.read_bytes(), type=Expectation), True
    queries = sample_queries(
        firehose.time_at(cfg, 0),
        firehose.time_at(cfg, max(cfg.events - 1, 0)),
        *probes(firehose.generate(cfg)),
    )
    source = f"synthetic seed {cfg.seed}, {cfg.events} events"
    if capture.is_file() and seek_path(capture).is_file():  # a newer expectation of the same bytes
        expectation = rescan(capture, source, queries, jobs)
        _write_atomically(expect_path, msgspec.json.encode(expectation))
        return capture, expectation, True
    now = ev.now_us()
    work = [(cfg, queries, a, min(a + chunk, cfg.events), now) for a in range(0, cfg.events, chunk)]
    facts = _Facts(truth=GroundTruth(deleted_post_uris=None))
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    seek: list[SeekPoint] = []
    with open(tmp, "wb") as out, contextlib.ExitStack() as pool_exit:
        parts: Iterable[tuple[bytes, _Facts]] = map(_render, work)
        if jobs > 1:
            pool = pool_exit.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            parts = pool.imap(_render, work)
        for (_, _, start, _, _), (data, part) in zip(work, parts, strict=True):
            # each chunk is one zstd frame: a reconnect seeks to the frame of its cursor
            first = part.first_time_us or (seek[-1].time_us if seek else 0)
            seek.append(SeekPoint(first, out.tell(), start))
            out.write(data)
            facts.merge(part)
        out.flush()
        os.fsync(out.fileno())
    seek_path(capture).write_bytes(msgspec.json.encode(seek))
    expectation = finish(source, facts, queries)
    os.replace(tmp, capture)
    _write_atomically(expect_path, msgspec.json.encode(expectation))
    return capture, expectation, False


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _scan_frame(args: tuple[Path, int, int, list[Query], int]) -> _Facts:
    path, start, stop, queries, now = args
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(stop - start)
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).split(b"\n")
    return scan((line for line in lines if line), queries, now)


def rescan(capture: Path, source: str, queries: list[Query], jobs: int) -> Expectation:
    """The expectation of a rendered capture, from its zstd frames in parallel (its seek index
    says where each starts)."""
    points = msgspec.json.decode(seek_path(capture).read_bytes(), type=list[SeekPoint])
    ends = [p.offset for p in points[1:]] + [capture.stat().st_size]
    now = ev.now_us()
    work = [(capture, p.offset, end, queries, now) for p, end in zip(points, ends, strict=True)]
    facts = _Facts(truth=GroundTruth(deleted_post_uris=None))
    with contextlib.ExitStack() as pool_exit:
        parts: Iterable[_Facts] = map(_scan_frame, work)
        if jobs > 1:
            pool = pool_exit.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            parts = pool.imap(_scan_frame, work)
        for part in parts:
            facts.merge(part)
    return finish(source, facts, queries)


def recorded(files: list[str]) -> Expectation:
    """The expectation of recorded captures, from one pass over their lines."""
    paths = _expand(files)
    first_us = _time_of(next(_lines(paths), b""))
    # The date range needs the span: a first pass reads only each line's time.
    last_us = first_us
    for line in _lines(paths):
        last_us = _time_of(line) or last_us
    queries = sample_queries(first_us, last_us, *probes(_lines(paths)))
    facts = scan(_lines(paths), queries, ev.now_us())
    return finish("captures: " + ", ".join(str(p) for p in paths), facts, queries)


def _time_of(line: bytes) -> int:
    try:
        return int(line.split(b'"time_us":', 1)[1].split(b",", 1)[0].split(b"}", 1)[0])
    except (IndexError, ValueError):
        return 0


def _expand(files: list[str]) -> list[Path]:
    out: list[Path] = []
    for name in files:
        path = Path(name)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.zst")))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"capture {name} not found")
    if not out:
        raise FileNotFoundError("no capture files (.jsonl or .jsonl.zst) given")
    return out


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with open_lines(path) as fh:
            for line in fh:
                line = line.rstrip(b"\n")
                if line:
                    yield line


def frames_of(paths: Iterable[Path | str]) -> Iterator[bytes]:
    """Every frame of the captures, in order (the direct path's feed)."""
    return _lines([Path(p) for p in paths])


def prepare(
    args: argparse.Namespace, bad_frames: float, events: int
) -> tuple[list[str], Expectation, dict[str, Any]]:
    """(capture paths, expectation, how it was prepared) for a replay's arguments: the recorded
    captures of `--from`, or the synthetic stream of `--seed`/`--scale`, rendered or cached."""
    began = time.perf_counter()
    if args.files:
        paths = [str(p) for p in _expand(args.files)]
        expect = recorded(args.files)
        info: dict[str, Any] = {"from_cache": False}
    else:
        cfg = FirehoseConfig(
            seed=args.seed,
            events=events,
            events_per_day=args.per_day,
            malformed_fraction=bad_frames,
            # about ten posts with the rare word at any scale (one in 100k posts at a day)
            rare_word_every=min(100_000, max(100, events // 100)),
        )
        capture, expect, cached = synthetic(cfg, Path(args.cache), max(args.jobs, 1))
        paths = [str(capture)]
        info = {"from_cache": cached, "capture": str(capture)}
    info["prepare_s"] = round(time.perf_counter() - began, 2)
    return paths, expect, info
