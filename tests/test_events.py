"""The Jetstream event model: each rejection reason, the real reference events, and property
tests that no input makes the decoder raise anything but Rejected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import events as ev
from appliance.store.layout import natural_key

# 152 real Jetstream v1 events, recorded from the public Jetstream.
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "jetstream_v1_reference.jsonl"
NOW = 1_783_200_000_000_000  # 2026-07-04T...: just after the reference events
T = 1_783_175_888_085_434
DID = "did:plc:wq4aajammjtxdomz3e23667t"


def like(**changes: Any) -> dict[str, Any]:
    """A valid like event as a dict; `changes` set top-level or commit fields (None deletes)."""
    event: dict[str, Any] = {
        "did": DID,
        "time_us": T,
        "kind": "commit",
        "commit": {
            "rev": "3mptbypluud2a",
            "operation": "create",
            "collection": "app.bsky.feed.like",
            "rkey": "3mptbyplj5d2a",
            "record": {
                "$type": "app.bsky.feed.like",
                "createdAt": "2026-07-04T14:38:08.999Z",
                "subject": {"cid": "bafyrei", "uri": "at://did:plc:x/app.bsky.feed.post/3mp"},
            },
            "cid": "bafyreiguce4jh7kcbmof3pmcvasifqtw24b6isakj5ve5ga2b4z4alpc4i",
        },
    }
    for key, value in changes.items():
        target = event["commit"] if key in event["commit"] or key == "record" else event
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return event


def identity(**changes: Any) -> dict[str, Any]:
    body = {"did": DID, "seq": 31527015470, "time": "2026-07-04T14:38:07.877Z", **changes}
    return {"did": DID, "time_us": T, "kind": "identity", "identity": body}


def account(**changes: Any) -> dict[str, Any]:
    body = {"active": True, "did": DID, "seq": 31527015471, "time": "2026-07-04T14:38:07.877Z"}
    return {"did": DID, "time_us": T, "kind": "account", "account": {**body, **changes}}


def reason(frame: bytes | dict[str, Any], **kwargs: Any) -> str:
    data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
    with pytest.raises(ev.Rejected) as caught:
        ev.decode(data, now=NOW, **kwargs)
    assert caught.value.reason in ev.REJECT_REASONS
    return caught.value.reason


def test_every_reference_event_decodes() -> None:
    lines = REFERENCE.read_bytes().splitlines()
    assert len(lines) == 152
    kinds = set()
    for line in lines:
        event = ev.decode(line, now=NOW)
        kinds.add(type(event).__name__)
        assert len(natural_key(event)) == 4
    assert kinds == {"CommitEvent", "IdentityEvent", "AccountEvent"}


def test_valid_events_decode() -> None:
    assert isinstance(ev.decode(json.dumps(like()).encode(), now=NOW), ev.CommitEvent)
    assert isinstance(ev.decode(json.dumps(identity()).encode(), now=NOW), ev.IdentityEvent)
    assert isinstance(ev.decode(json.dumps(account()).encode(), now=NOW), ev.AccountEvent)
    # unknown collections, rkey "self", updates, deletes without record, did:web, a cursor
    update = like(collection="fm.teal.alpha.actor.status", rkey="self", operation="update")
    assert ev.decode(json.dumps(update).encode(), now=NOW)
    delete = like(operation="delete", record=None, cid=None)
    assert ev.decode(json.dumps(delete).encode(), now=NOW)
    web = like(did="did:web:example.com", cursor=12345)
    assert ev.decode(json.dumps(web).encode(), now=NOW)
    assert ev.decode(json.dumps(like(rkey="a" * 512)).encode(), now=NOW)
    assert ev.decode(json.dumps(like(rkey="A.b:c~d-e_F9")).encode(), now=NOW)
    assert ev.decode(json.dumps(like(rkey="." * 3)).encode(), now=NOW)


@pytest.mark.parametrize("frame", [b"", b"not json", b"{", b'{"did":', b"\xff\xfe{}"])
def test_invalid_json(frame: bytes) -> None:
    assert reason(frame) == "invalid_json"


@pytest.mark.parametrize(
    "event",
    [
        [],
        "a string",
        like(did=None),
        like(time_us=None),
        like(commit=None),
        like(rev=None),
        like(rkey=None),
        like(collection=None),
        like(operation=None),
        like(did=123),
        like(operation="upsert"),
        like(rkey=5),
        like(cid=7),
        identity(seq="one"),
        identity(did=None),
        account(active="yes"),
        {"did": DID, "time_us": T, "commit": like()["commit"]},  # no kind
    ],
)
def test_missing_or_mistyped_fields_are_schema_errors(event: Any) -> None:
    assert reason(json.dumps(event).encode()) == "schema"


@pytest.mark.parametrize("kind", ["sync", "info", "COMMIT", ""])
def test_unknown_kind(kind: str) -> None:
    assert reason(like(kind=kind)) == "unknown_kind"


@pytest.mark.parametrize(
    "event",
    [
        like(did="did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"),
        like(did="did:plc:short"),
        like(did="did:plc:WQ4AAJAMMJTXDOMZ3E23667T"),
        like(did="plc:wq4aajammjtxdomz3e23667t"),
        like(did=""),
        # each one character off a valid did:plc: (24 base32 characters: a-z, 2-7)
        like(did="did:plc:wq4aajammjtxdomz3e23667"),
        like(did="did:plc:wq4aajammjtxdomz3e23667tt"),
        like(did="did:plc:wq4aajammjtxdomz3e236671"),
        like(did="did:plc:wq4aajammjtxdomz3e236678"),
        like(did="did:plc:wq4aajammjtxdomz3e23667T"),
        like(did="did:plc:wq4aajammjtxdomz3e23667\u00e9"),
        like(did="did:plc:wq4aajammjtxdomz3e2366\n"),
        like(did="did:plc;wq4aajammjtxdomz3e23667t"),
        like(did="did:plcxwq4aajammjtxdomz3e2367t"),
        like(did="did:plc::q4aajammjtxdomz3e23667t"),
        like(did="did:web:"),
        identity(did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"),
        account(did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"),
    ],
)
def test_bad_did(event: dict[str, Any]) -> None:
    assert reason(event) == "bad_did"


@pytest.mark.parametrize(
    "collection", ["notnsid", "app.bsky", "app..bsky.post", "1app.bsky.post", "a." * 200 + "b", ""]
)
def test_bad_collection(collection: str) -> None:
    assert reason(like(collection=collection)) == "bad_collection"


@pytest.mark.parametrize(
    "rkey", ["", ".", "..", "has space", "a/b", "a" * 513, "é", "3mp\u00b2", "ab\u0660", "\uff41"]
)
def test_bad_rkey(rkey: str) -> None:
    assert reason(like(rkey=rkey)) == "bad_rkey"


@pytest.mark.parametrize("rev", ["", "notatid", "3MPTBYPLUUD2A", "3mptbypluud2", "kmptbypluud2a"])
def test_bad_rev(rev: str) -> None:
    assert reason(like(rev=rev)) == "bad_rev"


@pytest.mark.parametrize(
    "event",
    [
        like(record=None),
        like(operation="update", record=None),
        like(record="a string"),
        like(record=[1, 2]),
        {**like(), "commit": {**like()["commit"], "record": None}},  # "record": null
    ],
)
def test_create_or_update_without_a_record(event: dict[str, Any]) -> None:
    if event["commit"].get("record", 0) is None:
        data = json.dumps(event).encode()
        assert b'"record": null' in data
    assert reason(event) == "missing_record"


@pytest.mark.parametrize(
    "time_us",
    [
        1_782_864_000,
        1_782_864_000_000,
        -1,
        NOW + 11 * 60 * 1_000_000,
        1.7e15,
        "1783175888085434",
        True,
        10**30,
    ],
)
def test_bad_time_us(time_us: Any) -> None:
    assert reason(like(time_us=time_us)) == "bad_time_us"


def test_oversized() -> None:
    big = like(record={"$type": "x.y.z", "pad": "a" * 2000})
    data = json.dumps(big).encode()
    assert reason(data, max_bytes=1024) == "oversized"
    assert reason(b"x" * 1025, max_bytes=1024) == "oversized"  # checked before parsing
    assert ev.decode(data, now=NOW, max_bytes=len(data))


def test_a_little_clock_skew_is_accepted() -> None:
    assert ev.decode(json.dumps(like(time_us=NOW + 60_000_000)).encode(), now=NOW)


# --- property tests -----------------------------------------------------------------------------


def _decode_or_reject(data: bytes) -> None:
    try:
        event = ev.decode(data, now=NOW)
    except ev.Rejected as exc:
        assert exc.reason in ev.REJECT_REASONS
    else:
        natural_key(event)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise_anything_but_rejected(data: bytes) -> None:
    _decode_or_reject(data)


_VALID = REFERENCE.read_bytes().splitlines()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame=st.sampled_from(_VALID),
    pick=st.integers(min_value=0),
    action=st.sampled_from(["replace", "delete", "add"]),
    value=json_values,
    key=st.text(max_size=10),
)
def test_json_mutations_of_real_frames_never_raise_anything_but_rejected(
    frame: bytes, pick: int, action: str, value: Any, key: str
) -> None:
    event = json.loads(frame)
    paths = _paths(event)
    path = paths[pick % len(paths)]
    if not path:
        event = value  # replace the whole document
    else:
        parent = event
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if action == "replace":
            parent[last] = value
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[key] = value
    _decode_or_reject(msgspec.json.encode(event))


@settings(max_examples=300, deadline=None)
@given(
    frame=st.sampled_from(_VALID),
    start=st.integers(min_value=0, max_value=4000),
    length=st.integers(min_value=0, max_value=20),
    insert=st.binary(max_size=20),
)
def test_byte_mutations_of_real_frames_never_raise_anything_but_rejected(
    frame: bytes, start: int, length: int, insert: bytes
) -> None:
    start %= len(frame) + 1
    _decode_or_reject(frame[:start] + insert + frame[start + length :])
