"""Reading given rows of a posts file: each row group that holds one is decompressed once, and only
the rows asked for are kept (posts files have small row groups for this; `store.compact`)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from appliance.store import layout

# The posts columns a search's SQL uses (its result columns and every filter).
COLUMNS = [
    "did", "rkey", "rev", "time_us", "created_at", "text", "langs", "reply_parent", "reply_root",
    "quote_uri", "embed_kind", "external_uri", "links", "mentions", "tags", "cid",
]  # fmt: skip


class RowReader:
    """Reads rows by number from live posts files; file footers are parsed once per file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[pq.FileMetaData, np.ndarray]] = {}

    def forget(self, live: set[str]) -> None:
        """Drop what is kept for files no longer live."""
        with self._lock:
            self._files = {p: f for p, f in self._files.items() if p in live}

    def bounds(self, path: str) -> np.ndarray:
        """The first row of each row group of the file, and the file's row count last."""
        return self._file(path)[1]

    def read(self, path: str, rows: np.ndarray) -> pa.Table:
        """The rows (ascending row numbers) of the file, in that order, with COLUMNS."""
        meta, bounds = self._file(path)
        groups = np.searchsorted(bounds, rows, side="right") - 1
        handle = pq.ParquetFile(path, metadata=meta)
        parts = []
        try:
            for group in np.unique(groups):
                wanted = rows[groups == group] - bounds[group]
                table = handle.read_row_group(int(group), columns=COLUMNS, use_threads=False)
                parts.append(table.take(pa.array(wanted)))
        finally:
            handle.close()
        if not parts:
            return layout.SCHEMAS["posts"].empty_table().select(COLUMNS)
        return pa.concat_tables(parts)

    def _file(self, path: str) -> tuple[pq.FileMetaData, np.ndarray]:
        known = self._files.get(path)
        if known is not None:
            return known
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        with self._lock:
            self._files[path] = (meta, bounds)
        return meta, bounds
