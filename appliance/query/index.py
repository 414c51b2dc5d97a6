"""In-memory indexes over the live files, read once per file: what hides a post version
(`store.visibility.HidingIndex`) and the latest handle of each DID (`Handles`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from appliance.query.snapshot import Snapshot
from appliance.store import visibility

T = TypeVar("T")


class Handles:
    """The latest handle of each DID seen in identities, keyed by hash(did)."""

    def __init__(self, table: pa.Table) -> None:
        if table.num_rows:
            table = table.sort_by([("h", "ascending"), ("time_us", "ascending")])
            keys = table.column("h").to_numpy()
            last = np.ones(len(keys), dtype=bool)
            last[:-1] = keys[1:] != keys[:-1]  # the latest event of each DID sorts last
            table = table.filter(pa.array(last))
        self.keys = table.column("h").to_numpy().astype(np.uint64)
        self.times = table.column("time_us").to_numpy()
        self.dids = table.column("did")
        self.handles = table.column("handle")
        self.lowered = pc.utf8_lower(self.handles)

    def handles_of(self, hashes: np.ndarray) -> list[str | None]:
        if len(self.keys) == 0:
            return [None] * len(hashes)
        pos = np.searchsorted(self.keys, hashes)
        pos[pos == len(self.keys)] = 0
        found = self.keys[pos] == hashes
        return [
            self.handles[int(i)].as_py() if ok else None for i, ok in zip(pos, found, strict=True)
        ]

    def latest_of(self, hashes: np.ndarray) -> list[tuple[str, int] | None]:
        """(handle, time_us) of each DID's latest identity event with a handle, or None."""
        if len(self.keys) == 0:
            return [None] * len(hashes)
        pos = np.searchsorted(self.keys, hashes)
        pos[pos == len(self.keys)] = 0
        found = self.keys[pos] == hashes
        return [
            (self.handles[int(i)].as_py(), int(self.times[int(i)])) if ok else None
            for i, ok in zip(pos, found, strict=True)
        ]

    def holder_of(self, handle: str) -> str | None:
        """The DID whose latest handle this is (the most recent claim if several)."""
        claim = self.claim_of(handle)
        return claim[0] if claim else None

    def claim_of(self, handle: str) -> tuple[str, int] | None:
        """(DID, time_us) of the latest identity event whose handle this still is."""
        rows = np.flatnonzero(pc.equal(self.lowered, handle).to_numpy(zero_copy_only=False))
        if len(rows) == 0:
            return None
        i = int(rows[np.argmax(self.times[rows])])
        return str(self.dids[i].as_py()), int(self.times[i])


HANDLES_SQL = (
    "SELECT hash(did) AS h, did, time_us, handle FROM read_parquet($files) WHERE handle IS NOT NULL"
)


class PerFileIndex(Generic[T]):
    """An in-memory index over the live files of some tables, read once per file.

    Files never change once live (a redone batch rewrites identical rows), so each file is read
    the first time a snapshot lists it; the merged index is rebuilt when the file set changes.
    """

    def __init__(
        self,
        tables: tuple[str, ...],
        load: Callable[[duckdb.DuckDBPyConnection, str, str], pa.Table],
        merge: Callable[[list[pa.Table]], T],
    ) -> None:
        self._tables = tables
        self._load = load
        self._merge = merge
        self._lock = threading.Lock()
        self._per_file: dict[str, pa.Table] = {}
        self._version = -1
        self._merged = merge([])

    def current(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot) -> T:
        """The index for this snapshot, reading the files it has not seen yet."""
        if self._version == snap.version:
            return self._merged
        with self._lock:
            if self._version == snap.version:
                return self._merged
            wanted = [(t, p) for t in self._tables for p in snap.files(t)]
            per_file = {}
            for table, path in wanted:
                loaded = self._per_file.get(path)
                if loaded is None:
                    loaded = self._read(cur, table, path)
                per_file[path] = loaded
            self._per_file = per_file
            self._merged = self._merge([t for t in per_file.values() if t.num_rows])
            self._version = snap.version
            return self._merged

    def _read(self, cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
        try:
            return self._load(cur, table, path)
        except duckdb.IOException:
            if os.path.exists(path):
                raise
            # retired after our snapshot was taken; its rows live in the file that replaced it
            return pa.table({})


def load_hiding(cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
    return visibility.load_hiding(cur, "posts", table, path)


def load_handles(cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
    out: pa.Table = cur.sql(HANDLES_SQL, params={"files": [path]}).to_arrow_table()
    return out


def merge_handles(tables: list[pa.Table]) -> Handles:
    if not tables:
        schema = pa.schema(
            [
                ("h", pa.uint64()),
                ("did", pa.string()),
                ("time_us", pa.int64()),
                ("handle", pa.string()),
            ]
        )
        return Handles(schema.empty_table())
    return Handles(pa.concat_tables(tables, promote_options="permissive"))
