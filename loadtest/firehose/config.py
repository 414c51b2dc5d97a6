"""The stream's parameters: its config, the kinds and their mix, where event i sits in time,
and the 64-bit hash everything else is derived from."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from appliance import events as ev
from appliance.store.layout import DAY_US

DEFAULT_START_US = 1_782_864_000_000_000  # 2026-07-01T00:00:00Z
DEFAULT_EVENTS_PER_DAY = 8_100_000
_BLOCK_BITS = 10
BLOCK = 1 << _BLOCK_BITS  # events per content block (one random generator each)
_KIND_CACHE_BLOCKS = 8192  # remembered blocks of kinds: 8M events back, 8 MB

# Words a search benchmark can rely on. They never occur by accident: the vocabulary, handles
# and link paths are built so that none of them contains these strings (checked at build time).
COMMON_WORD = "lighthouse"  # in about COMMON_WORD_FRACTION of posts (20% as "Lighthouse")
COMMON_WORD_FRACTION = 0.03
RARE_WORD = "xylophonist"  # in one post in FirehoseConfig.rare_word_every (100k by default)
ABSENT_WORD = "zqxjvwk"  # in no post

# The default mix: fraction of events per kind. Deletes refer to earlier creates (or to records
# from before the stream); post_update edits an earlier post; threadgate/postgate gate an
# earlier post of the same author; unknown = non-app.bsky collections.
DEFAULT_MIX: dict[str, float] = {
    "like": 0.514,
    "follow": 0.15,
    "post": 0.11,
    "repost": 0.10,
    "delete": 0.035,
    "listitem": 0.03,
    "block": 0.015,
    "profile": 0.012,
    "threadgate": 0.008,
    "postgate": 0.003,
    "post_update": 0.001,
    "identity": 0.008,
    "account": 0.004,
    "unknown": 0.006,
    "other_bsky": 0.004,
}
KINDS = tuple(DEFAULT_MIX)
(
    K_LIKE,
    K_FOLLOW,
    K_POST,
    K_REPOST,
    K_DELETE,
    K_LISTITEM,
    K_BLOCK,
    K_PROFILE,
    K_THREADGATE,
    K_POSTGATE,
    K_POST_UPDATE,
    K_IDENTITY,
    K_ACCOUNT,
    K_UNKNOWN,
    K_OTHER_BSKY,
) = range(len(KINDS))

# Creates a delete may target, and their collections.
_DELETABLE = {
    K_LIKE: "app.bsky.feed.like",
    K_FOLLOW: "app.bsky.graph.follow",
    K_POST: "app.bsky.feed.post",
    K_REPOST: "app.bsky.feed.repost",
    K_BLOCK: "app.bsky.graph.block",
    K_LISTITEM: "app.bsky.graph.listitem",
}
_DELETABLE_LIST = tuple(_DELETABLE.values())

# Bad-frame flags.
OK, MALFORMED, OVERSIZED = 0, 1, 2

# How far back (in events) a reply looks for its parent: recent first, then hours, days.
_REPLY_SPANS = (2_000, 5_000, 20_000, 100_000, 400_000, 2_000_000)

# Where a like or repost looks for its subject.
_SUBJECT_SPANS = (20_000, 400_000, 4_000_000)

# Delete lag classes: the delete at i targets i - _DEL_M * lag[i % _DEL_M].
_DEL_M = 256

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class FirehoseConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What stream to generate. Same config, same bytes."""

    seed: int = 1
    events: int = 10_000
    events_per_day: int = DEFAULT_EVENTS_PER_DAY
    start_us: int = DEFAULT_START_US
    malformed_fraction: float = 0.0
    oversized_fraction: float = 0.0
    oversized_bytes: int = 1_100_000
    # Size of the DID population; 0 = events_per_day // 8 (at least 1000).
    population: int = 0
    # One post in this many carries RARE_WORD (chosen by hash, independent of the content).
    rare_word_every: int = 100_000

    def __post_init__(self) -> None:
        if self.events < 0:
            raise ValueError(f"events must be >= 0, not {self.events}")
        if not 1 <= self.events_per_day <= DAY_US:
            raise ValueError(f"events_per_day must be in 1..{DAY_US} (one per µs at most)")
        if self.start_us < ev.MIN_TIME_US:
            raise ValueError(f"start_us {self.start_us} is before 2020 (seconds or ms by mistake?)")
        for name in ("malformed_fraction", "oversized_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        if self.malformed_fraction + self.oversized_fraction > 1.0:
            raise ValueError("malformed_fraction + oversized_fraction must be <= 1")
        if self.oversized_bytes < 1024:
            raise ValueError("oversized_bytes must be >= 1024")
        if self.population < 0:
            raise ValueError("population must be >= 0")
        if self.rare_word_every < 1:
            raise ValueError("rare_word_every must be >= 1")

    @property
    def dids(self) -> int:
        return self.population or max(1000, self.events_per_day // 8)

    @property
    def end_us(self) -> int:
        """time_us of the first event after the stream (exclusive end)."""
        return time_at(self, self.events)


def time_at(cfg: FirehoseConfig, index: int) -> int:
    """time_us of event `index`."""
    return cfg.start_us + index * DAY_US // cfg.events_per_day


def index_at(cfg: FirehoseConfig, time_us: int) -> int:
    """The first index whose time_us >= time_us, clamped to [0, cfg.events]."""
    delta = time_us - cfg.start_us
    if delta <= 0:
        return 0
    index = -(-delta * cfg.events_per_day // DAY_US)  # ceil
    return min(index, cfg.events)


class Item(NamedTuple):
    """One frame of a source with what a server filters on (did, collection; "" if no commit).

    `position` is the frame's place in its source (the generator index, or the line number
    across recorded files): test hooks and Jetstream-free bookkeeping refer to it.
    """

    position: int
    time_us: int
    did: str
    collection: str
    frame: bytes
    flag: int = OK
