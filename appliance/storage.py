"""The Parquet storage layout: tables, their Arrow schemas, partition paths and atomic writes.

    <data_dir>/<table>/date=YYYY-MM-DD/<name>.parquet

The date is the UTC day of the Jetstream `time_us` (never the record's createdAt). A file is
written under a temporary name no reader's glob matches (`.<name>.tmp`, not ending in .parquet),
fsynced, renamed, and the directory fsynced: a `*.parquet` file is either absent or complete.
The manifest (below) says which complete files are live.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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


def table_for(event: Event) -> str:
    """The one table an event is stored in. Every commit delete goes to `deletes`."""
    if isinstance(event, CommitEvent):
        if event.commit.operation == "delete":
            return "deletes"
        return COLLECTION_TABLES.get(event.commit.collection, "records")
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
# content hashes: null unless APPLIANCE_STORE_CIDS=true (see config.store_cids).
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    table: pa.Table,
    directory: Path,
    name: str,
    *,
    zstd_level: int = 3,
    sorting_columns: list[pq.SortingColumn] | None = None,
    row_group_size: int = 1_000_000,
) -> Path:
    """Write `table` to directory/name.parquet so that it is either absent or complete.

    The same `name` always lands at the same path, so a redone batch replaces its own file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}.parquet"
    tmp = directory / f".{name}.tmp"
    dictionary_cols = [
        f.name for f in table.schema if pa.types.is_dictionary(f.type) or f.name == "did"
    ]
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(
                table,
                fh,
                compression="zstd",
                compression_level=zstd_level,
                use_dictionary=dictionary_cols or True,
                row_group_size=row_group_size,
                sorting_columns=sorting_columns,
                write_statistics=True,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return final


# --- the manifest ---------------------------------------------------------------------------
# Readers (the query engine) take the list of live files from <data_dir>/_manifest.json, not
# from a glob, so a compaction swaps a partition's files in one atomic rename of the manifest:
# a query that started on the old file set keeps reading files that still exist (replaced files
# are deleted only after a grace period), and a new query sees only the new set. The version
# number also keys the query cache: any batch or compaction bumps it.

MANIFEST = "_manifest.json"
_LOCK = ".manifest.lock"


class Manifest(msgspec.Struct, kw_only=True):
    version: int = 0
    # table -> paths relative to data_dir ("posts/date=2026-07-04/<name>.parquet"), sorted
    files: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # files taken out of `files`, with the unix time they were retired; deleted after a grace
    retired: list[tuple[str, float]] = msgspec.field(default_factory=list)
    # what the last successful batch wrote (for /v1/stats): free-form, small
    last_batch: dict[str, Any] = msgspec.field(default_factory=dict)

    def table_files(self, table: str, days: Iterable[str] | None = None) -> list[str]:
        """Live files of a table, optionally only those of the given days."""
        paths = self.files.get(table, [])
        if days is None:
            return list(paths)
        wanted = {f"date={d}" for d in days}
        return [p for p in paths if p.split("/")[1] in wanted]


def read_manifest(data_dir: str | Path) -> Manifest:
    """The current manifest (an empty one before the first batch)."""
    try:
        raw = (Path(data_dir) / MANIFEST).read_bytes()
    except FileNotFoundError:
        return Manifest()
    return msgspec.json.decode(raw, type=Manifest)


@contextlib.contextmanager
def update_manifest(data_dir: str | Path) -> Iterator[Manifest]:
    """Lock, read, let the caller change, then atomically replace the manifest (version + 1).

    Writers (batcher, compactor) serialise on an flock; readers never lock.
    """
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(root)
        yield manifest
        manifest.version += 1
        for table in manifest.files:
            manifest.files[table] = sorted(set(manifest.files[table]))
        tmp = root / f".{MANIFEST}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.encode(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / MANIFEST)
        fsync_dir(root)


# --- natural keys and streaming atomic writes (batcher, compactor) -----------------------------

# The columns that make a stored row unique (DESIGN invariant 2), per table: commits by
# (did, collection, rkey, rev), where a typed table's collection is fixed and so not a column.
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


def key_array(table: str, data: pa.Table) -> pa.ChunkedArray:
    """One string per row joining its natural-key columns (for set membership in Arrow)."""
    columns = [data[c].cast(pa.string()) for c in KEY_COLUMNS[table]]
    return pc.binary_join_element_wise(*columns, KEY_SEPARATOR)


def writer_options(schema: pa.Schema, zstd_level: int) -> dict[str, Any]:
    """The Parquet writer options every data file uses (the same as `write_atomic`)."""
    dictionary_cols = [f.name for f in schema if pa.types.is_dictionary(f.type) or f.name == "did"]
    return {
        "compression": "zstd",
        "compression_level": zstd_level,
        "use_dictionary": dictionary_cols or True,
        "write_statistics": True,
    }


class AtomicParquetWriter:
    """Stream record batches into directory/name.parquet, atomically on `close()`.

    Like `write_atomic`, for data that does not fit in memory at once (compaction) or that is
    written in row-group slices (the batcher): the rows go to `.<name>.tmp`, which no reader's
    glob matches; `close()` fsyncs, renames and fsyncs the directory. `abort()` (or an exception
    inside `with`) removes the temporary file, so nothing partial is ever visible.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        schema: pa.Schema,
        *,
        zstd_level: int = 3,
        sorting_columns: list[pq.SortingColumn] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.final = directory / f"{name}.parquet"
        self.tmp = directory / f".{name}.tmp"
        self.rows = 0
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        try:
            self._writer = pq.ParquetWriter(
                self._fh,
                schema,
                sorting_columns=sorting_columns,
                **writer_options(schema, zstd_level),
            )
        except BaseException:
            self.abort()
            raise

    def write(self, data: pa.Table | pa.RecordBatch, row_group_size: int | None = None) -> None:
        """Append rows (each call writes at least one row group)."""
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        self._writer.write_table(data, row_group_size=row_group_size)
        self.rows += data.num_rows

    def flush(self) -> None:
        """Push buffered bytes to the temporary file (for crash tests: a torn temp file)."""
        self._fh.flush()

    def close(self) -> Path:
        """Finish the file and make it visible under its final name; return that path."""
        try:
            self._writer.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.directory)
        return self.final

    def abort(self) -> None:
        """Drop the temporary file; the final name is left as it was."""
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
