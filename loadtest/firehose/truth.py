"""Ground truth: what a stream should store, per table and day, as a count and an
order-independent digest of natural keys (constant memory), plus rejections and deleted posts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from appliance import events as ev
from appliance.store.layout import DAY_US, at_uri, day_of, natural_key, table_for
from loadtest.firehose.config import _M64, FirehoseConfig
from loadtest.firehose.stream import generate


def key_hash(key: Iterable[str]) -> int:
    """64-bit hash of a natural key (its parts joined by US, 0x1F)."""
    data = "\x1f".join(key).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class KeyDigest(msgspec.Struct):
    """Order-independent digest of a multiset of natural keys: count and sum of key hashes."""

    count: int = 0
    digest: int = 0  # sum of key_hash mod 2**64

    def add(self, key: Iterable[str]) -> None:
        self.count += 1
        self.digest = (self.digest + key_hash(key)) & _M64


def key_digest(keys: Iterable[Iterable[str]]) -> KeyDigest:
    """The digest of natural keys read back from storage; compare with GroundTruth.tables."""
    out = KeyDigest()
    for key in keys:
        out.add(key)
    return out


class GroundTruth(msgspec.Struct):
    """What a stream should store: per table and day, count + digest of natural keys.

    `add(frame)` runs the appliance's own decoder (so the truth follows its rules: same
    rejections, same tables, same keys). Deleted post URIs are kept in a set unless
    keep_deleted is False (at 240M events use the digest only).
    """

    frames: int = 0
    tables: dict[str, dict[str, KeyDigest]] = msgspec.field(default_factory=dict)
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    deleted_posts: KeyDigest = msgspec.field(default_factory=KeyDigest)
    deleted_post_uris: set[str] | None = msgspec.field(default_factory=set)
    max_bytes: int = ev.MAX_EVENT_BYTES

    def add(self, frame: bytes, now: int | None = None) -> ev.Event | str:
        """Count a frame; its decoded event, or the reason it was rejected (a caller that wants
        either need not decode the frame again)."""
        self.frames += 1
        try:
            event = ev.decode(frame, now=now, max_bytes=self.max_bytes)
        except ev.Rejected as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return exc.reason
        table = table_for(event)
        day = _day(event.time_us)
        per_day = self.tables.setdefault(table, {})
        digest = per_day.get(day)
        if digest is None:
            digest = per_day[day] = KeyDigest()
        digest.add(natural_key(event))
        if (
            table == "deletes"
            and isinstance(event, ev.CommitEvent)
            and event.commit.collection == "app.bsky.feed.post"
        ):
            uri = at_uri(event.did, event.commit.collection, event.commit.rkey)
            self.deleted_posts.add((uri,))
            if self.deleted_post_uris is not None:
                self.deleted_post_uris.add(uri)
        return event

    def merge(self, other: GroundTruth) -> None:
        """Add another part of the same stream (e.g. from a parallel worker)."""
        self.frames += other.frames
        for table, days in other.tables.items():
            mine = self.tables.setdefault(table, {})
            for day, digest in days.items():
                into = mine.setdefault(day, KeyDigest())
                into.count += digest.count
                into.digest = (into.digest + digest.digest) & _M64
        for reason, n in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.deleted_posts.count += other.deleted_posts.count
        self.deleted_posts.digest = (self.deleted_posts.digest + other.deleted_posts.digest) & _M64
        if self.deleted_post_uris is not None:
            if other.deleted_post_uris is None:
                self.deleted_post_uris = None
            else:
                self.deleted_post_uris |= other.deleted_post_uris

    def count(self, table: str | None = None) -> int:
        """Valid events stored (in one table, or all)."""
        tables = [table] if table else list(self.tables)
        return sum(d.count for t in tables for d in self.tables.get(t, {}).values())

    @property
    def malformed(self) -> int:
        return sum(n for reason, n in self.rejected.items() if reason != "oversized")

    @property
    def oversized(self) -> int:
        return self.rejected.get("oversized", 0)


_DAYS: dict[int, str] = {}


def _day(time_us: int) -> str:
    key = time_us // DAY_US
    day = _DAYS.get(key)
    if day is None:
        day = _DAYS[key] = day_of(key * DAY_US)
    return day


def ground_truth(
    cfg: FirehoseConfig, *, max_bytes: int = ev.MAX_EVENT_BYTES, keep_deleted: bool = True
) -> GroundTruth:
    """Generate the whole stream and accumulate its ground truth (constant memory)."""
    truth = GroundTruth(max_bytes=max_bytes, deleted_post_uris=set() if keep_deleted else None)
    now = ev.now_us()
    for frame in generate(cfg):
        truth.add(frame, now=now)
    return truth
