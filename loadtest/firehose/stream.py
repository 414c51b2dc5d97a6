"""The stream itself: event i's frame from its core and its block's random generator, and the
public generator functions."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

from appliance.store.layout import DAY_US
from loadtest.firehose.config import (
    _DEL_M,
    _DELETABLE,
    _DELETABLE_LIST,
    _GAMMA,
    _M64,
    _SUBJECT_SPANS,
    BLOCK,
    K_ACCOUNT,
    K_BLOCK,
    K_DELETE,
    K_FOLLOW,
    K_IDENTITY,
    K_LIKE,
    K_POST,
    K_REPOST,
    MALFORMED,
    OK,
    OVERSIZED,
    FirehoseConfig,
    Item,
    _mix,
)
from loadtest.firehose.encoding import (
    _ISO_CACHE,
    _TID10,
    _TID_PREFIXES,
    _blob,
    _corrupt,
    _record_encoder,
    iso_ms,
    iso_prefix,
    tid,
    tid_prefix,
)
from loadtest.firehose.records import _Records

_S0, _S1, _S2 = _SUBJECT_SPANS  # where a like or repost looks for its subject


class _Generator(_Records):
    """A stream's events: each one's frame, built from its core and its block's generator."""

    def items(self, start: int) -> Iterator[Item]:
        cfg = self.cfg
        end = cfg.events
        if start >= end:
            return
        block = start // BLOCK
        i = block * BLOCK
        while i < end:
            rng = random.Random(_mix(self.key ^ (block * _GAMMA & _M64)))
            hashes = self.block_hashes(block)
            kinds = self._block_kinds[block]
            block_end = min(end, (block + 1) * BLOCK)
            while i < block_end:
                k = i & (BLOCK - 1)
                item = self.event(i, rng, hashes[k], kinds[k])
                if i >= start:
                    yield item
                i += 1
            block += 1

    def simple_event(self, i: int, t: int, h: int, kind: int) -> Item:
        """Likes, reposts, follows and blocks (three events in four): the same event as the
        general path would build, with every helper inlined (this is most of the CPU)."""
        pop = self.population
        heads, tails, dids = self.cid_heads, self.cid_tails, self.dids
        did_n = int(pop * (((h >> 16) & 0xFFFFFFFF) / 4294967296.0) ** 3)
        did = dids[did_n] or self.did(did_n)
        created = t - 200_000 - ((h >> 48) & 0x1FFFFF)
        v = created << 10 | (h >> 40) & 0x3FF
        t10 = _TID10
        rkey = (_TID_PREFIXES.get(v >> 30) or tid_prefix(v)) + (
            f"{t10[(v >> 20) & 1023]}{t10[(v >> 10) & 1023]}{t10[v & 1023]}"
        )
        v = (t - 100_000) << 10 | (did_n * 0x2545F491) & 0x3FF
        rev = (_TID_PREFIXES.get(v >> 30) or tid_prefix(v)) + (
            f"{t10[(v >> 20) & 1023]}{t10[(v >> 10) & 1023]}{t10[v & 1023]}"
        )
        x = h >> 20 ^ h << 7
        cid = f"bafyrei{heads[x & 0xFFFF]}{tails[(x >> 16) & 0xFFFF]}"
        sec, rem = divmod(created, 1_000_000)
        created_at = f"{_ISO_CACHE.get(sec) or iso_prefix(sec)}.{rem // 1000:03d}Z"
        if kind in (K_LIKE, K_REPOST):
            collection = "app.bsky.feed.like" if kind == K_LIKE else "app.bsky.feed.repost"
            # find_post(i, h, _SUBJECT_SPANS) inlined: three hashed candidates from one hash.
            z = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            bits = z ^ (z >> 31)
            kind_at = self.kind_at
            j = i - 1 - (bits & 0x1FFFFF) % _S0
            if j < 0 or kind_at(j) != K_POST:
                j = i - 1 - ((bits >> 21) & 0x1FFFFF) % _S1
                if j < 0 or kind_at(j) != K_POST:
                    j = i - 1 - ((bits >> 42) & 0x1FFFFF) % _S2
                    if j < 0 or kind_at(j) != K_POST:
                        j = -1
            uri, scid = self.post_ref(j) if j >= 0 else self.old_ref(h, t)
            via = ""
            if (h >> 59) < 6:  # liked or reposted via someone's repost
                via_uri, via_cid = self.old_ref(h ^ 0x71A, t, "app.bsky.feed.repost")
                via = f',"via":{{"cid":"{via_cid}","uri":"{via_uri}"}}'
            record = (
                f'{{"$type":"{collection}","createdAt":"{created_at}",'
                f'"subject":{{"cid":"{scid}","uri":"{uri}"}}{via}}}'
            )
        else:
            collection = "app.bsky.graph.follow" if kind == K_FOLLOW else "app.bsky.graph.block"
            z = h ^ 0xF0
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            z ^= z >> 31
            n = int(pop * (((z >> 16) & 0xFFFFFFFF) / 4294967296.0) ** 3)
            subject = dids[n] or self.did(n)
            record = f'{{"$type":"{collection}","createdAt":"{created_at}","subject":"{subject}"}}'
        frame = (
            f'{{"did":"{did}","time_us":{t},"kind":"commit","commit":{{"rev":"{rev}",'
            f'"operation":"create","collection":"{collection}","rkey":"{rkey}",'
            f'"record":{record},"cid":"{cid}"}}}}'
        ).encode()
        return Item(i, t, did, collection, frame, OK)

    def event(self, i: int, rng: random.Random, h: int, kind: int) -> Item:
        cfg = self.cfg
        t = cfg.start_us + i * DAY_US // cfg.events_per_day
        flag = self.flag_of(h) if self.bad_cut else OK
        if kind <= K_REPOST and kind != K_POST and flag == OK:
            return self.simple_event(i, t, h, kind)
        if kind == K_BLOCK and flag == OK:
            return self.simple_event(i, t, h, kind)
        did_n = self.did_n_of(h)
        created = t - 200_000 - ((h >> 48) & 0x1FFFFF)
        rkey = tid(created, (h >> 40) & 0x3FF)
        collection = ""
        if kind == K_DELETE:
            did, collection, frame = self._delete_frame(i, t, h, did_n, rkey)
        elif kind in (K_IDENTITY, K_ACCOUNT):
            did, frame = self._identity_or_account_frame(i, t, h, did_n, kind)
        else:
            did, collection, frame = self._commit_frame(
                i, t, h, kind, did_n, rkey, created, flag, rng
            )
        if flag == MALFORMED:
            frame = _corrupt(frame, h)
        return Item(i, t, did, collection, frame, flag)

    def _delete_frame(
        self, i: int, t: int, h: int, did_n: int, rkey: str
    ) -> tuple[str, str, bytes]:
        """(did, collection, frame) of a delete: of a record made earlier in the stream, or of
        one from before it."""
        j = i - _DEL_M * self.del_lags[i % _DEL_M]
        target_kind = self.kind_at(j) if j >= 0 else -1
        if target_kind in _DELETABLE:
            c = self.core(j)
            did_n, rkey, collection = c.did_n, c.rkey, _DELETABLE[target_kind]
        else:  # a record from before the stream
            collection = _DELETABLE_LIST[(h >> 56) % len(_DELETABLE_LIST)]
            rkey = tid(t - 3_600_000_000 - (h >> 24) % (300 * DAY_US), (h >> 30) & 0x3FF)
        did = self.did(did_n)
        rev = tid(t - 100_000, self.clock(did_n))
        frame = (
            f'{{"did":"{did}","time_us":{t},"kind":"commit","commit":{{"rev":"{rev}",'
            f'"operation":"delete","collection":"{collection}","rkey":"{rkey}"}}}}'
        ).encode()
        return did, collection, frame

    def _identity_or_account_frame(
        self, i: int, t: int, h: int, did_n: int, kind: int
    ) -> tuple[str, bytes]:
        did = self.did(did_n)
        seq = self.seq0 + i
        when = iso_ms(t - 500_000)
        if kind == K_IDENTITY:
            handle = f',"handle":"{self.handle(did_n)}"' if h >> 61 else ""
            body = f'"identity":{{"did":"{did}"{handle},"seq":{seq},"time":"{when}"}}'
            return did, f'{{"did":"{did}","time_us":{t},"kind":"identity",{body}}}'.encode()
        # Most account events say "active"; the rest a reason it is not.
        status = "" if h >> 62 else ("deactivated", "takendown", "deleted", "")[(h >> 60) & 3]
        active = "false" if status else "true"
        st = f',"status":"{status}"' if status else ""
        body = f'"account":{{"active":{active},"did":"{did}","seq":{seq}{st},"time":"{when}"}}'
        return did, f'{{"did":"{did}","time_us":{t},"kind":"account",{body}}}'.encode()

    def _commit_frame(
        self,
        i: int,
        t: int,
        h: int,
        kind: int,
        did_n: int,
        rkey: str,
        created: int,
        flag: int,
        rng: random.Random,
    ) -> tuple[str, str, bytes]:
        """(did, collection, frame) of a create or update commit."""
        created_at = iso_ms(created)
        if kind in (K_LIKE, K_REPOST, K_FOLLOW, K_BLOCK):
            # The most common kinds are written straight to JSON (keys in sorted order).
            collection, record_json = self._subject_json(i, t, h, kind, created_at)
            operation, record = "create", None
        else:
            collection, operation, did_n, rkey, record = self._record(
                i, t, h, kind, did_n, rkey, created_at, rng
            )
            record_json = ""
        if flag == OVERSIZED:
            assert record is not None  # an oversized frame is never of the kinds above
            # A post whose images carry an enormous alt text: valid JSON, just too big.
            pad = self.cfg.oversized_bytes
            record["embed"] = {
                "$type": "app.bsky.embed.images",
                "images": [{"alt": "a" * pad, "image": _blob(h, "image/jpeg")}],
            }
        did = self.did(did_n)
        rev = tid(t - 100_000, self.clock(did_n))
        cid = self.cid_of(h)
        head = (
            f'{{"did":"{did}","time_us":{t},"kind":"commit","commit":{{"rev":"{rev}",'
            f'"operation":"{operation}","collection":"{collection}","rkey":"{rkey}",'
            '"record":'
        )
        if record_json:
            return did, collection, f'{head}{record_json},"cid":"{cid}"}}}}'.encode()
        encoded = _record_encoder.encode(record)
        return did, collection, b"".join((head.encode(), encoded, f',"cid":"{cid}"}}}}'.encode()))

    def _subject_json(self, i: int, t: int, h: int, kind: int, created_at: str) -> tuple[str, str]:
        """(collection, record JSON) of a like, repost, follow or block."""
        if kind in (K_LIKE, K_REPOST):
            collection = "app.bsky.feed.like" if kind == K_LIKE else "app.bsky.feed.repost"
            uri, cid = self.subject_ref(i, h, t)
            via = ""
            if (h >> 59) < 6:  # liked or reposted via someone's repost
                via_uri, via_cid = self.old_ref(h ^ 0x71A, t, "app.bsky.feed.repost")
                via = f',"via":{{"cid":"{via_cid}","uri":"{via_uri}"}}'
            return collection, (
                f'{{"$type":"{collection}","createdAt":"{created_at}",'
                f'"subject":{{"cid":"{cid}","uri":"{uri}"}}{via}}}'
            )
        collection = "app.bsky.graph.follow" if kind == K_FOLLOW else "app.bsky.graph.block"
        subject = self.did(self.did_n_of(_mix(h ^ 0xF0)))
        return collection, (
            f'{{"$type":"{collection}","createdAt":"{created_at}","subject":"{subject}"}}'
        )


@functools.lru_cache(maxsize=4)
def _generator(cfg: FirehoseConfig) -> _Generator:
    return _Generator(cfg)


def generate_items(cfg: FirehoseConfig, start_index: int = 0) -> Iterator[Item]:
    """Events `start_index`.. of the stream as Items (frame plus what a server filters on).

    A malformed frame keeps the did and collection of the event it was damaged from, so it
    passes the same filters that event would.
    """
    return _generator(cfg).items(max(0, start_index))


def generate(cfg: FirehoseConfig, start_index: int = 0) -> Iterator[bytes]:
    """Events `start_index`.. of the stream as JSON frames (no trailing newline)."""
    for item in _generator(cfg).items(max(0, start_index)):
        yield item.frame


def flag_at(cfg: FirehoseConfig, index: int) -> int:
    """OK, MALFORMED or OVERSIZED: what event `index` was generated as, without generating it."""
    g = _generator(cfg)
    return g.flag_of(g.h(index))


def deleted_at(cfg: FirehoseConfig, index: int) -> int | None:
    """Index of the delete event that deletes event `index` (None if never, or beyond the end)."""
    g = _generator(cfg)
    i = g.deleted_at(index)
    return i if i is not None and i < cfg.events else None
