"""What /v1/stats counts: rows per day, table and collection, read from file metadata."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb

from appliance.query.snapshot import Segment, Snapshot
from appliance.store import layout


def stored_rows(
    cur: duckdb.DuckDBPyConnection,
    snap: Snapshot,
    segments_of: Callable[[str, str], list[Segment]],
) -> dict[str, Any]:
    """Rows per day and table (from Parquet metadata: `segments_of(path, day)`), per
    collection and per deleted collection, and the newest time_us."""
    per_day: dict[str, dict[str, int]] = {}
    newest: int | None = None
    files = 0
    for table, by_day in snap.days.items():
        for day, paths in by_day.items():
            for path in paths:
                segments = segments_of(path, day)
                files += 1
                per_day.setdefault(day, {}).setdefault(table, 0)
                per_day[day][table] += sum(s.rows for s in segments)
                if segments:
                    top = max(s.max_t for s in segments)
                    newest = top if newest is None else max(newest, top)
    collections: dict[str, int] = {}
    for collection, table in layout.COLLECTION_TABLES.items():
        total = sum(tables.get(table, 0) for tables in per_day.values())
        if total:
            collections[collection] = total
    deletes: dict[str, int] = {}
    for table, target in (("records", collections), ("deletes", deletes)):
        paths = snap.files(table)
        if paths:
            rows = cur.execute(
                "SELECT collection, count(*) FROM read_parquet($files) GROUP BY collection",
                {"files": paths},
            ).fetchall()
            for collection, count in rows:
                target[str(collection)] = target.get(str(collection), 0) + int(count)
    days = [
        {
            "date": day,
            "events": sum(tables.values()),
            "posts": tables.get("posts", 0),
            "tables": dict(sorted(tables.items())),
        }
        for day, tables in sorted(per_day.items())
    ]
    return {
        "data_version": snap.version,
        "files": files,
        "events": sum(d["events"] for d in days),
        "posts": sum(d["posts"] for d in days),
        "days": days,
        "collections": dict(sorted(collections.items())),
        "deletes_by_collection": dict(sorted(deletes.items())),
        "newest_time_us": newest,
    }
