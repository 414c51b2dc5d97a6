"""Events → Arrow tables: typed post columns, lenient records, timestamps, in-batch dedupe."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from appliance import events
from appliance.batch.tables import TableBuilder, parse_time_us, timestamps
from appliance.store import layout
from tests.helpers import CID, DID, T0, commit

MAX = events.MAX_EVENT_BYTES

OTHER = "did:plc:" + "b" * 24


def build(*frames: bytes, store_cids: bool = False) -> tuple[TableBuilder, dict[str, pa.Table]]:
    builder = TableBuilder(store_cids=store_cids)
    for frame in frames:
        builder.add(events.decode(frame))
    return builder, builder.tables()


def post_row(record: dict[str, Any]) -> dict[str, Any]:
    _, tables = build(commit({"$type": "app.bsky.feed.post", **record}))
    rows = tables["posts"].to_pylist()
    assert len(rows) == 1
    return rows[0]


def test_post_columns_come_from_text_reply_embed_and_facets() -> None:
    row = post_row(
        {
            "text": "see #Rust and @b https://example.org",
            "langs": ["en", "de"],
            "createdAt": "2026-07-04T14:38:06.240Z",
            "reply": {
                "root": {"uri": "at://did:plc:r/app.bsky.feed.post/1", "cid": CID},
                "parent": {"uri": "at://did:plc:p/app.bsky.feed.post/2", "cid": CID},
            },
            "embed": {
                "$type": "app.bsky.embed.recordWithMedia",
                "record": {
                    "$type": "app.bsky.embed.record",
                    "record": {"uri": "at://did:plc:q/app.bsky.feed.post/3", "cid": CID},
                },
                "media": {
                    "$type": "app.bsky.embed.external",
                    "external": {"uri": "https://news.example/a", "title": "t"},
                },
            },
            "facets": [
                {
                    "index": {"byteStart": 4, "byteEnd": 9},
                    "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "Rust"}],
                },
                {"features": [{"$type": "app.bsky.richtext.facet#mention", "did": OTHER}]},
                {
                    "features": [
                        {"$type": "app.bsky.richtext.facet#link", "uri": "https://example.org"}
                    ]
                },
            ],
            "tags": ["#extra", "Rust"],
        }
    )
    assert "uri" not in row  # derived from did and rkey, not stored
    assert (row["did"], row["rkey"]) == (DID, "3mptbyoeyc22k")
    assert row["text"] == "see #Rust and @b https://example.org"
    assert row["langs"] == ["en", "de"]
    assert row["reply_root"] == "at://did:plc:r/app.bsky.feed.post/1"
    assert row["reply_parent"] == "at://did:plc:p/app.bsky.feed.post/2"
    assert row["quote_uri"] == "at://did:plc:q/app.bsky.feed.post/3"
    assert row["embed_kind"] == "record_with_media"
    assert row["external_uri"] == "https://news.example/a"
    assert row["mentions"] == [OTHER]
    assert row["links"] == ["https://example.org"]
    assert row["tags"] == ["Rust", "extra"]  # facet tags first, '#' stripped, no repeats
    assert row["created_at"].isoformat() == "2026-07-04T14:38:06.240000+00:00"
    assert row["operation"] == "create"
    assert row["cid"] == CID  # a post's own cid is stored whatever APPLIANCE_STORE_CIDS says


def test_other_cids_are_stored_only_when_asked_and_never_change_the_schema() -> None:
    like = {"subject": {"uri": "at://s/app.bsky.feed.post/1", "cid": CID}}
    frames = (commit({"text": "p"}), commit(like, collection="app.bsky.feed.like"))
    for store_cids in (False, True):
        _, tables = build(*frames, store_cids=store_cids)
        want = CID if store_cids else None
        for name in ("posts", "likes"):
            assert tables[name].schema == layout.SCHEMAS[name]
        assert tables["posts"].to_pylist()[0]["cid"] == CID  # always: PostView needs it
        row = tables["likes"].to_pylist()[0]
        assert (row["cid"], row["subject_cid"]) == (want, want)
        assert row["subject_uri"] == "at://s/app.bsky.feed.post/1"  # kept either way


@pytest.mark.parametrize(
    ("embed", "kind", "quote", "external"),
    [
        ({"$type": "app.bsky.embed.images", "images": []}, "images", None, None),
        ({"$type": "app.bsky.embed.video", "video": {}}, "video", None, None),
        (
            {"$type": "app.bsky.embed.external", "external": {"uri": "https://x.example"}},
            "external",
            None,
            "https://x.example",
        ),
        (
            {"$type": "app.bsky.embed.record", "record": {"uri": "at://q/p/1", "cid": CID}},
            "record",
            "at://q/p/1",
            None,
        ),
        ({"$type": "app.example.embed.new"}, "other", None, None),
    ],
)
def test_embed_kinds(
    embed: dict[str, Any], kind: str, quote: str | None, external: str | None
) -> None:
    row = post_row({"text": "x", "createdAt": "2026-07-04T14:38:06Z", "embed": embed})
    assert (row["embed_kind"], row["quote_uri"], row["external_uri"]) == (kind, quote, external)


def test_a_post_without_optional_parts_has_nulls() -> None:
    row = post_row({"text": "", "createdAt": "2026-07-04T14:38:06Z"})
    assert row["text"] == ""
    for column in ("langs", "reply_root", "quote_uri", "embed_kind", "mentions", "links", "tags"):
        assert row[column] is None


def test_a_record_with_odd_types_is_kept_leniently() -> None:
    builder, tables = build(
        commit(
            {
                "$type": "app.bsky.feed.post",
                "text": "odd",
                "langs": ["en", 7],
                "reply": {"root": "not an object"},
                "facets": [{"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": 5}]}, 3],
                "tags": ["ok"],
                "createdAt": 12345,
            }
        )
    )
    row = tables["posts"].to_pylist()[0]
    assert builder.lenient_records == 1
    assert row["text"] == "odd"
    assert row["langs"] == ["en"]
    assert row["reply_root"] is None
    assert row["tags"] == ["ok"]
    assert row["created_at"] is None


def test_bad_created_at_becomes_null_and_is_counted() -> None:
    frames = [
        commit({"text": "a", "createdAt": "2026-07-04T14:38:06.1Z"}, rkey="3aaaaaaaaaaa2"),
        commit({"text": "b", "createdAt": "yesterday"}, rkey="3aaaaaaaaaaa3"),
        commit({"text": "c"}, rkey="3aaaaaaaaaaa4"),  # missing: null, not "bad"
        commit({"text": "d", "createdAt": "2026-07-04T14:38:06"}, rkey="3aaaaaaaaaaa5"),  # no zone
    ]
    builder, tables = build(*frames)
    created = {r["text"]: r["created_at"] for r in tables["posts"].to_pylist()}
    assert created["a"].isoformat() == "2026-07-04T14:38:06.100000+00:00"
    assert created["b"] is None
    assert created["c"] is None
    assert created["d"].isoformat() == "2026-07-04T14:38:06+00:00"
    assert builder.bad_created_at == 1


def test_timestamps_fast_and_slow_paths_agree() -> None:
    values = ["2026-07-04T14:38:06.123Z", "2026-07-04T16:38:06+02:00", None]
    fast, bad = timestamps(values)
    slow, _ = timestamps([*values, "garbage"])
    assert bad == 0
    assert fast.to_pylist() == slow.to_pylist()[:3]
    assert parse_time_us("0000-01-01T00:00:00Z") is None


def test_every_table_uses_its_storage_schema() -> None:
    identity = {
        "did": DID,
        "time_us": T0,
        "kind": "identity",
        "identity": {"did": DID, "seq": 7, "time": "2026-07-04T14:38:07.877Z", "handle": "a.b"},
    }
    account = {
        "did": DID,
        "time_us": T0,
        "kind": "account",
        "account": {"active": False, "did": DID, "seq": 8, "time": "x", "status": "deleted"},
    }
    like = {
        "subject": {"uri": "at://s/app.bsky.feed.post/1", "cid": CID},
        "createdAt": "2026-07-04T00:00:00Z",
    }
    _, tables = build(
        commit({"text": "p", "createdAt": "2026-07-04T00:00:00Z"}),
        commit(like, collection="app.bsky.feed.like"),
        commit(like, collection="app.bsky.feed.repost"),
        commit({"subject": OTHER}, collection="app.bsky.graph.follow"),
        commit({"subject": OTHER}, collection="app.bsky.graph.block"),
        commit({"name": "x"}, collection="fm.teal.alpha.actor.status", rkey="self"),
        commit(None, collection="app.bsky.feed.like", operation="delete", rev="3mptbypcq373f"),
        json.dumps(identity).encode(),
        json.dumps(account).encode(),
    )
    assert set(tables) == set(layout.TABLES)
    for name, table in tables.items():
        assert table.schema == layout.SCHEMAS[name], name
        assert table.num_rows == 1, name
    assert tables["likes"].to_pylist()[0]["subject_uri"] == "at://s/app.bsky.feed.post/1"
    assert tables["follows"].to_pylist()[0]["subject"] == OTHER
    records = tables["records"].to_pylist()[0]
    assert records["collection"] == "fm.teal.alpha.actor.status"
    assert json.loads(records["record"]) == {"name": "x"}
    deletes = tables["deletes"].to_pylist()[0]
    deleted_uri = layout.uri_array("deletes", tables["deletes"]).to_pylist()
    assert deleted_uri == [f"at://{DID}/app.bsky.feed.like/3mptbyoeyc22k"]
    assert deletes["collection"] == "app.bsky.feed.like"
    assert tables["identities"].to_pylist()[0]["handle"] == "a.b"
    acc = tables["accounts"].to_pylist()[0]
    assert (acc["active"], acc["status"], acc["time"]) == (False, "deleted", None)


def test_duplicates_inside_a_batch_are_dropped_by_natural_key() -> None:
    a = commit({"text": "a"}, rkey="3aaaaaaaaaaa2")
    update = commit({"text": "a2"}, rkey="3aaaaaaaaaaa2", rev="3mptbypcq37af", operation="update")
    builder, tables = build(a, a, update, a)
    assert builder.duplicates == {"posts": 2}
    assert [r["text"] for r in tables["posts"].to_pylist()] == ["a", "a2"]


def test_rollback_forgets_the_rows_of_a_failed_entry() -> None:
    builder = TableBuilder()
    builder.add(events.decode(commit({"text": "kept"}, rkey="3aaaaaaaaaaa2")))
    builder.commit_entry()
    mark = builder.mark()
    builder.add(events.decode(commit({"text": "undone"}, rkey="3aaaaaaaaaaa3")))
    builder.rollback(mark)
    # The rolled-back key is no longer "seen": a later copy is stored.
    builder.add(events.decode(commit({"text": "again"}, rkey="3aaaaaaaaaaa3")))
    assert [r["text"] for r in builder.tables()["posts"].to_pylist()] == ["kept", "again"]
    assert builder.events == 2


def test_rows_convert_in_chunks_without_changing_the_result() -> None:
    frames = [commit({"text": str(i)}, rkey=f"3aaaaaaaaa{i:03d}") for i in range(10)]
    small = TableBuilder(chunk_rows=3)
    for frame in frames:
        small.add(events.decode(frame))
        small.commit_entry()
    _, whole = build(*frames)
    assert small.tables()["posts"].equals(whole["posts"])


def test_decoding_a_whole_entry_matches_decoding_frame_by_frame() -> None:
    from appliance.batch.decode import decode_frames, decode_joined

    good = [commit({"text": str(i)}, rkey=f"3aaaaaaaaa{i:03d}") for i in range(3)]
    bad_did = commit({"text": "x"}, did="did:plc:short")  # schema-valid, fails validation
    frames = [good[0], bad_did, good[1], good[2]]
    now = events.now_us()
    joined = decode_joined(b"\n".join(frames), len(frames), now, MAX)
    assert joined is not None
    one_by_one = decode_frames(frames, now, MAX)
    assert joined[0] == one_by_one[0] == [events.decode(f) for f in good]
    assert [(f, e.reason) for f, e in joined[1]] == [(bad_did, "bad_did")]
    assert [(f, e.reason) for f, e in one_by_one[1]] == [(bad_did, "bad_did")]
    # A malformed frame or a count that does not match: not for the shortcut.
    assert decode_joined(b"\n".join([good[0], b"{nope"]), 2, now, MAX) is None
    assert decode_joined(b"\n".join(good), 2, now, MAX) is None
    assert decode_joined(b"\n".join(good), 3, now, max_bytes=100) is None


def test_an_event_the_schema_cannot_hold_is_rejected_not_stored() -> None:
    from appliance.batch.decode import decode_frames, decode_joined

    def identity(seq: int) -> bytes:
        body = {"did": DID, "seq": seq, "time": "2026-07-04T14:38:07Z"}
        return json.dumps(
            {"did": DID, "time_us": T0, "kind": "identity", "identity": body}
        ).encode()

    frames = [identity(1), identity(2**63), identity(3)]
    now = events.now_us()
    for good, bad in (
        decode_frames(frames, now, MAX),
        decode_joined(b"\n".join(frames), 3, now, MAX),
    ):
        assert [e.identity.seq for e in good] == [1, 3]  # type: ignore[union-attr]
        assert [(f, e.reason) for f, e in bad] == [(frames[1], "schema")]
