"""Atomic Parquet writes: a `*.parquet` file is either absent or complete (invariant 3 in
docs/architecture.md).

A file is written under a temporary name no reader's glob matches (`.<name>.tmp`, not ending in
.parquet), fsynced, renamed, and the directory fsynced. The same name always lands at the same
path, so a batch redone after a crash replaces its own file. Every data file (batch, compacted,
test fixture) goes through `AtomicParquetWriter` with `writer_options`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself)."""
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
    with AtomicParquetWriter(
        directory, name, table.schema, zstd_level=zstd_level, sorting_columns=sorting_columns
    ) as writer:
        writer.write(table, row_group_size=row_group_size)
    return writer.final


def writer_options(schema: pa.Schema, zstd_level: int) -> dict[str, Any]:
    """The Parquet writer options every data file uses (batch, compacted, fixtures)."""
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
