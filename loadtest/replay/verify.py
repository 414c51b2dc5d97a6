"""Verification of a replay against its expectation (computed from the source alone):

- storage: per table and day, the count and key digest of the live Parquet files (the manifest's)
  equal the ground truth's; duplicates (a key stored twice) counted by DuckDB; every row in the
  partition of its time_us;
- rejects: by reason, the distinct frames in the dead-letter stream equal the distinct rejected
  frames of the source (a frame received again after a reconnect is dead-lettered again, and
  two identical bad frames cannot be told apart there, so both sides count distinct frames);
- deleted posts: a sample of posts stored and deleted later is absent from /v1/search and
  /v1/export;
- sample searches: /v1/search's first page and /v1/export's rows equal the answers computed from
  the source, newest first; their latencies go into the report.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow.parquet as pq
import redis

from appliance.store import layout
from appliance.store.manifest import read_manifest
from loadtest.firehose import KeyDigest
from loadtest.replay.source import Expectation, dead_letter_digest
from loadtest.replay.stack import http_get

PAGE = 100


class TableCheck(msgspec.Struct):
    table: str
    expected: int
    stored: int
    duplicates: int
    lost: int
    days_mismatched: list[str]
    misplaced_rows: int = 0


class SearchCheck(msgspec.Struct):
    name: str
    params: dict[str, str]
    expected: int
    page_ok: bool
    export_rows: int
    export_ok: bool
    search_s: float
    search_took_ms: float
    export_s: float
    detail: str = ""


class Verification(msgspec.Struct):
    verified: bool = False
    events_expected: int = 0
    events_stored: int = 0
    lost: int = 0
    duplicates: int = 0
    tables: list[TableCheck] = msgspec.field(default_factory=list)
    rejects_expected: dict[str, int] = msgspec.field(default_factory=dict)
    rejects_found: dict[str, int] = msgspec.field(default_factory=dict)
    deleted_checked: int = 0
    deleted_visible: list[str] = msgspec.field(default_factory=list)
    searches: list[SearchCheck] = msgspec.field(default_factory=list)
    searches_compacted: list[SearchCheck] = msgspec.field(default_factory=list)
    stats_ok: bool | None = None
    problems: list[str] = msgspec.field(default_factory=list)


def check_storage(data_dir: Path, expect: Expectation, out: Verification) -> None:
    manifest = read_manifest(data_dir)
    for table in layout.TABLES:
        files = [data_dir / p for p in manifest.files.get(table, [])]
        got: dict[str, KeyDigest] = {}
        misplaced = 0
        columns = [*layout.KEY_COLUMNS[table], "time_us"]
        for path in files:
            day = path.parent.name.removeprefix("date=")
            for batch in pq.ParquetFile(path).iter_batches(batch_size=262_144, columns=columns):
                rows = batch.to_pydict()
                times = rows["time_us"]
                if times and {layout.day_of(min(times)), layout.day_of(max(times))} != {day}:
                    misplaced += len(times)
                digest = got.setdefault(day, KeyDigest())
                for key in layout.stored_keys(table, rows):
                    digest.add(key)
        duplicates = 0
        if files:
            cols = ", ".join(layout.KEY_COLUMNS[table])
            duplicates = _twice(files, cols)
        truth = expect.truth.tables.get(table, {})
        expected = sum(d.count for d in truth.values())
        stored = sum(d.count for d in got.values())
        mismatched = sorted(day for day in set(truth) | set(got) if truth.get(day) != got.get(day))
        check = TableCheck(
            table,
            expected,
            stored,
            int(duplicates),
            max(expected - (stored - int(duplicates)), 0),
            mismatched,
            misplaced,
        )
        out.tables.append(check)
        if mismatched or misplaced:
            out.problems.append(f"{table}: days {mismatched} differ, {misplaced} rows misplaced")
    out.events_expected = sum(t.expected for t in out.tables)
    out.events_stored = sum(t.stored for t in out.tables)
    out.lost = sum(t.lost for t in out.tables)
    out.duplicates = sum(t.duplicates for t in out.tables)


def _twice(files: list[Path], cols: str) -> int:
    """Rows whose key another row of the files has too (a connection of its own: the module's
    default one is shared with whatever else runs in this process)."""
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT count(*) - count(DISTINCT ({cols})) FROM read_parquet($f)",
            {"f": [str(f) for f in files]},
        ).fetchall()
    return int(rows[0][0])


def check_compacted(data_dir: Path, out: Verification) -> None:
    """After compaction: no key twice in any table (deleted and superseded rows may be gone)."""
    manifest = read_manifest(data_dir)
    for table in layout.TABLES:
        files = [str(data_dir / p) for p in manifest.files.get(table, [])]
        if not files:
            continue
        cols = ", ".join(layout.KEY_COLUMNS[table])
        twice = _twice([Path(f) for f in files], cols)
        if twice:
            out.problems.append(f"{table}: {twice} keys stored twice after compaction")


def check_rejects(
    client: redis.Redis, key: str, expect: Expectation, out: Verification, start: str = "-"
) -> None:
    """The dead letters from `start` on (a stream id, "(id" exclusive) against the expected."""
    seen: set[tuple[bytes, bytes]] = set()
    while True:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
            key, min=start, count=10_000
        )
        for _, fields in entries:
            seen.add((fields.get(b"reason", b"?"), dead_letter_digest(fields.get(b"data", b""))))
        if len(entries) < 10_000:
            break
        start = "(" + entries[-1][0].decode()
    found: dict[str, int] = {}
    for reason, _ in seen:
        found[reason.decode()] = found.get(reason.decode(), 0) + 1
    out.rejects_expected = dict(expect.rejected_distinct)
    out.rejects_found = found
    if found != out.rejects_expected:
        out.problems.append(f"rejects by reason: expected {out.rejects_expected}, found {found}")


def _get_json(base: str, path: str, params: dict[str, str]) -> tuple[Any, float]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    began = time.perf_counter()
    status, body = http_get(url, timeout=120)
    elapsed = time.perf_counter() - began
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status} {body[:300]!r}")
    return body, elapsed


def _export(base: str, params: dict[str, str]) -> tuple[list[str], float, int]:
    """(uris, seconds, the most rows this export could hold: its summary's limit)."""
    body, elapsed = _get_json(base, "/v1/export", {**params, "format": "jsonl"})
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    # the last line is the export's summary ({"export": {...}}), not a post
    limit = next((int(r["export"]["limit"]) for r in rows if "export" in r), 0)
    return [row["uri"] for row in rows if "uri" in row], elapsed, limit


def check_api(
    base: str, expect: Expectation, out: Verification, export_cap: int | None, stats: bool = True
) -> None:
    """Sample searches and deleted posts; with `stats`, /v1/stats's totals (before compaction,
    which drops deleted and superseded rows, they count every event). An export holds the first
    `export_cap` rows; None: as many as the export says it could hold (a running appliance
    caps its results unless its result limit is off)."""
    for case in expect.searches:
        params = case.query.params()
        want = [uri for _, uri in case.expected]
        body, search_s = _get_json(base, "/v1/search", {**params, "limit": str(PAGE)})
        page = json.loads(body)
        got_page = [p["uri"] for p in page["posts"]]
        got_export, export_s, limit = _export(base, params)
        n = min(len(want), limit if export_cap is None else export_cap)
        check = SearchCheck(
            case.query.name,
            params,
            len(want),
            got_page == want[: min(PAGE, n)],  # a result limit below a page caps it too
            len(got_export),
            got_export == want[:n],
            round(search_s, 4),
            float(page.get("took_ms", 0.0)),
            round(export_s, 4),
        )
        if not (check.page_ok and check.export_ok):
            missing = set(want[:n]) - set(got_export)
            extra = set(got_export) - set(want)
            check.detail = (
                f"export: {len(missing)} expected rows missing (e.g. {sorted(missing)[:2]}), "
                f"{len(extra)} unexpected (e.g. {sorted(extra)[:2]})"
            )
            out.problems.append(f"search {case.query.name!r}: {check.detail}")
        out.searches.append(check)
    for uri in expect.deleted_sample:
        did = uri.split("/")[2]
        body, _ = _get_json(base, "/v1/search", {"author": did, "limit": str(PAGE)})
        rows, _, _ = _export(base, {"author": did})
        shown = uri in {p["uri"] for p in json.loads(body)["posts"]} or uri in rows
        out.deleted_checked += 1
        if shown:
            out.deleted_visible.append(uri)
    if out.deleted_visible:
        out.problems.append(f"deleted posts still visible: {out.deleted_visible[:5]}")
    if stats:
        _check_stats(base, expect, out)


def _check_stats(base: str, expect: Expectation, out: Verification) -> None:
    body, _ = _get_json(base, "/v1/stats", {})
    stats = json.loads(body)
    truth = expect.truth
    out.stats_ok = stats.get("events") == truth.count() and stats.get("posts") == truth.count(
        "posts"
    )
    if not out.stats_ok:
        out.problems.append(
            f"/v1/stats: events {stats.get('events')} posts {stats.get('posts')}, expected "
            f"{truth.count()} and {truth.count('posts')}"
        )


def conclude(out: Verification) -> Verification:
    if out.lost or out.duplicates:
        out.problems.append(f"{out.lost} events lost, {out.duplicates} stored twice")
    out.verified = not out.problems and bool(out.tables)
    return out
