"""The generator's per-config state: hashing, the DID population, each event's core (kind,
author, rkey) and references to earlier records, all O(1) from an index without keeping state."""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

from appliance.store.layout import DAY_US
from loadtest.firehose.config import (
    _BLOCK_BITS,
    _DEL_M,
    _GAMMA,
    _KIND_CACHE_BLOCKS,
    _M64,
    _REPLY_SPANS,
    _SUBJECT_SPANS,
    BLOCK,
    DEFAULT_MIX,
    K_DELETE,
    K_POST,
    KINDS,
    MALFORMED,
    OK,
    OVERSIZED,
    FirehoseConfig,
    _mix,
    time_at,
)
from loadtest.firehose.encoding import _cid_from, _cid_halves, tid
from loadtest.firehose.vocabulary import _SYLLABLES, _bank, _cumulative


@functools.cache
def _kind_table(mix: tuple[tuple[str, float], ...]) -> bytes:
    """65536 entries: kind code for the low 16 bits of an event's hash."""
    names = [name for name, _ in mix]
    total = sum(w for _, w in mix)
    table = bytearray(65536)
    edges = [round(c / total * 65536) for c in _cumulative(w for _, w in mix)]
    start = 0
    for name, edge in zip(names, edges, strict=True):
        code = KINDS.index(name)
        table[start:edge] = bytes([code]) * (edge - start)
        start = edge
    return bytes(table)


class _Core(NamedTuple):
    kind: int
    did_n: int
    rkey: str
    h: int


class _Base:
    """Per-config state: hashing, the DID population, cores and references."""

    def __init__(self, cfg: FirehoseConfig) -> None:
        self.cfg = cfg
        self.key = _mix((cfg.seed * _GAMMA) & _M64 ^ 0x5EED)
        self.kinds = _kind_table(tuple(DEFAULT_MIX.items()))
        self.population = cfg.dids
        self.bank = _bank()
        self.mal_cut = int(cfg.malformed_fraction * (1 << 32))
        self.bad_cut = int((cfg.malformed_fraction + cfg.oversized_fraction) * (1 << 32))
        lag_rng = random.Random(self.key ^ 0xDE1E7E)
        # Heavy-tailed lags from 1 to 2**17 classes: seconds to days after the create.
        self.del_lags = [int(2 ** (lag_rng.random() * 17)) for _ in range(_DEL_M)]
        self.seq0 = 31_000_000_000 + (self.key & 0xFFFFFF)
        heads, tails = _cid_halves()
        self.did_heads = [h[1:13] for h in heads]
        self.did_tails = [t[:12] for t in tails]
        self.cid_heads, self.cid_tails = heads, tails
        # Each account's DID once built (a few accounts make most events): about 90 MB at
        # the default population of a million, filled as accounts appear.
        self.dids: list[str | None] = [None] * self.population
        # Kind codes of whole blocks, so "is event j a post?" is a lookup, not a hash.
        self._block_kinds: dict[int, bytes] = {}

    # hashing ------------------------------------------------------------------------------------

    def h(self, i: int) -> int:
        return _mix((self.key + (i + 1) * _GAMMA) & _M64)

    def did_n_of(self, h: int) -> int:
        # Heavy tail: a small share of accounts makes a large share of events.
        u = ((h >> 16) & 0xFFFFFFFF) / 4294967296.0
        return int(self.population * u**3)

    def flag_of(self, h: int) -> int:
        if self.bad_cut == 0:
            return OK
        u = _mix(h ^ 0xBAD) >> 32
        if u < self.mal_cut:
            return MALFORMED
        if u < self.bad_cut:
            return OVERSIZED
        return OK

    def did(self, n: int) -> str:
        """The DID of account n: two 12-char halves from precomputed pools, picked by a hash
        of (seed, n) (2**32 combinations; building each string would cost far more)."""
        did = self.dids[n]
        if did is None:
            x = _mix((n * _GAMMA + self.key) & _M64)
            did = f"did:plc:{self.did_heads[x & 0xFFFF]}{self.did_tails[(x >> 16) & 0xFFFF]}"
            self.dids[n] = did
        return did

    def handle(self, n: int) -> str:
        h = _mix(n ^ self.key ^ 0x4A4D)
        parts = []
        for _ in range(2 + (h & 1)):
            h >>= 6
            parts.append(_SYLLABLES[h % len(_SYLLABLES)])
        name = "".join(parts) + (str(h % 1000) if h & 0x100 else "")
        return f"{name}.bsky.social" if h & 0x1E00 else f"{name}.com"

    def clock(self, n: int) -> int:
        return (n * 0x2545F491) & 0x3FF

    def block_hashes(self, block: int) -> list[int]:
        """The hash of every event of a block (and remember the block's kinds)."""
        key = self.key
        first = block * BLOCK + 1
        hashes = [_mix((key + (first + k) * _GAMMA) & _M64) for k in range(BLOCK)]
        if block not in self._block_kinds:
            table = self.kinds
            kinds = bytearray(table[h & 0xFFFF] for h in hashes)
            if self.bad_cut:
                for k, h in enumerate(hashes):
                    if self.flag_of(h) == OVERSIZED:
                        kinds[k] = K_POST
            if len(self._block_kinds) >= _KIND_CACHE_BLOCKS:
                del self._block_kinds[next(iter(self._block_kinds))]  # the oldest
            self._block_kinds[block] = bytes(kinds)
        return hashes

    def kind_at(self, j: int) -> int:
        """Kind of event j as generated (oversized frames are always posts)."""
        kinds = self._block_kinds.get(j >> _BLOCK_BITS)
        if kinds is not None:
            return kinds[j & (BLOCK - 1)]
        # A block nobody generated lately (a delete reaches up to 33M events back): hash this
        # one event, not its whole block; caching such blocks would evict the recent ones.
        h = _mix((self.key + (j + 1) * _GAMMA) & _M64)
        if self.bad_cut and self.flag_of(h) == OVERSIZED:
            return K_POST
        return self.kinds[h & 0xFFFF]

    def core(self, j: int) -> _Core:
        """What other events need to know about event j: kind, author, rkey (creates)."""
        h = self.h(j)
        t = time_at(self.cfg, j)
        kind = self.kind_at(j)
        # rkey TIDs come from the client clock, up to ~2 s before the relay saw the commit.
        rkey = tid(t - 200_000 - ((h >> 48) & 0x1FFFFF), (h >> 40) & 0x3FF)
        return _Core(kind, self.did_n_of(h), rkey, h)

    def cid_of(self, h: int) -> str:
        return _cid_from(h >> 20 ^ h << 7)

    def deleted_at(self, j: int) -> int | None:
        """The index of the delete that targets event j, if the stream (unbounded) has one."""
        i = j + _DEL_M * self.del_lags[j % _DEL_M]
        return i if self.kind_at(i) == K_DELETE else None

    def find_post(self, i: int, h: int, spans: tuple[int, ...]) -> int | None:
        """An earlier post index (one of a few hashed candidates), or None."""
        bits = 0
        for k, span in enumerate(spans):
            if k % 3 == 0:
                bits = _mix(h + k)
            j = i - 1 - ((bits >> (21 * (k % 3))) & 0x1FFFFF) % span
            if j >= 0 and self.kind_at(j) == K_POST:
                return j
        return None

    def post_ref(self, j: int) -> tuple[str, str]:
        """(uri, cid) of post j (what core(j) gives, without the rest)."""
        h = _mix((self.key + (j + 1) * _GAMMA) & _M64)
        t = self.cfg.start_us + j * DAY_US // self.cfg.events_per_day
        rkey = tid(t - 200_000 - ((h >> 48) & 0x1FFFFF), (h >> 40) & 0x3FF)
        return f"at://{self.did(self.did_n_of(h))}/app.bsky.feed.post/{rkey}", self.cid_of(h)

    def old_ref(self, h: int, t: int, collection: str = "app.bsky.feed.post") -> tuple[str, str]:
        """A record from before the stream (weeks to a year old)."""
        h2 = _mix(h ^ 0x01D)
        did = self.did(self.did_n_of(h2))
        age = 60_000_000 + (h2 >> 20) % (365 * DAY_US)
        return f"at://{did}/{collection}/{tid(t - age, h2 & 0x3FF)}", self.cid_of(h2)

    def subject_ref(self, i: int, h: int, t: int) -> tuple[str, str]:
        j = self.find_post(i, h, _SUBJECT_SPANS)
        return self.post_ref(j) if j is not None else self.old_ref(h, t)

    def root_of(self, j: int, depth: int = 0) -> tuple[str, str]:
        """Root of post j's thread: j itself unless j is an in-stream reply (bounded depth)."""
        h = self.h(j)
        if depth < 8 and self.kind_at(j) == K_POST and (h >> 58) < 22:
            parent = self.find_post(j, h ^ 0xAE, _REPLY_SPANS)
            if parent is not None:
                return self.root_of(parent, depth + 1)
            return self.old_ref(h ^ 0xAE, time_at(self.cfg, j))
        return self.post_ref(j)
