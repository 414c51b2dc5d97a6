"""The Jetstream v1 event model: msgspec Structs, one reused Decoder, and validation with reasons.

`decode(frame)` returns a typed event or raises `Rejected` with a stable reason code (a metric
label). Unknown collections are valid; an unknown `kind` is not.
"""

from __future__ import annotations

import re
import time
from typing import Literal

import msgspec
from msgspec import Raw, Struct

# Stable reason codes: metric labels and dead-letter reasons. Add, never rename.
REJECT_REASONS = (
    "invalid_json",
    "schema",
    "unknown_kind",
    "bad_did",
    "bad_collection",
    "bad_rkey",
    "bad_rev",
    "missing_record",
    "bad_time_us",
    "oversized",
)

# Bluesky launched in 2023; a smaller time_us is seconds or milliseconds by mistake.
MIN_TIME_US = 1_600_000_000_000_000
# Clocks differ a little; an event further ahead of our clock than this is rejected.
MAX_FUTURE_SKEW_US = 10 * 60 * 1_000_000
MAX_RKEY_BYTES = 512
# Frames larger than this are rejected as oversized (the default of Settings.max_event_bytes).
MAX_EVENT_BYTES = 1_000_000


# gc=False (msgspec perf tips): these structs hold only strings, numbers, Raw and each other, so
# they can never be part of a reference cycle; untracked, they are cheaper to create and free.


class Commit(Struct, frozen=True, gc=False):
    rev: str
    operation: Literal["create", "update", "delete"]
    collection: str
    rkey: str
    record: Raw = Raw(b"")  # kept as JSON bytes; empty when absent (deletes)
    cid: str | None = None


class CommitEvent(Struct, frozen=True, tag_field="kind", tag="commit", gc=False):
    did: str
    time_us: int
    commit: Commit
    cursor: int | None = None


class Identity(Struct, frozen=True, gc=False):
    did: str
    seq: int
    time: str
    handle: str | None = None


class IdentityEvent(Struct, frozen=True, tag_field="kind", tag="identity", gc=False):
    did: str
    time_us: int
    identity: Identity
    cursor: int | None = None


class Account(Struct, frozen=True, gc=False):
    active: bool
    did: str
    seq: int
    time: str
    status: str | None = None


class AccountEvent(Struct, frozen=True, tag_field="kind", tag="account", gc=False):
    did: str
    time_us: int
    account: Account
    cursor: int | None = None


Event = CommitEvent | IdentityEvent | AccountEvent

_decoder = msgspec.json.Decoder(Event)

_WEB_ID_CHAR = "[A-Za-z0-9._:%-]"
_DID = re.compile(rf"did:(?:plc:[a-z2-7]{{24}}|web:{_WEB_ID_CHAR}{{1,253}})")
# did:plc: is 24 base32 characters; `did.rstrip(_PLC_CHARS) == "did:plc:"` with the length checks
# exactly the regex's did:plc: branch at a quarter of its cost (and ":" is not in the set).
_PLC_CHARS = "abcdefghijklmnopqrstuvwxyz234567"
_PLC_LENGTH = len("did:plc:") + 24
_NSID = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
# rkey and rev are checked per commit; set membership is about 2x cheaper than a regex here.
_RKEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:~-")
_TID_CHARS = frozenset("234567abcdefghijklmnopqrstuvwxyz")
_TID_FIRST = frozenset("234567abcdefghij")

# The did, rkey and rev checks of `validate` as RE2 patterns, for checking whole Arrow columns at
# once (the batcher's `decode.columns_valid`). Counted repetitions ({1,512}) make RE2 programs
# large and slow, so lengths are checked apart (DID_MAX_BYTES, MAX_RKEY_BYTES). Both admit only
# ASCII, where a length in bytes is a length in characters.
DID_PATTERN = rf"^did:(?:plc:[a-z2-7]{{24}}|web:{_WEB_ID_CHAR}+)$"
DID_MAX_BYTES = len("did:web:") + 253
RKEY_PATTERN = "^[" + re.escape("".join(sorted(_RKEY_CHARS))) + "]+$"
REV_PATTERN = (
    "^["
    + re.escape("".join(sorted(_TID_FIRST)))
    + "]["
    + re.escape("".join(sorted(_TID_CHARS)))
    + "]{12}$"
)


class Rejected(Exception):
    """A frame that is not a valid Jetstream v1 event; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def now_us() -> int:
    return time.time_ns() // 1000


def decode(frame: bytes, now: int | None = None, max_bytes: int = MAX_EVENT_BYTES) -> Event:
    """Decode and validate one Jetstream frame; raise Rejected with a reason if it is not valid."""
    if len(frame) > max_bytes:
        raise Rejected("oversized", f"{len(frame)} bytes > {max_bytes}")
    try:
        event = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if msg.startswith("Invalid value") and msg.endswith("`$.kind`"):
            raise Rejected("unknown_kind", msg) from None
        if msg.endswith("`$.time_us`"):  # not an integer, or out of int64 range
            raise Rejected("bad_time_us", msg) from None
        raise Rejected("schema", msg) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 in a string.
        raise Rejected("invalid_json", str(exc)) from None
    validate(event, now_us() if now is None else now)
    return event


def validate(event: Event, now: int) -> None:
    """Semantic checks the schema cannot express; raise Rejected."""
    did = event.did
    if len(did) != _PLC_LENGTH or did.rstrip(_PLC_CHARS) != "did:plc:":
        _check_did(did)  # not a did:plc: (did:web: or invalid): the full regex
    t = event.time_us
    if t < MIN_TIME_US or t > now + MAX_FUTURE_SKEW_US:
        raise Rejected("bad_time_us", f"time_us {t} is out of range")
    if type(event) is CommitEvent:
        c = event.commit
        if c.collection not in _valid_collections:
            _check_collection(c.collection)
        rkey, rev = c.rkey, c.rev
        # rkey characters are ASCII, so its length in characters is its length in bytes. Most
        # rkeys are TIDs or "self": ASCII letters and digits pass two O(1)/C-speed tests.
        if not (rkey.isascii() and rkey.isalnum() and len(rkey) <= MAX_RKEY_BYTES) and (
            not 0 < len(rkey) <= MAX_RKEY_BYTES
            or not _RKEY_CHARS.issuperset(rkey)
            or rkey in {".", ".."}
        ):
            raise Rejected("bad_rkey", f"rkey {rkey[:80]!r} is invalid")
        if len(rev) != 13 or rev[0] not in _TID_FIRST or not _TID_CHARS.issuperset(rev):
            raise Rejected("bad_rev", f"rev {rev[:80]!r} is not a TID")
        # Raw spans exactly the JSON value, so an object starts with "{" (0x7B). bytes() of a
        # Raw is a cheaper first-byte read than a memoryview.
        if c.operation != "delete" and (not c.record or bytes(c.record)[0] != 0x7B):
            raise Rejected("missing_record", f"{c.operation} without a record object")
    elif isinstance(event, IdentityEvent):
        if event.identity.did != did:
            raise Rejected("bad_did", "identity.did differs from did")
    elif isinstance(event, AccountEvent) and event.account.did != did:
        raise Rejected("bad_did", "account.did differs from did")


# Collections repeat endlessly; remember the valid ones. The set is bounded (the values are chosen
# by strangers). DIDs are not cached: about half of them are new in any window, so a cache missed
# more than it hit; the did:plc: check above costs about as much as a lookup.
_valid_collections: set[str] = set()
_MAX_REMEMBERED_COLLECTIONS = 10_000


def _check_did(did: str) -> None:
    if not _DID.fullmatch(did):
        raise Rejected("bad_did", f"did {did[:80]!r} is not did:plc:/did:web:")


def is_nsid(text: str) -> bool:
    """True if `text` is a syntactically valid NSID (e.g. app.bsky.feed.post)."""
    return len(text) <= 317 and _NSID.fullmatch(text) is not None


def _check_collection(collection: str) -> None:
    if not is_nsid(collection):
        raise Rejected("bad_collection", f"collection {collection[:80]!r} is not an NSID")
    if len(_valid_collections) < _MAX_REMEMBERED_COLLECTIONS:
        _valid_collections.add(collection)
