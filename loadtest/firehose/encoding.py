"""Identifiers and encodings as atproto writes them (TIDs, CIDs, did:plc, createdAt, blobs), built
from hashes through lookup tables, and the damaged variants of a frame."""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec

from loadtest.firehose.config import _mix

# base64.b32encode is pure Python (slow); these tables encode 5 or 10 bits per lookup.
_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648, lower case (did:plc, CIDs)
_B32_SORT = "234567abcdefghijklmnopqrstuvwxyz"  # atproto's sortable base32 (TIDs)
_TID10 = [_B32_SORT[k >> 5] + _B32_SORT[k & 31] for k in range(1024)]
# Any byte -> a base32 character (low 5 bits); for digests of random bytes.
_BYTE_TO_B32 = bytes(_B32[b & 31].encode()[0] for b in range(256))


_TID_PREFIXES: dict[int, str] = {}  # the first 7 chars change once a second or so


def tid_prefix(v: int) -> str:
    """The first 7 chars of the TID of value v (timestamp << 10 | clock id), remembered."""
    t = _TID10
    if len(_TID_PREFIXES) > 100_000:
        _TID_PREFIXES.clear()
    prefix = f"{_B32_SORT[v >> 60]}{t[(v >> 50) & 1023]}{t[(v >> 40) & 1023]}{t[(v >> 30) & 1023]}"
    _TID_PREFIXES[v >> 30] = prefix
    return prefix


def tid(time_us: int, clock_id: int) -> str:
    """An atproto TID: 53-bit µs timestamp + 10-bit clock id, base32-sortable, 13 chars."""
    v = (time_us << 10) | (clock_id & 0x3FF)
    t = _TID10
    prefix = _TID_PREFIXES.get(v >> 30) or tid_prefix(v)
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


def iso_prefix(sec: int) -> str:
    """ "YYYY-MM-DDTHH:MM:SS" of a unix second, remembered."""
    if len(_ISO_CACHE) > 4096:
        _ISO_CACHE.clear()
    prefix = _ISO_CACHE[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return prefix


def iso_ms(time_us: int) -> str:
    """RFC 3339 UTC with milliseconds, like atproto's createdAt."""
    sec, rem = divmod(time_us, 1_000_000)
    return f"{_ISO_CACHE.get(sec) or iso_prefix(sec)}.{rem // 1000:03d}Z"


_record_encoder = msgspec.json.Encoder(order="sorted")


def _blob(bits: int, mime: str) -> dict[str, Any]:
    bits = _mix(bits)
    return {
        "$type": "blob",
        "mimeType": mime,
        "ref": {"$link": _blob_cid(bits)},
        "size": 20_000 + bits % 2_000_000,
    }


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
