"""The visibility rule (invariant 4 in docs/architecture.md): which stored versions of a record
a reader sees.

A version of a record (did, collection, rkey) is visible iff no row that hides the record has a
greater rev. The rows that hide a record are its deletes (rows of `deletes` with its did,
collection and rkey) and its updates (rows of its own table with operation "update"). Revs are
TIDs, which sort in commit order, so a greater rev is a later commit. A create hides nothing: a
repository holds one record per key, so a second create of a key comes after a delete of it.

`HIDERS` is the rule; it is rendered twice, and tests/test_visibility.py checks that the two
agree on the tricky cases:

- `visible_sql`: SQL over a table's files and the deletes; compaction keeps only what it selects.
- `HidingIndex`: (hash(uri), greatest hiding rev) in memory, read with `hiding_sql`; the query
  engine keeps a candidate row only if `HidingIndex.visible` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from appliance.store import layout

UPDATE = "update"


def hiders(table: str) -> dict[str, tuple[str, str | None]]:
    """The rule: source table -> (column, value) of the rows that can hide a `table` record.

    The deletes of the table's collection (None: any collection without a typed table, for
    `records`) and the table's own updates."""
    return {
        "deletes": ("collection", layout.TABLE_COLLECTION.get(table)),
        table: ("operation", UPDATE),
    }


def _hider_filter(table: str, source: str, params: dict[str, Any]) -> str:
    column, value = hiders(table)[source]
    if value is None:  # deletes of records: any collection without a typed table
        params["typed"] = list(layout.COLLECTION_TABLES)
        return f"NOT list_contains($typed, {column})"
    name = f"hide_{source}"
    params[name] = value
    return f"{column} = ${name}"


def visible_sql(table: str, source: str, with_deletes: bool) -> tuple[str, dict[str, Any]]:
    """SQL selecting the visible rows of `source` (a subquery over `table`'s files), each
    natural key once, in time order; `$deletes` (if `with_deletes`) lists the deletes files.

    The caller binds `$files` (or whatever `source` reads) and `$deletes`."""
    params: dict[str, Any] = {}
    record = layout.RECORD_COLUMNS[table]
    columns = ", ".join((*record, "rev"))
    hiding = [
        f"SELECT {columns} FROM {source} WHERE {_hider_filter(table, table, params)}",
    ]
    if with_deletes:
        hiding.append(
            f"SELECT {columns} FROM read_parquet($deletes, hive_partitioning = false) "
            f"WHERE {_hider_filter(table, 'deletes', params)}"
        )
    same = " AND ".join(f"h.{c} = s.{c}" for c in record)
    key = ", ".join(layout.KEY_COLUMNS[table])
    sql = (
        f"WITH hiding AS ({' UNION ALL '.join(hiding)}) "
        f"SELECT * FROM {source} s "
        f"WHERE NOT EXISTS (SELECT 1 FROM hiding h WHERE {same} AND h.rev > s.rev) "
        f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY time_us) = 1 "
        f"ORDER BY time_us, {key}"
    )
    return sql, params


def hiding_sql(table: str, source: str) -> tuple[str, dict[str, Any]]:
    """SQL reading (h = hash(uri), rev) of the rows of `source` ($files) that can hide a
    record of `table`: what `HidingIndex` is built from."""
    params: dict[str, Any] = {}
    where = _hider_filter(table, source, params)
    sql = f"SELECT hash({layout.uri_sql(source)}) AS h, rev FROM read_parquet($files) WHERE {where}"
    return sql, params


class HidingIndex:
    """Sorted (hash(uri), greatest hiding rev) pairs: the vectorised form of the rule."""

    def __init__(self, keys: np.ndarray, revs: np.ndarray) -> None:
        self.keys = keys
        self.revs = revs

    @classmethod
    def from_tables(cls, tables: Sequence[pa.Table]) -> HidingIndex:
        """The index of the rows `hiding_sql` read (one table per file)."""
        parts = []
        for table in tables:
            keys = table.column("h").to_numpy().astype(np.uint64)
            revs = pc.cast(table.column("rev"), pa.binary()).to_numpy(zero_copy_only=False)
            parts.append(cls(keys, revs.astype("S")))
        return cls.merge(parts)

    @classmethod
    def merge(cls, parts: Sequence[HidingIndex]) -> HidingIndex:
        if not parts:
            return cls(np.empty(0, np.uint64), np.empty(0, "S1"))
        keys = np.concatenate([p.keys for p in parts])
        revs = np.concatenate([p.revs for p in parts])
        order = np.lexsort((revs, keys))
        keys, revs = keys[order], revs[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[1:] != keys[:-1]  # the greatest rev of each key sorts last
        return cls(keys[last], revs[last])

    def newest(self, hashes: np.ndarray) -> np.ndarray:
        """The greatest hiding rev per hash (b"" where none: every rev is greater)."""
        out = np.full(len(hashes), b"", dtype=self.revs.dtype if len(self.revs) else "S1")
        if len(self.keys) == 0:
            return out
        pos = np.searchsorted(self.keys, hashes)
        pos[pos == len(self.keys)] = 0
        found = self.keys[pos] == hashes
        out[found] = self.revs[pos[found]]
        return out

    def visible(self, hashes: Sequence[int], revs: Sequence[str]) -> list[bool]:
        """Per version (hash(uri), rev): True iff no hiding row has a greater rev."""
        newest = self.newest(np.array(hashes, dtype=np.uint64))
        return [hide <= rev.encode() for hide, rev in zip(newest, revs, strict=True)]


def load_hiding(cur: duckdb.DuckDBPyConnection, table: str, source: str, path: str) -> pa.Table:
    """The hiding rows of one file of `source` for records of `table` (see `hiding_sql`)."""
    sql, params = hiding_sql(table, source)
    out: pa.Table = cur.sql(sql, params={"files": [path], **params}).to_arrow_table()
    return out
