"""A deterministic, seeded synthetic Jetstream v1 firehose, and the ground truth to verify it by.

Event `i` of a stream is a pure function of (config, i):

- its time_us is `start_us + i * DAY_US // events_per_day` (strictly increasing, so a cursor
  selects exactly, see `index_at`);
- its "core" (kind, author DID, rkey, CID, bad-frame flag) comes from a 64-bit hash of
  (seed, i), so any event can look at any earlier event's core in O(1): deletes, updates,
  replies, quotes, likes and reposts refer to records "generated earlier" without keeping state;
- its content (text, embeds, ...) comes from a per-block random generator (blocks of
  `BLOCK` events), so seeking costs at most one block of generation.

Deletes are an injective map: the delete at index i targets index `i - M * lag(i mod M)`, so no
record is deleted twice, and `deleted_at(j)` finds the one index that may delete j.

`GroundTruth` accumulates, per (table, day), a count and an order-independent digest of the
natural keys of valid events (see `key_digest`), plus rejection counts and the deleted post URIs,
so a verifier can compare Parquet contents exactly in constant memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import math
import random
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple

import msgspec

from appliance import events as ev
from appliance.store.layout import DAY_US, at_uri, day_of, natural_key, table_for

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


# --- encodings ---------------------------------------------------------------------------------

# base64.b32encode is pure Python (slow); these tables encode 5 or 10 bits per lookup.
_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648, lower case (did:plc, CIDs)
_B32_SORT = "234567abcdefghijklmnopqrstuvwxyz"  # atproto's sortable base32 (TIDs)
_TID10 = [_B32_SORT[k >> 5] + _B32_SORT[k & 31] for k in range(1024)]
# Any byte -> a base32 character (low 5 bits); for digests of random bytes.
_BYTE_TO_B32 = bytes(_B32[b & 31].encode()[0] for b in range(256))


_TID_PREFIXES: dict[int, str] = {}  # the first 7 chars change once a second or so


def tid(time_us: int, clock_id: int) -> str:
    """An atproto TID: 53-bit µs timestamp + 10-bit clock id, base32-sortable, 13 chars."""
    v = (time_us << 10) | (clock_id & 0x3FF)
    t = _TID10
    prefix = _TID_PREFIXES.get(v >> 30)
    if prefix is None:
        if len(_TID_PREFIXES) > 100_000:
            _TID_PREFIXES.clear()
        prefix = (
            f"{_B32_SORT[v >> 60]}{t[(v >> 50) & 1023]}{t[(v >> 40) & 1023]}{t[(v >> 30) & 1023]}"
        )
        _TID_PREFIXES[v >> 30] = prefix
    return f"{prefix}{t[(v >> 20) & 1023]}{t[(v >> 10) & 1023]}{t[v & 1023]}"


# Multiplying a 64-bit hash by this odd 512-bit constant spreads it over 64 bytes that look
# random: far cheaper than a hash function per identifier.
_SPREAD = (
    0xD6E8FEB86659FD93_2B7E151628AED2A6_ABF7158809CF4F3C_762E7160F38B4DA5 << 256
    | 0x9E3779B97F4A7C15_F39CC0605CEDC834_1082276BF3A27251_F86C6A11D0C18E95
)


def _spread(h: int, n: int) -> bytes:
    """n (<= 56) pseudo-random bytes derived from a 64-bit hash."""
    return ((h | (1 << 64)) * _SPREAD).to_bytes(80, "little")[8 : 8 + n]


@functools.cache
def _cid_halves() -> tuple[list[str], list[str]]:
    """Two pools of 65,536 random half-digests (26 base32 chars each): a CID body is one of
    each, picked by 32 bits of a hash. The first char of a digest carries 2 bits of the length
    byte (zero), the last 2 bits of padding (zero)."""
    heads, tails = [], []
    for n in range(65536):
        raw = _spread(_mix(n ^ 0xC1D0), 52)
        heads.append(_B32[raw[0] & 7] + raw[1:26].translate(_BYTE_TO_B32).decode())
        tails.append(raw[26:51].translate(_BYTE_TO_B32).decode() + _B32[raw[51] & 28])
    return heads, tails


def _cid_from(h: int, prefix: str = "bafyrei") -> str:
    """A CIDv1 string for hash h: dag-cbor sha-256 ("bafyrei...", 59 chars) or raw
    ("bafkrei...")."""
    heads, tails = _cid_halves()
    return f"{prefix}{heads[h & 0xFFFF]}{tails[(h >> 16) & 0xFFFF]}"


def _blob_cid(bits: int) -> str:
    return _cid_from(_mix(bits ^ 0xB10B), "bafkrei")


_ISO_CACHE: dict[int, str] = {}


def iso_ms(time_us: int) -> str:
    """RFC 3339 UTC with milliseconds, like atproto's createdAt."""
    sec, rem = divmod(time_us, 1_000_000)
    prefix = _ISO_CACHE.get(sec)
    if prefix is None:
        if len(_ISO_CACHE) > 4096:
            _ISO_CACHE.clear()
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ISO_CACHE[sec] = prefix
    return f"{prefix}.{rem // 1000:03d}Z"


_record_encoder = msgspec.json.Encoder(order="sorted")

# --- vocabulary ----------------------------------------------------------------------------------

_WORDS: dict[str, str] = {
    "en": (
        "the a and to of in is it that this for on with you i my we they just so but not be are "
        "was have at what all like about out up get one time people new day today really think "
        "know good love going make would now still more only very first last night morning week "
        "year game music book movie show art photo news city world government election weather "
        "coffee dog cat friends work home happy sad great best thing things want need feel look "
        "see read write watch play listen again never always maybe here there every someone "
        "everyone nothing because after before while though right left long little big small "
        "old young story song album team season weekend summer winter rain sun sky ocean "
        "mountain garden kitchen dinner lunch breakfast school class paper research data science "
        "history future tomorrow yesterday finally actually literally honestly seriously pretty "
        "much many some any other same different free open close start stop back down over under "
        "through into from by if when how why who where which their them our your his her its ok "
        "yes no lol omg wow thanks please sorry hello vote court policy market price climate "
        "energy bird tree flower river train bike street office meeting deadline draft chapter "
        "painting drawing sketch stream episode trailer concert guitar drums piano"
    ),
    "pt": (
        "eu você não que de e o a é um uma para com mais muito hoje dia gente amor tudo bem "
        "obrigado agora ainda sempre nunca casa trabalho vida mundo coisa tempo ano noite bom boa "
        "feliz saudade música filme livro futebol praia café cidade governo eleição amigos "
        "família pessoas queria acho sei vou tem está foi ser ter fazer ver olha demais né kkkk "
        "aqui lá então porque quando como"
    ),
    "es": (
        "yo tú que de y la el en un una para con más muy hoy día gente amor todo bien gracias "
        "ahora todavía siempre nunca casa trabajo vida mundo cosa tiempo año noche bueno feliz "
        "música película libro fútbol playa café ciudad gobierno elecciones amigos familia "
        "personas quiero creo sé voy tiene está fue ser hacer ver mira jaja aquí allí entonces "
        "porque cuando cómo mañana señor niño"
    ),
    "de": (
        "ich du und der die das ist nicht ein eine mit auf für heute Tag Leute Liebe alles gut "
        "danke jetzt noch immer nie Haus Arbeit Leben Welt Zeit Jahr Nacht schön Musik Film Buch "
        "Fußball Stadt Regierung Wahl Freunde Familie Menschen möchte glaube weiß gehe hat war "
        "sein haben machen sehen schau hier dort dann weil wenn wie Straße Grüße über müssen "
        "können wirklich"
    ),
    "fr": (
        "je tu que de et la le les est pas un une pour avec plus très aujourd'hui jour gens amour "
        "tout bien merci maintenant encore toujours jamais maison travail vie monde chose temps "
        "année nuit bon heureux musique film livre ville gouvernement élection amis famille voir "
        "faire être avoir ici là alors parce quand comment déjà où ça c'est été même"
    ),
    "ru": (
        "я ты и в не на что это как так уже сегодня день люди любовь всё хорошо спасибо сейчас "
        "ещё всегда никогда дом работа жизнь мир время год ночь музыка фильм книга город друзья "
        "семья очень просто когда потому здесь там новый хочу думаю знаю"
    ),
    "tr": (
        "ben sen ve bir bu çok ne için ile gibi ama daha bugün gün insanlar aşk her şey iyi "
        "teşekkürler şimdi hâlâ asla ev iş hayat dünya zaman yıl gece müzik film kitap şehir "
        "hükümet seçim arkadaşlar aile güzel değil var yok oldu"
    ),
    "ko": (
        "나는 너무 오늘 정말 진짜 그리고 하지만 사람들 사랑 모든 좋아요 감사합니다 지금 아직 항상 "
        "집 일 인생 세상 시간 밤 음악 영화 책 도시 친구 가족 보고 싶다 했어요 있어요 없어요 "
        "이쁘시네용 ㅋㅋㅋ ㅠㅠ 같아요 합니다"
    ),
    # Japanese is written without spaces: these are chunks joined directly.
    "ja": (
        "今日は 本当に ちょっと みんな ありがとう 楽しかった 待って 観ようと思ってたのに "
        "知らなかった よかった 明日 仕事 天気 ご飯 美味しい かわいい すごい 疲れた 眠い 音楽 映画 "
        "ゲーム 友達 家族 猫 犬 写真 行ってきた してる です ます けど から ので って ね よ の が を "
        "に で と も は 新しい 絵 描いた 配信 ライブ"
    ),
}
_LANG_WEIGHTS = {
    "en": 0.55,
    "ja": 0.12,
    "pt": 0.10,
    "es": 0.06,
    "de": 0.05,
    "fr": 0.04,
    "ko": 0.03,
    "ru": 0.03,
    "tr": 0.02,
}
_EMOJI = "😂 ❤️ 🥺 ✨ 😭 🙏 👍 🔥 💙 🦋 😍 🎉 👀 😅 🤔 💦 🌸 ☀️ 🙌🏽 👨‍👩‍👧 🏳️‍🌈 🐈".split()  # noqa: SIM905
_HASHTAGS = (  # noqa: SIM905
    "art photography bluesky music books gaming politics science news caturday dogsofbluesky "
    "nature AI writing film football vtuber illustration fediverse OC イラスト 絵描きさんと繋がりたい "
    "사진 Fotografie arte histoire IndieRebellion"
).split()
_LINK_DOMAINS = (
    "www.youtube.com/watch?v=",
    "www.theguardian.com/world/2026/jul/",
    "github.com/",
    "en.wikipedia.org/wiki/",
    "www.nytimes.com/2026/07/",
    "open.spotify.com/track/",
    "www.tumblr.com/",
    "arxiv.org/abs/2607.",
    "www.reuters.com/world/",
    "www.spiegel.de/politik/",
    "g1.globo.com/",
    "elpais.com/",
    "www.nhk.or.jp/news/",
)
_PATH_ALPHABET = "abcdefghikmnoprstuvwABCDEFGHJKLMNPRSTUVW0123456789-_"  # no q, x, j, y, z
_SYLLABLES = [c + v for c in "bdfgklmnprstv" for v in "aeiou"]
_ALT_TEXTS = (
    "",
    "",
    "A photo of a cat sleeping on a windowsill",
    "Screenshot of a news article",
    "Sunset over the sea with orange clouds",
    "Digital drawing of a girl with blue hair",
    "A bowl of ramen on a wooden table",
    "Chart showing rising temperatures since 1950",
)
_TITLES = (
    "What does the anniversary mean to people?",
    "Scientists find new species in the deep sea",
    "Live: election results as they come in",
    "The best albums of the year so far",
    "How to start a garden on a balcony",
)
_DESCRIPTIONS = ("YouTube video by Reuters", "", "Read more on our site.", "An essay in ten parts")


class _Bank:
    """Pre-built sentences per language: (text, utf-8 bytes, graphemes), built once."""

    def __init__(self) -> None:
        rng = random.Random(20260701)
        self.sentences: dict[str, list[tuple[str, int, int]]] = {}
        forbidden = (COMMON_WORD, RARE_WORD, ABSENT_WORD)
        for lang, words_text in _WORDS.items():
            words = words_text.split()
            out: list[tuple[str, int, int]] = []
            for _ in range(600):
                n = rng.randint(1, 4) if rng.random() < 0.3 else rng.randint(3, 14)
                chosen = rng.choices(words, k=n)
                if lang == "ja":
                    text = "".join(chosen) + rng.choice(("。", "！", "…", "w", "", "💦"))
                else:
                    text = " ".join(chosen)
                    text = text[0].upper() + text[1:] + rng.choice((".", "!", "?", "", "...", ","))
                assert not any(f in text.lower() for f in forbidden)
                out.append((text, len(text.encode()), _graphemes(text)))
            self.sentences[lang] = out
        self.langs = list(_LANG_WEIGHTS)
        self.lang_cum = list(_cumulative(_LANG_WEIGHTS.values()))
        self.emoji = [(e, len(e.encode())) for e in _EMOJI]
        self.tags = [(t, len(t.encode()) + 1) for t in _HASHTAGS]


def _graphemes(text: str) -> int:
    """Grapheme count for our vocabulary (no combining marks; each emoji counted once)."""
    count = len(text)
    for emoji in _EMOJI:
        if len(emoji) > 1 and emoji in text:
            count -= text.count(emoji) * (len(emoji) - 1)
    return count


def _cumulative(weights: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


@functools.cache
def _bank() -> _Bank:
    return _Bank()


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


# --- the generator ---------------------------------------------------------------------------------


class _Core(NamedTuple):
    kind: int
    did_n: int
    rkey: str
    h: int


class _Generator:
    """Per-config state: hashing, the DID population, and event builders."""

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
        x = _mix((n * _GAMMA + self.key) & _M64)
        return f"did:plc:{self.did_heads[x & 0xFFFF]}{self.did_tails[(x >> 16) & 0xFFFF]}"

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
        if kinds is None:
            self.block_hashes(j >> _BLOCK_BITS)
            kinds = self._block_kinds[j >> _BLOCK_BITS]
        return kinds[j & (BLOCK - 1)]

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

    # events -------------------------------------------------------------------------------------

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
        general path would build, with the helpers inlined."""
        did_n = int(self.population * (((h >> 16) & 0xFFFFFFFF) / 4294967296.0) ** 3)
        x = _mix((did_n * _GAMMA + self.key) & _M64)
        did = f"did:plc:{self.did_heads[x & 0xFFFF]}{self.did_tails[(x >> 16) & 0xFFFF]}"
        created = t - 200_000 - ((h >> 48) & 0x1FFFFF)
        rkey = tid(created, (h >> 40) & 0x3FF)
        rev = tid(t - 100_000, (did_n * 0x2545F491) & 0x3FF)
        cid = _cid_from(h >> 20 ^ h << 7)
        created_at = iso_ms(created)
        if kind in (K_LIKE, K_REPOST):
            collection = "app.bsky.feed.like" if kind == K_LIKE else "app.bsky.feed.repost"
            j = self.find_post(i, h, _SUBJECT_SPANS)
            uri, scid = self.post_ref(j) if j is not None else self.old_ref(h, t)
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
            subject = self.did(self.did_n_of(_mix(h ^ 0xF0)))
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

    def _record(
        self,
        i: int,
        t: int,
        h: int,
        kind: int,
        did_n: int,
        rkey: str,
        created_at: str,
        rng: random.Random,
    ) -> tuple[str, str, int, str, dict[str, Any]]:
        """(collection, operation, did_n, rkey, record) of the other commit kinds."""
        if kind == K_POST:
            record = self.post_record(i, h, t, created_at, rng)
            return "app.bsky.feed.post", "create", did_n, rkey, record
        if kind == K_POST_UPDATE:
            edited = self.find_post(i, h, (50_000, 1_000_000))
            if edited is not None and self.deleted_at(edited) is None:
                c = self.core(edited)
                did_n, rkey = c.did_n, c.rkey
            else:  # edit of a post from before the stream
                rkey = tid(t - 86_400_000_000 - (h >> 30) % (30 * DAY_US), h & 0x3FF)
            record = self.post_record(i, h, t, created_at, rng)
            return "app.bsky.feed.post", "update", did_n, rkey, record
        if kind == K_LISTITEM:
            collection = "app.bsky.graph.listitem"
            owner = self.did(did_n)
            list_rkey = tid(DEFAULT_START_US - (did_n % 1000) * 3_600_000_000, did_n & 0x3FF)
            record = {
                "$type": collection,
                "createdAt": created_at,
                "list": f"at://{owner}/app.bsky.graph.list/{list_rkey}",
                "subject": self.did(self.did_n_of(_mix(h ^ 0x11))),
            }
            return collection, "create", did_n, rkey, record
        if kind == K_PROFILE:
            operation = "update" if (h >> 60) else "create"
            record = self.profile_record(did_n, h, created_at, rng)
            return "app.bsky.actor.profile", operation, did_n, "self", record
        if kind in (K_THREADGATE, K_POSTGATE):
            return self._gate_record(i, h, kind, did_n, rkey, created_at)
        if kind == K_UNKNOWN:
            collection, operation, rkey, record = self.unknown_record(h, t, rkey, rng)
        else:
            collection, operation, rkey, record = self.other_bsky_record(h, t, rkey, rng)
        return collection, operation, did_n, rkey, record

    def _gate_record(
        self, i: int, h: int, kind: int, did_n: int, rkey: str, created_at: str
    ) -> tuple[str, str, int, str, dict[str, Any]]:
        """A threadgate or postgate of a post made earlier in the stream (or of its own)."""
        gated = self.find_post(i, h, (2_000, 50_000))
        if gated is not None:
            c = self.core(gated)
            did_n, rkey = c.did_n, c.rkey
        post_uri = f"at://{self.did(did_n)}/app.bsky.feed.post/{rkey}"
        if kind == K_THREADGATE:
            rules = (
                [{"$type": "app.bsky.feed.threadgate#mentionRule"}],
                [{"$type": "app.bsky.feed.threadgate#followingRule"}],
                [],
            )[h % 3]
            record = {
                "$type": "app.bsky.feed.threadgate",
                "allow": rules,
                "createdAt": created_at,
                "hiddenReplies": [],
                "post": post_uri,
            }
            return "app.bsky.feed.threadgate", "create", did_n, rkey, record
        record = {
            "$type": "app.bsky.feed.postgate",
            "createdAt": created_at,
            "detachedEmbeddingUris": [],
            "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}],
            "post": post_uri,
        }
        return "app.bsky.feed.postgate", "create", did_n, rkey, record

    # records ------------------------------------------------------------------------------------

    def post_record(
        self, i: int, h: int, t: int, created_at: str, rng: random.Random
    ) -> dict[str, Any]:
        # The draws from rng come in a fixed order (text, langs, embed): the same seed gives
        # the same bytes.
        text, facets, lang, external_uri = self._post_text(h, rng)
        record: dict[str, Any] = {
            "$type": "app.bsky.feed.post",
            "createdAt": created_at,
            "text": text,
        }
        if facets:
            record["facets"] = facets
        r = rng.random()
        if r < 0.93:
            record["langs"] = [lang]
        elif r < 0.97:
            record["langs"] = [lang, "en" if lang != "en" else "es"]
        reply = self._reply(i, h, t)
        if reply is not None:
            record["reply"] = reply
        embed = self._post_embed(i, h, t, rng, external_uri)
        if embed is not None:
            record["embed"] = embed
        return record

    def _post_text(
        self, h: int, rng: random.Random
    ) -> tuple[str, list[dict[str, Any]], str, str | None]:
        """(text, facets, language, external link or None) of a post: sentences of its
        language up to a length drawn from a long-tailed shape, maybe the benchmark words,
        emoji, a mention, a link and hashtags, with facets at the right UTF-8 byte offsets."""
        bank = self.bank
        r = rng.random()
        lang = bank.langs[_bisect(bank.lang_cum, r * bank.lang_cum[-1])]
        sentences = bank.sentences[lang]
        sep = "" if lang == "ja" else " "
        # Length in graphemes: many short posts, a long tail up to the 300 limit.
        shape = rng.random()
        target = (
            rng.randint(3, 60)
            if shape < 0.45
            else rng.randint(60, 200)
            if shape < 0.85
            else rng.randint(200, 300)
        )
        text_ = _PostText(sep)
        add = text_.add
        extras = rng.random()
        if extras < COMMON_WORD_FRACTION:
            word = COMMON_WORD if rng.random() < 0.8 else COMMON_WORD.capitalize()
            add(word, len(word), len(word))
        if _mix(h ^ 0x4A4E) % self.cfg.rare_word_every == 0:
            add(RARE_WORD, len(RARE_WORD), len(RARE_WORD))
        while text_.ngraph < target:
            # Prefer a sentence that fits the target length; a few tries, then the shortest.
            text, tb, tg = sentences[int(rng.random() * len(sentences))]
            for _ in range(3):
                if text_.ngraph + tg <= target:
                    break
                other = sentences[int(rng.random() * len(sentences))]
                if other[2] < tg:
                    text, tb, tg = other
            if not add(text, tb, tg):
                break
            if rng.random() < 0.12:
                emoji, eb = bank.emoji[int(rng.random() * len(bank.emoji))]
                add(emoji, eb, 1)
        if rng.random() < 0.08:
            n = self.did_n_of(_mix(h ^ 0x3E))
            handle = "@" + self.handle(n)
            add(
                handle,
                len(handle),
                len(handle),
                {"$type": "app.bsky.richtext.facet#mention", "did": self.did(n)},
            )
        external_uri = None
        if rng.random() < 0.10:
            domain = _LINK_DOMAINS[int(rng.random() * len(_LINK_DOMAINS))]
            path = "".join(rng.choices(_PATH_ALPHABET, k=rng.randint(6, 40)))
            external_uri = f"https://{domain}{path}"
            shown = domain + path
            if len(shown) > 30:
                shown = shown[:27] + "..."
            add(
                shown,
                len(shown),
                len(shown),
                {"$type": "app.bsky.richtext.facet#link", "uri": external_uri},
            )
        if rng.random() < 0.15:
            for _ in range(1 + int(rng.random() * 3)):
                tag, tb = bank.tags[int(rng.random() * len(bank.tags))]
                add(
                    "#" + tag,
                    tb,
                    len(tag) + 1,
                    {"$type": "app.bsky.richtext.facet#tag", "tag": tag},
                )
        return "".join(text_.parts), text_.facets, lang, external_uri

    def _reply(self, i: int, h: int, t: int) -> dict[str, Any] | None:
        """The reply reference of a post (about a third are replies), or None."""
        if (h >> 58) < 22:  # ~34% of posts are replies
            parent = self.find_post(i, h ^ 0xAE, _REPLY_SPANS)
            if parent is not None:
                puri, pcid = self.post_ref(parent)
                ruri, rcid = self.root_of(parent)
            else:
                puri, pcid = self.old_ref(h ^ 0xAE, t)
                ruri, rcid = (puri, pcid) if h & 0x80 else self.old_ref(h ^ 0xA0, t)
            return {"parent": {"cid": pcid, "uri": puri}, "root": {"cid": rcid, "uri": ruri}}
        return None

    def _post_embed(
        self, i: int, h: int, t: int, rng: random.Random, external_uri: str | None
    ) -> dict[str, Any] | None:
        """A post's embed: an external card for its link, images, a video, a quote (with or
        without media), or None."""
        embed = rng.random()
        if external_uri is not None and embed < 0.6:
            return {
                "$type": "app.bsky.embed.external",
                "external": {
                    "description": _DESCRIPTIONS[int(rng.random() * len(_DESCRIPTIONS))],
                    "thumb": _blob(rng.getrandbits(64), "image/jpeg"),
                    "title": _TITLES[int(rng.random() * len(_TITLES))],
                    "uri": external_uri,
                },
            }
        elif embed < 0.20:
            return self.images(rng)
        elif embed < 0.24:
            return {
                "$type": "app.bsky.embed.video",
                "aspectRatio": {"height": 1920, "width": 1080},
                "video": _blob(rng.getrandbits(64), "video/mp4"),
            }
        elif embed < 0.32:
            quoted = self.find_post(i, h ^ 0x9A, (50_000, 1_000_000))
            uri, cid = self.post_ref(quoted) if quoted is not None else self.old_ref(h ^ 0x9A, t)
            quote = {"$type": "app.bsky.embed.record", "record": {"cid": cid, "uri": uri}}
            if embed < 0.26:
                return {
                    "$type": "app.bsky.embed.recordWithMedia",
                    "media": self.images(rng),
                    "record": quote,
                }
            return quote
        return None

    def images(self, rng: random.Random) -> dict[str, Any]:
        images = []
        for _ in range(1 + int(rng.random() ** 3 * 4)):
            width = 400 + int(rng.random() * 3600)
            images.append(
                {
                    "alt": _ALT_TEXTS[int(rng.random() * len(_ALT_TEXTS))],
                    "aspectRatio": {"height": 300 + int(rng.random() * 3000), "width": width},
                    "image": _blob(rng.getrandbits(64), "image/jpeg"),
                }
            )
        return {"$type": "app.bsky.embed.images", "images": images}

    def profile_record(
        self, did_n: int, h: int, created_at: str, rng: random.Random
    ) -> dict[str, Any]:
        sentences = self.bank.sentences["en" if h & 1 else "pt"]
        handle = self.handle(did_n)
        return {
            "$type": "app.bsky.actor.profile",
            "avatar": _blob(h, "image/jpeg"),
            "createdAt": created_at,
            "description": sentences[int(rng.random() * len(sentences))][0],
            "displayName": handle.split(".")[0].capitalize(),
        }

    def unknown_record(
        self, h: int, t: int, rkey: str, rng: random.Random
    ) -> tuple[str, str, str, dict[str, Any]]:
        which = h % 4
        if which == 0:
            collection = "fm.teal.alpha.actor.status"
            return (
                collection,
                "update",
                "self",
                {
                    "$type": collection,
                    "expiry": iso_ms(t + 600_000_000),
                    "item": {
                        "artists": [{"artistName": "Dianna Lopez"}],
                        "duration": None,
                        "playedTime": iso_ms(t - 30_000_000),
                        "releaseName": "Sacred Sands",
                        "submissionClientAgent": "multi-scrobbler/0.14.1",
                        "trackName": "Sacred Sands",
                    },
                    "time": iso_ms(t - 400_000),
                },
            )
        if which == 1:
            collection = "fm.teal.alpha.feed.play"
            return (
                collection,
                "create",
                rkey,
                {
                    "$type": collection,
                    "artists": [{"artistName": "The Band"}],
                    "duration": 180 + h % 200,
                    "playedTime": iso_ms(t - 1_000_000),
                    "trackName": "Track " + str(h % 97),
                },
            )
        if which == 2:
            collection = "sh.tangled.feed.star"
            return (
                collection,
                "create",
                rkey,
                {
                    "$type": collection,
                    "createdAt": iso_ms(t - 300_000),
                    "subject": f"at://{self.did(self.did_n_of(h))}/sh.tangled.repo/{rkey}",
                },
            )
        collection = "com.whtwnd.blog.entry"
        text = " ".join(s[0] for s in rng.choices(self.bank.sentences["en"], k=8))
        return (
            collection,
            "create",
            rkey,
            {
                "$type": collection,
                "content": text,
                "createdAt": iso_ms(t - 300_000),
                "title": "Notes",
                "visibility": "public",
            },
        )

    def other_bsky_record(
        self, h: int, t: int, rkey: str, rng: random.Random
    ) -> tuple[str, str, str, dict[str, Any]]:
        which = h % 4
        created_at = iso_ms(t - 300_000)
        record: dict[str, Any]
        if which == 0:
            collection = "app.bsky.graph.list"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "name": "Artists " + str(h % 50),
                "purpose": "app.bsky.graph.defs#curatelist",
            }
            return collection, "create", rkey, record
        if which == 1:
            collection = "app.bsky.actor.status"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "durationMinutes": 240,
                "status": "app.bsky.actor.status#live",
            }
            return collection, "update", "self", record
        if which == 2:
            collection = "app.bsky.graph.starterpack"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "list": f"at://{self.did(self.did_n_of(h))}/app.bsky.graph.list/{rkey}",
                "name": "Science people",
            }
            return collection, "create", rkey, record
        collection = "chat.bsky.actor.declaration"
        record = {"$type": collection, "allowIncoming": ("following", "all", "none")[h % 3]}
        return collection, "create", "self", record


class _PostText:
    """A post's text as it grows: pieces joined by `sep`, at most 300 graphemes, and the facets
    of its mentions, links and tags at their UTF-8 byte offsets."""

    def __init__(self, sep: str) -> None:
        self.sep = sep
        self.parts: list[str] = []
        self.facets: list[dict[str, Any]] = []
        self.nbytes = 0
        self.ngraph = 0

    def add(self, text: str, tb: int, tg: int, feature: dict[str, Any] | None = None) -> bool:
        """Append `text` (tb bytes, tg graphemes) unless the post would pass 300 graphemes."""
        gap = 1 if self.parts and self.sep else 0
        if self.ngraph + gap + tg > 300:
            return False
        if gap:
            self.parts.append(self.sep)
        start = self.nbytes + gap
        self.parts.append(text)
        self.nbytes = start + tb
        self.ngraph += gap + tg
        if feature is not None:
            self.facets.append(
                {"features": [feature], "index": {"byteEnd": self.nbytes, "byteStart": start}}
            )
        return True


def _blob(bits: int, mime: str) -> dict[str, Any]:
    bits = _mix(bits)
    return {
        "$type": "blob",
        "mimeType": mime,
        "ref": {"$link": _blob_cid(bits)},
        "size": 20_000 + bits % 2_000_000,
    }


def _bisect(cum: list[float], x: float) -> int:
    for k, edge in enumerate(cum):
        if x < edge:
            return k
    return len(cum) - 1


_CORRUPTIONS = (
    "truncated",
    "bad_did",
    "bad_rev",
    "time_us_string",
    "unknown_kind",
    "not_json",
)


def _corrupt(frame: bytes, h: int) -> bytes:
    """A malformed variant of a valid frame (the variant follows from the event hash)."""
    which = _CORRUPTIONS[(h >> 20) % len(_CORRUPTIONS)]
    if which == "truncated":
        return frame[: len(frame) // 2]
    if which == "bad_did":
        return frame.replace(b'"did":"did:plc:', b'"did":"did:key:', 1)
    if which == "bad_rev" and b'"rev":"' in frame:
        return frame.replace(b'"rev":"', b'"rev":"!', 1)
    if which == "time_us_string":
        head, _, rest = frame.partition(b'"time_us":')
        number, _, tail = rest.partition(b",")
        return head + b'"time_us":"' + number + b'",' + tail
    if which == "unknown_kind":
        return frame.replace(b'"kind":"', b'"kind":"x', 1)
    return b"\x00not json " + frame[:40]


# --- public API --------------------------------------------------------------------------------------


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


# --- ground truth --------------------------------------------------------------------------------------


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

    def add(self, frame: bytes, now: int | None = None) -> None:
        self.frames += 1
        try:
            event = ev.decode(frame, now=now, max_bytes=self.max_bytes)
        except ev.Rejected as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return
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


# --- command line --------------------------------------------------------------------------------------


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
