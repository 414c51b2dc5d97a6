"""Candidate rows from the row postings of token indexes (format 4 on): the rows of each posts file
that hold every key a search looks up, so a search reads those rows and no others.

A search's keys are its text pieces (the rows of every vocabulary entry containing the piece),
its author and mention (hashed DIDs) and its lang, tag and domain keys (`store.textindex` says
why a matching row always holds them). The candidates of a file are the intersection of its rows
over the keys: a superset of the matching rows, which the engine filters with the search's own
SQL, so postings only narrow, never change, an answer.

Lookups are point reads with pyarrow, not DuckDB scans: each sidecar's vocabulary of text tokens
(keys, row counts, where each entry is) is read once and kept, a piece is matched against it in
memory, and an equality key is found in the one row group whose statistics can hold it. Keys are
counted first (from `n`) and their rows read smallest first; intersecting stops once few
candidates are left (the SQL filter is cheap on a few rows) or the next key is too large to be
worth reading. A sidecar's row groups are small (`textindex.write_sidecar`), so reading a rare
key's rows decompresses little.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from appliance.store import textindex

# Stop intersecting once this few candidate rows per file are left: each costs a row read, and
# the next key's postings (a read or two per file) would cost more than the rows they rule out.
FEW_CANDIDATES = 2
# Never read more postings than this for one key (all files together): 4 bytes each in memory.
MAX_KEY_ROWS = 8_000_000

MEMO_KEYS = 256  # keys whose entries each sidecar keeps

_EMPTY = np.empty(0, dtype=np.uint32)


@dataclass(frozen=True)
class Key:
    """One lookup: a text piece (FIELD_TOKEN, matched as a substring of vocabulary entries), a
    DID (FIELD_DID, FIELD_MENTION: `value` is its 64-bit index hash) or an equality key."""

    field: int
    value: str | int


def keys_of(
    con: duckdb.DuckDBPyConnection,
    pieces: Sequence[str],
    did: str | None,
    keys: Sequence[tuple[int, str]],
) -> list[Key]:
    """The lookups of a search; DIDs hashed as the index hashes them."""
    out: list[Key] = [Key(textindex.FIELD_TOKEN, p) for p in dict.fromkeys(pieces) if p]
    wanted = [(textindex.FIELD_DID, did)] if did is not None else []
    wanted += [(f, v) for f, v in keys if v]
    for field, value in wanted:
        if field in textindex.HASH_FIELDS:
            rows = con.execute(f"SELECT {textindex.DID_HASH.format('$v')}", {"v": value}).fetchall()
            out.append(Key(field, int(rows[0][0])))
        elif field in textindex.KEY_FIELDS:
            out.append(Key(field, value))
        else:
            raise ValueError(f"not a key field: {field}")
    return out


@dataclass(frozen=True)
class Entries:
    """Index entries of one sidecar: their row groups, positions in them, and row counts."""

    groups: np.ndarray
    offsets: np.ndarray
    n: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.n.sum())


_NONE = Entries(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))


class Sidecar:
    """The postings of one token index file: its vocabulary in memory, rows read on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta = pq.read_metadata(path)
        self._memo: collections.OrderedDict[Key, Entries] = collections.OrderedDict()
        self._memo_lock = threading.Lock()
        kv = self.meta.metadata or {}
        self.data_rows = int(kv.get(b"rows", b"0"))  # rows of the data file (its identity)
        names = self.meta.schema.names
        self._stats = [
            {name: self._minmax(g, names.index(name)) for name in ("field", "key", "h")}
            for g in range(self.meta.num_row_groups)
        ]
        token_groups = self._groups_for(textindex.FIELD_TOKEN)
        keys, n, groups, offsets = [], [], [], []
        handle = self._open()
        try:
            for g in token_groups:
                part = handle.read_row_group(g, columns=["field", "key", "n"], use_threads=False)
                mine = np.flatnonzero(part.column("field").to_numpy() == textindex.FIELD_TOKEN)
                keys.append(part.column("key").take(pa.array(mine)))
                n.append(part.column("n").to_numpy()[mine])
                groups.append(np.full(len(mine), g))
                offsets.append(mine)
        finally:
            handle.close()
        self.vocabulary = (
            pa.chunked_array(keys, pa.string()) if keys else pa.chunked_array([], pa.string())
        )
        self._n = np.concatenate(n) if n else np.empty(0, np.int64)
        self._groups = np.concatenate(groups) if groups else np.empty(0, np.int64)
        self._offsets = np.concatenate(offsets) if offsets else np.empty(0, np.int64)

    def entries(self, key: Key) -> Entries:
        """The entries of a key (kept for the last MEMO_KEYS keys: a walk counts them before
        it reads their rows, and pages of one search look up the same keys)."""
        with self._memo_lock:
            known = self._memo.get(key)
            if known is not None:
                self._memo.move_to_end(key)
                return known
        found = self._entries(key)
        with self._memo_lock:
            self._memo[key] = found
            while len(self._memo) > MEMO_KEYS:
                self._memo.popitem(last=False)
        return found

    def _entries(self, key: Key) -> Entries:
        if key.field == textindex.FIELD_TOKEN:
            assert isinstance(key.value, str)
            hit = pc.match_substring(self.vocabulary, key.value).to_numpy(zero_copy_only=False)
            hit = np.asarray(hit, dtype=bool)
            return Entries(self._groups[hit], self._offsets[hit], self._n[hit])
        column = "h" if key.field in textindex.HASH_FIELDS else "key"
        found = [_NONE]
        handle = self._open()
        try:
            for g in self._groups_for(key.field, column, key.value):
                part = handle.read_row_group(g, columns=["field", column, "n"], use_threads=False)
                values, fields = part.column(column), part.column("field")
                match = pc.and_(
                    pc.equal(values, pa.scalar(key.value, values.type)),
                    pc.equal(fields, pa.scalar(key.field, fields.type)),
                )
                mine = np.flatnonzero(pc.fill_null(match, False).to_numpy())
                if len(mine):
                    n = part.column("n").to_numpy()[mine]
                    found.append(Entries(np.full(len(mine), g), mine, n))
        finally:
            handle.close()
        return Entries(
            np.concatenate([e.groups for e in found]),
            np.concatenate([e.offsets for e in found]),
            np.concatenate([e.n for e in found]),
        )

    def rows(self, entries: Entries) -> np.ndarray:
        """The distinct rows the entries list, ascending."""
        if len(entries.groups) == 0:
            return _EMPTY
        parts = []
        handle = self._open()
        try:
            for g in np.unique(entries.groups).tolist():
                at = entries.offsets[entries.groups == g]
                lists = handle.read_row_group(g, columns=["rows"], use_threads=False).column(0)
                taken = lists.take(pa.array(at)).combine_chunks()
                parts.append(pc.list_flatten(taken).to_numpy())
        finally:
            handle.close()
        every = np.concatenate(parts)
        if len(entries.groups) == 1:
            return every.astype(np.uint32, copy=False)  # one entry: ascending, distinct
        return self._distinct(every)

    def intersect(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The rows in both ascending arrays (in linear time: a mask over the file's rows)."""
        if len(a) == 0 or len(b) == 0:
            return _EMPTY
        mask = np.zeros(max(self.data_rows, int(a[-1]) + 1, int(b[-1]) + 1), dtype=bool)
        mask[a] = True
        return b[mask[b]]

    def _distinct(self, rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(max(self.data_rows, int(rows.max()) + 1), dtype=bool)
        mask[rows] = True
        return np.flatnonzero(mask).astype(np.uint32)

    def _open(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.path, metadata=self.meta)

    def _minmax(self, g: int, column: int) -> tuple[object, object] | None:
        stats = self.meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        return stats.min, stats.max

    def _groups_for(self, field: int, column: str | None = None, value: object = None) -> list[int]:
        """Row groups that may hold entries of `field` (with `column` equal to `value`)."""
        out = []
        for g, stats in enumerate(self._stats):
            span = stats["field"]
            if span is not None and not (span[0] <= field <= span[1]):  # type: ignore[operator]
                continue
            if column is not None:
                span = stats[column]
                if span is None or not (span[0] <= value <= span[1]):  # type: ignore[operator]
                    continue
            out.append(g)
        return out


class Postings:
    """The sidecars of the live posts files, each read once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sidecars: dict[str, Sidecar] = {}

    def forget(self, live: set[str]) -> None:
        with self._lock:
            self._sidecars = {p: s for p, s in self._sidecars.items() if p in live}

    def sidecar(self, path: str) -> Sidecar:
        known = self._sidecars.get(path)
        if known is None:
            known = Sidecar(path)
            with self._lock:
                self._sidecars[path] = known
        return known

    def smallest(self, sidecars: list[str], keys: list[Key]) -> int:
        """The rows listed by the key that lists fewest, over all the sidecars."""
        files = [self.sidecar(s) for s in sidecars]
        return min(sum(f.entries(k).rows for f in files) for k in keys)

    def candidate_rows(
        self,
        sidecars: list[str],
        keys: list[Key],
        *,
        few: int | None = None,
        max_key_rows: int | None = None,
    ) -> dict[str, np.ndarray] | None:
        """Per sidecar, the rows holding every key read (ascending), or None if even the
        smallest key lists more than `max_key_rows` rows (nothing selective: the caller scans).

        A sidecar with no candidate maps to an empty array.
        """
        if not keys or not sidecars:
            raise ValueError("nothing to look up")
        few = FEW_CANDIDATES if few is None else few
        max_key_rows = MAX_KEY_ROWS if max_key_rows is None else max_key_rows
        files = [self.sidecar(s) for s in sidecars]
        entries = [[f.entries(k) for f in files] for k in keys]
        sizes = [sum(e.rows for e in per_file) for per_file in entries]
        order = sorted(range(len(keys)), key=sizes.__getitem__)
        if sizes[order[0]] > max_key_rows:
            return None
        found = {f.path: f.rows(e) for f, e in zip(files, entries[order[0]], strict=True)}
        for i in order[1:]:
            # another key costs a read or two per file; a candidate row costs one read
            if sum(len(r) for r in found.values()) <= few * len(files) or sizes[i] > max_key_rows:
                break
            found = {
                f.path: f.intersect(found[f.path], f.rows(e)) if len(found[f.path]) else _EMPTY
                for f, e in zip(files, entries[i], strict=True)
            }
        return found
