"""The Parquet storage layout: tables, their Arrow schemas, natural keys and partition paths.

    <data_dir>/<table>/date=YYYY-MM-DD/<name>.parquet

The date is the UTC day of the Jetstream `time_us` (never the record's createdAt). How a file
is written so that it is either absent or complete is `store.writer`; which complete files are
live is `store.manifest`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from appliance.events import AccountEvent, CommitEvent, Event, IdentityEvent

# Tables and the collections routed to them; every other collection goes to `records`.
COLLECTION_TABLES = {
    "app.bsky.feed.post": "posts",
    "app.bsky.feed.like": "likes",
    "app.bsky.feed.repost": "reposts",
    "app.bsky.graph.follow": "follows",
    "app.bsky.graph.block": "blocks",
}
TABLES = (
    "posts",
    "likes",
    "reposts",
    "follows",
    "blocks",
    "deletes",
    "identities",
    "accounts",
    "records",
)


# Microseconds in a day: a partition holds one UTC day of Jetstream time_us.
DAY_US = 86_400_000_000
# Names of compacted files start with this; batch files are named by their stream range.
COMPACTED_PREFIX = "c-"


def commit_table(collection: str, operation: str) -> str:
    """The table a commit is stored in: every delete in `deletes`, a typed collection in its
    table, any other collection in `records`."""
    if operation == "delete":
        return "deletes"
    return COLLECTION_TABLES.get(collection, "records")


def table_for(event: Event) -> str:
    """The one table an event is stored in (`commit_table` for commits)."""
    if isinstance(event, CommitEvent):
        return commit_table(event.commit.collection, event.commit.operation)
    if isinstance(event, IdentityEvent):
        return "identities"
    assert isinstance(event, AccountEvent)
    return "accounts"


_TS = pa.timestamp("us", tz="UTC")
_DICT = pa.dictionary(pa.int32(), pa.string())
_STRS = pa.list_(pa.string())

# Columns every commit table shares. (did, collection, rkey, rev) is the natural key; the
# collection of a typed table is fixed (`TABLE_COLLECTION`), `records` and `deletes` store it.
# The record's at:// uri is not stored: it is exactly at://{did}/{collection}/{rkey}, derived
# where needed (`uri_sql`, `uri_array`); storing it cost ~20 B per row after zstd.
# `operation` tells a create from an update. `cid` (and likes'/reposts' `subject_cid`) are
# content hashes: null unless APPLIANCE_STORE_CIDS=true (see config.store_cids), except the
# `cid` of posts, always stored (the XRPC PostView requires it).
_COMMIT = [
    pa.field("did", pa.string(), nullable=False),
    pa.field("rkey", pa.string(), nullable=False),
    pa.field("rev", pa.string(), nullable=False),
    pa.field("cid", pa.string()),
    pa.field("operation", _DICT, nullable=False),
    pa.field("time_us", pa.int64(), nullable=False),
    pa.field("created_at", _TS),
]
_SUBJECT = [pa.field("subject_uri", pa.string()), pa.field("subject_cid", pa.string())]

SCHEMAS: dict[str, pa.Schema] = {
    "posts": pa.schema(
        [
            *_COMMIT,
            pa.field("text", pa.string()),
            pa.field("langs", _STRS),
            pa.field("reply_root", pa.string()),
            pa.field("reply_parent", pa.string()),
            pa.field("quote_uri", pa.string()),
            # images | video | external | record | record_with_media | other; null = no embed
            pa.field("embed_kind", _DICT),
            pa.field("external_uri", pa.string()),
            pa.field("mentions", _STRS),  # DIDs from mention facets
            pa.field("links", _STRS),  # URIs from link facets
            pa.field("tags", _STRS),  # hashtags from tag facets and record.tags, without '#'
        ]
    ),
    "likes": pa.schema([*_COMMIT, *_SUBJECT]),
    "reposts": pa.schema([*_COMMIT, *_SUBJECT]),
    "follows": pa.schema([*_COMMIT, pa.field("subject", pa.string())]),
    "blocks": pa.schema([*_COMMIT, pa.field("subject", pa.string())]),
    # One row per commit delete of any collection; a post is hidden once a delete with a
    # greater rev exists for its (did, collection, rkey) (revs are TIDs: they sort in commit
    # order).
    "deletes": pa.schema(
        [
            pa.field("did", pa.string(), nullable=False),
            pa.field("collection", _DICT, nullable=False),
            pa.field("rkey", pa.string(), nullable=False),
            pa.field("rev", pa.string(), nullable=False),
            pa.field("time_us", pa.int64(), nullable=False),
        ]
    ),
    "identities": pa.schema(
        [
            pa.field("did", pa.string(), nullable=False),
            pa.field("seq", pa.int64(), nullable=False),
            pa.field("time_us", pa.int64(), nullable=False),
            pa.field("time", _TS),
            pa.field("handle", pa.string()),
        ]
    ),
    "accounts": pa.schema(
        [
            pa.field("did", pa.string(), nullable=False),
            pa.field("seq", pa.int64(), nullable=False),
            pa.field("time_us", pa.int64(), nullable=False),
            pa.field("time", _TS),
            pa.field("active", pa.bool_(), nullable=False),
            pa.field("status", pa.string()),
        ]
    ),
    "records": pa.schema(
        [
            *_COMMIT[:4],
            pa.field("collection", _DICT, nullable=False),
            *_COMMIT[4:],
            pa.field("record", pa.string()),  # the record as JSON text
        ]
    ),
}


# The collection each typed commit table holds (`records` holds every other collection).
TABLE_COLLECTION = {table: coll for coll, table in COLLECTION_TABLES.items()}
COMMIT_TABLES = (*TABLE_COLLECTION, "records")


def at_uri(did: str, collection: str, rkey: str) -> str:
    """The at:// uri of a record (what the API shows; never stored)."""
    return f"at://{did}/{collection}/{rkey}"


def uri_sql(table: str, prefix: str = "") -> str:
    """DuckDB expression of a commit row's at:// uri, from its did, collection and rkey columns.

    The one definition every SQL reader shares (query engine, compaction, tests, benchmarks), so
    that sorting, cursors and hash(uri) keys agree. `prefix` qualifies the columns ("p.").
    """
    if table in TABLE_COLLECTION:
        return f"concat('at://', {prefix}did, '/{TABLE_COLLECTION[table]}/', {prefix}rkey)"
    if table in ("records", "deletes"):
        return f"concat('at://', {prefix}did, '/', {prefix}collection, '/', {prefix}rkey)"
    raise ValueError(f"table {table!r} has no record uri")


def uri_array(table: str, data: pa.Table) -> pa.ChunkedArray:
    """The at:// uri of every row of a commit table (Arrow counterpart of `uri_sql`)."""
    if table in TABLE_COLLECTION:
        collection: Any = f"/{TABLE_COLLECTION[table]}/"
        return pc.binary_join_element_wise("at://", data["did"], collection, data["rkey"], "")
    if table in ("records", "deletes"):
        coll = data["collection"].cast(pa.string())
        return pc.binary_join_element_wise("at://", data["did"], "/", coll, "/", data["rkey"], "")
    raise ValueError(f"table {table!r} has no record uri")


def day_of(time_us: int) -> str:
    """The UTC date (YYYY-MM-DD) of a Jetstream time_us: the partition an event belongs to."""
    return datetime.fromtimestamp(time_us / 1_000_000, tz=UTC).strftime("%Y-%m-%d")


def partition_dir(data_dir: str | Path, table: str, day: str) -> Path:
    return Path(data_dir) / table / f"date={day}"


def table_glob(data_dir: str | Path, table: str) -> str:
    """The glob a reader uses for every complete file of a table."""
    return str(Path(data_dir) / table / "date=*" / "*.parquet")


# --- natural keys ----------------------------------------------------------------------------

# The columns that make a stored row unique (invariant 2 in docs/architecture.md), per table:
# commits by (did, collection, rkey, rev), where a typed table's collection is fixed and so not a
# column.
# Content hashes (cid) are never part of a key: they may be null (store_cids off).
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    **{t: ("did", "rkey", "rev") for t in TABLE_COLLECTION},
    "records": ("did", "collection", "rkey", "rev"),
    "deletes": ("did", "collection", "rkey", "rev"),
    "identities": ("did", "seq"),
    "accounts": ("did", "seq"),
}
# The record identity within a commit table (the natural key without rev).
RECORD_COLUMNS: dict[str, tuple[str, ...]] = {
    t: cols[:-1] for t, cols in KEY_COLUMNS.items() if t in (*COMMIT_TABLES, "deletes")
}
KEY_SEPARATOR = "\x1f"  # cannot occur in a DID, NSID, record key or TID

NaturalKey = tuple[str, str, str, str]


def natural_key(event: Event) -> NaturalKey:
    """The natural key of an event, as a tuple: the values of its table's KEY_COLUMNS, with the
    collection of a typed table filled in and identity/account events tagged by kind (what
    `stored_keys` gives for the row the event becomes)."""
    if isinstance(event, CommitEvent):
        c = event.commit
        return (event.did, c.collection, c.rkey, c.rev)
    if isinstance(event, IdentityEvent):
        return (event.did, "identity", str(event.identity.seq), "")
    assert isinstance(event, AccountEvent)
    return (event.did, "account", str(event.account.seq), "")


def stored_keys(table: str, rows: dict[str, list[Any]]) -> list[NaturalKey]:
    """`natural_key` of each stored row (`rows`: column -> values, holding KEY_COLUMNS[table])."""
    if table in ("identities", "accounts"):
        kind = "identity" if table == "identities" else "account"
        return [(d, kind, str(s), "") for d, s in zip(rows["did"], rows["seq"], strict=True)]
    collections = rows.get("collection") or [TABLE_COLLECTION[table]] * len(rows["did"])
    return list(zip(rows["did"], collections, rows["rkey"], rows["rev"], strict=True))


def key_array(table: str, data: pa.Table) -> pa.ChunkedArray:
    """One string per row joining its natural-key columns (for set membership in Arrow)."""
    columns = [data[c].cast(pa.string()) for c in KEY_COLUMNS[table]]
    return pc.binary_join_element_wise(*columns, KEY_SEPARATOR)
