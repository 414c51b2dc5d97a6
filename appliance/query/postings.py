"""Candidate rows from the row postings of token indexes (format 4 on): the rows of each posts
file that hold every key a search looks up, so a search reads those rows and no others.

A search's keys are its text pieces (the rows of every vocabulary entry containing the piece),
its author and mention (hashed DIDs) and its lang, tag and domain keys (`store.textindex` says
why a matching row always holds them). The candidates of a file are the intersection of its rows
over the keys: a superset of the matching rows, which the engine filters with the search's own
SQL, so postings only narrow, never change, an answer.

Keys are counted first (the sum of their entries' row counts, from the small `n` column) and
loaded smallest first; intersecting stops once few candidates are left (the SQL filter is cheap
on a few rows) or the next key is too large to be worth reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from appliance.store import textindex

# Stop intersecting once this few candidate rows are left in all: each costs a row read, and
# the next key's postings would cost more to read than the rows they would rule out.
FEW_CANDIDATES = 256
# Never read more postings than this for one key (all files together): 4 bytes each in memory.
MAX_KEY_ROWS = 8_000_000

_SOURCE = "read_parquet($files, filename = true, hive_partitioning = false)"
_EMPTY = np.empty(0, dtype=np.uint32)


@dataclass(frozen=True)
class Key:
    """One lookup: a text piece (FIELD_TOKEN, matched as a substring of vocabulary entries), a
    hashed DID (FIELD_DID, FIELD_MENTION) or an equality key (FIELD_LANG, FIELD_TAG, ...)."""

    field: int
    value: str

    def where(self, param: str) -> str:
        """SQL selecting this key's entries; `param` names the bound value."""
        if self.field == textindex.FIELD_TOKEN:
            return f"field = {textindex.FIELD_TOKEN} AND contains(key, ${param})"
        if self.field in textindex.HASH_FIELDS:
            return f"field = {self.field} AND h = {textindex.DID_HASH.format('$' + param)}"
        if self.field in textindex.KEY_FIELDS:
            return f"field = {self.field} AND key = ${param}"
        raise ValueError(f"not a key field: {self.field}")


def keys_of(pieces: Sequence[str], did: str | None, keys: Sequence[tuple[int, str]]) -> list[Key]:
    out = [Key(textindex.FIELD_TOKEN, p) for p in dict.fromkeys(pieces) if p]
    if did is not None:
        out.append(Key(textindex.FIELD_DID, did))
    out.extend(Key(field, value) for field, value in keys if value)
    return out


def counts(con: duckdb.DuckDBPyConnection, sidecars: list[str], keys: list[Key]) -> list[int]:
    """Per key, the rows its entries list over all sidecars (a row may count once per entry)."""
    params: dict[str, Any] = {"files": sidecars}
    sums = []
    for i, key in enumerate(keys):
        params[f"k{i}"] = key.value
        sums.append(f"coalesce(sum(n) FILTER (WHERE {key.where(f'k{i}')}), 0)")
    rows = con.execute(f"SELECT {', '.join(sums)} FROM {_SOURCE}", params).fetchall()
    return [int(v) for v in rows[0]] if rows else [0] * len(keys)


def rows_of(con: duckdb.DuckDBPyConnection, sidecars: list[str], key: Key) -> dict[str, np.ndarray]:
    """filename -> the ascending, distinct rows of the key's entries in that sidecar."""
    table = con.sql(
        f"SELECT filename, rows FROM {_SOURCE} WHERE {key.where('k')}",
        params={"files": sidecars, "k": key.value},
    ).to_arrow_table()
    out: dict[str, np.ndarray] = {}
    if table.num_rows == 0:
        return out
    names = table.column("filename").combine_chunks()
    lists = table.column("rows").combine_chunks()
    assert isinstance(lists, pa.ListArray)
    flat = pc.list_flatten(lists).to_numpy().astype(np.uint32, copy=False)
    owner = pc.list_parent_indices(lists).to_numpy()
    file_of_entry = pc.dictionary_encode(names)
    assert isinstance(file_of_entry, pa.DictionaryArray)
    codes = file_of_entry.indices.to_numpy()[owner]
    for code, name in enumerate(file_of_entry.dictionary.to_pylist()):
        rows = flat[codes == code]
        out[str(name)] = np.unique(rows)  # sorted; one entry per row
    return out


def candidate_rows(
    con: duckdb.DuckDBPyConnection,
    sidecars: list[str],
    keys: list[Key],
    *,
    few: int = FEW_CANDIDATES,
    max_key_rows: int = MAX_KEY_ROWS,
) -> dict[str, np.ndarray] | None:
    """Per sidecar, the rows holding every key read (ascending), or None if even the smallest
    key lists more than `max_key_rows` rows (nothing selective: the caller scans instead).

    A sidecar with no candidate maps to an empty array.
    """
    if not keys or not sidecars:
        raise ValueError("nothing to look up")
    sizes = counts(con, sidecars, keys)
    order = sorted(range(len(keys)), key=sizes.__getitem__)
    if sizes[order[0]] > max_key_rows:
        return None
    found: dict[str, np.ndarray] = {s: _EMPTY for s in sidecars}
    found.update(rows_of(con, sidecars, keys[order[0]]))
    for i in order[1:]:
        left = sum(len(r) for r in found.values())
        if left <= few or sizes[i] > max_key_rows:
            break
        other = rows_of(con, sidecars, keys[i])
        found = {
            s: np.intersect1d(r, other.get(s, _EMPTY), assume_unique=True) if len(r) else r
            for s, r in found.items()
        }
    return found
