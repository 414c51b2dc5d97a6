"""Export formats of /v1/export: CSV (RFC 4180), JSON lines and Parquet, written in chunks.

Each file ends by saying what it holds (`ExportSummary`), so a saved file still tells whether it
is complete and whether the result limit cut it: CSV ends with a one-field row
`# export complete: rows=N limit=L result_limit_reached=true|false`; JSON lines with the line
`{"export": {...}}` (the posts are the lines with a "uri"); Parquet carries the same object as
JSON in its key-value metadata under `appliance.export`. A file without that ending was cut off.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from appliance.api.http import encode_json, iso_us
from appliance.query.model import Post

EXPORT_FIELDS = [f.name for f in msgspec.structs.fields(Post)]
_LIST_FIELDS = {"langs", "links", "mentions", "tags"}
_TIME_FIELDS = {"created_at", "indexed_at"}


class ExportSummary(msgspec.Struct, kw_only=True):
    """What an export holds, written at its end."""

    complete: bool = True  # written only after the last row
    rows: int  # posts in the file
    limit: int  # the most this export could hold (the `limit` asked for, or the cap)
    result_limit_reached: bool  # more posts match the filters than the file holds

    def line(self) -> str:
        reached = "true" if self.result_limit_reached else "false"
        return (
            f"# export complete: rows={self.rows} limit={self.limit} result_limit_reached={reached}"
        )


PARQUET_SUMMARY_KEY = "appliance.export"


def _iso(value: datetime | None) -> str:
    return "" if value is None else iso_us(value)


class _CsvWriter:
    """RFC 4180 CSV (CRLF, quotes doubled), UTF-8; list columns as JSON arrays."""

    content_type = "text/csv; charset=utf-8; header=present"
    extension = "csv"

    def _encode(self, rows: list[list[str]]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerows(rows)
        return out.getvalue().encode()

    def begin(self) -> bytes:
        return self._encode([EXPORT_FIELDS])

    def rows(self, posts: list[Post]) -> bytes:
        table = []
        for post in posts:
            row = []
            for name in EXPORT_FIELDS:
                value = getattr(post, name)
                if name in _LIST_FIELDS:
                    row.append(msgspec.json.encode(value).decode())
                elif name in _TIME_FIELDS:
                    row.append(_iso(value))
                else:
                    row.append("" if value is None else str(value))
            table.append(row)
        return self._encode(table)

    def end(self, summary: ExportSummary) -> bytes:
        return self._encode([[summary.line()]])


class _JsonlWriter:
    """One JSON object per line, the same objects /v1/search returns."""

    content_type = "application/x-ndjson"
    extension = "jsonl"

    def begin(self) -> bytes:
        return b""

    def rows(self, posts: list[Post]) -> bytes:
        return b"".join(encode_json(p) + b"\n" for p in posts)

    def end(self, summary: ExportSummary) -> bytes:
        return msgspec.json.encode({"export": summary}) + b"\n"


_STRS = pa.list_(pa.string())
_TS = pa.timestamp("us", tz="UTC")
EXPORT_SCHEMA = pa.schema(
    [
        pa.field(
            name,
            _STRS if name in _LIST_FIELDS else _TS if name in _TIME_FIELDS else pa.string(),
            nullable=name not in {"uri", "did", "indexed_at"},
        )
        for name in EXPORT_FIELDS
    ]
)


class _Sink(io.RawIOBase):
    """A write-only file that hands back what was written since the last drain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._pos += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._pos

    def drain(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class _ParquetWriter:
    """Parquet (zstd), one row group per batch, written as the batches arrive."""

    content_type = "application/vnd.apache.parquet"
    extension = "parquet"

    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer = pq.ParquetWriter(self._sink, EXPORT_SCHEMA, compression="zstd")

    def begin(self) -> bytes:
        return self._sink.drain()

    def rows(self, posts: list[Post]) -> bytes:
        columns = {name: [getattr(p, name) for p in posts] for name in EXPORT_FIELDS}
        self._writer.write_table(pa.table(columns, schema=EXPORT_SCHEMA))
        return self._sink.drain()

    def end(self, summary: ExportSummary) -> bytes:
        self._writer.add_key_value_metadata(
            {PARQUET_SUMMARY_KEY: msgspec.json.encode(summary).decode()}
        )
        self._writer.close()
        return self._sink.drain()


WRITERS: dict[str, type[_CsvWriter] | type[_JsonlWriter] | type[_ParquetWriter]] = {
    "csv": _CsvWriter,
    "jsonl": _JsonlWriter,
    "parquet": _ParquetWriter,
}
