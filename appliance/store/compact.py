"""Compaction: a day's many small batch files → a few large files, sorted, deduplicated, with
deletions applied; swapped in through the manifest so that a running query never fails.

How the swap stays safe for readers:

- Readers take the list of live files from the manifest, never from a glob. Compaction writes
  its outputs (`c-<digest>-NNN.parquet`, temporary name first, fsync, rename, directory fsync),
  then in ONE manifest update removes its inputs from the partition's list, adds its outputs and
  appends the inputs to `retired` with the time. A query sees either the old set or the new
  set, never both and never neither (no row twice, no row missing).
- Retired files stay on disk for `compact_grace_s`, so a query that started on the previous
  manifest keeps reading files that exist; only then are they deleted (deleting a file under a
  running DuckDB scan raises IOException).
- Output names derive from the digest of the input list, so a compaction redone after a crash
  overwrites its own orphaned outputs; orphans of other attempts are swept (compactions hold
  `.compact.lock`, so no other compaction is writing at the same time).

What the merge does, per (table, day), in DuckDB (out of core: it spills beyond
`compact_memory_limit`):

- commit tables (posts, likes, reposts, follows, blocks, records): one row per record (did,
  collection, rkey -- the parts of its at:// uri, which is not stored), the version with the
  greatest rev (duplicates and superseded versions go), and none if a delete row with a greater
  rev exists for the record in the deletes of this day or any later day (a delete is
  committed after its create; the day before is included for clock skew). Versions superseded
  by an update in a LATER day stay in this day's files; the query-time visibility rule hides them.
- deletes: one row per (did, collection, rkey, rev); delete rows are facts and are kept.
- identities, accounts: one row per (did, seq).
- sorted by time_us (then the key), zstd `compact_zstd_level`, at most `compact_max_rows` rows per
  file, DIDs and other dictionary columns dictionary-encoded.

A day is "closed" in event time: once the batcher has stored events `compact_after_s` past the
day's end (UTC). Replays of old data are compacted as they pass, live data an hour after
midnight. Late events for a compacted day land in a new small file; the day is compacted again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from appliance import metrics
from appliance.config import Settings
from appliance.logs import setup_logging
from appliance.store import layout, textindex, visibility
from appliance.store.crash import crash_point
from appliance.store.manifest import Manifest, read_manifest, update_manifest
from appliance.store.writer import AtomicParquetWriter

log = logging.getLogger("appliance.compact")

ROW_GROUP_ROWS = 262_144
# Posts files get small row groups: a search that knows its candidate rows from the token index
# (textindex) reads each of them by decompressing only its row group. Measured on an 833k-post
# day: 2,048-row groups cost +8.5% bytes over 16,384 and a row fetch about a fifth of the time;
# a full text scan is no slower.
POSTS_ROW_GROUP_ROWS = 2_048
ORPHAN_AGE_S = 3600.0  # a batch file or temp file this old and not live is left by a crash
_LOCK = ".compact.lock"


@dataclass
class Compacted:
    table: str
    day: str
    inputs: int
    outputs: list[str]
    rows_in: int
    rows_out: int
    seconds: float


@contextlib.contextmanager
def compaction_lock(data_dir: Path) -> Iterator[None]:
    """One compaction at a time across processes (the batcher's and `appliance compact`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / _LOCK, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def day_end_us(day: str) -> int:
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    return int((start + timedelta(days=1)).timestamp()) * 1_000_000


def _day_of_path(rel: str) -> str:
    return rel.split("/")[1].removeprefix("date=")


def needs_compaction(paths: list[str]) -> bool:
    """A partition with any batch file (not yet compacted) needs compaction."""
    return any(not Path(p).name.startswith(layout.COMPACTED_PREFIX) for p in paths)


def _query(table: str, files: list[str], deletes: list[str]) -> tuple[str, dict[str, Any]]:
    """SQL (and its parameters) selecting the compacted rows of a partition's files: one row
    per natural key, and for commit tables only the visible versions (`store.visibility`)."""
    params: dict[str, Any] = {"files": files}
    columns = ", ".join(layout.SCHEMAS[table].names)
    source = f"(SELECT {columns} FROM read_parquet($files, hive_partitioning = false))"
    key = ", ".join(layout.KEY_COLUMNS[table])
    if table not in layout.COMMIT_TABLES:
        sql = (
            f"SELECT * FROM {source} "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY time_us) = 1 "
            f"ORDER BY time_us, {key}"
        )
        return sql, params
    sql, rule_params = visibility.visible_sql(table, source, with_deletes=bool(deletes))
    if deletes:
        params["deletes"] = deletes
    return sql, {**params, **rule_params}


def _connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    spill = Path(settings.data_dir) / ".compact-spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET memory_limit = $m", {"m": settings.compact_memory_limit})
    con.execute("SET temp_directory = $d", {"d": str(spill)})
    con.execute("SET threads = 2")
    return con


def _sweep_orphans(data_dir: Path, directory: Path, manifest: Manifest) -> int:
    """Delete files in a partition that no manifest refers to and no writer is still writing."""
    if not directory.is_dir():
        return 0
    keep = {p for paths in manifest.files.values() for p in paths}
    keep.update(p for p, _ in manifest.retired)
    now = time.time()
    removed = 0
    for path in directory.iterdir():
        rel = path.relative_to(data_dir).as_posix()
        if rel in keep or not path.is_file():
            continue
        name = path.name
        ours = name.startswith(
            (layout.COMPACTED_PREFIX, f".{layout.COMPACTED_PREFIX}")
        )  # we hold the compaction lock
        stale = now - path.stat().st_mtime > ORPHAN_AGE_S
        if name.endswith(textindex.SUFFIX):
            # an index lives as long as its data file (retired with it, removed with it)
            data_rel = textindex.data_path(path).relative_to(data_dir).as_posix()
            if data_rel in keep:
                continue
        if (name.endswith((".parquet", ".tmp", textindex.SUFFIX))) and (ours or stale):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        metrics.compact_files_removed.inc(removed)
        log.info("orphan files removed", extra={"partition": str(directory), "files": removed})
    return removed


def index_posts_file(con: duckdb.DuckDBPyConnection, path: Path) -> textindex.Built | None:
    """Write the token index of a compacted posts file (before the file goes live).

    The query benchmark builds its store's indexes with this same function.
    """
    try:
        # a cursor of its own: the compaction's result stream is still open on `con`
        built = textindex.build(con.cursor(), path)
    except (duckdb.Error, OSError, ValueError):
        # The file is complete without its index; queries scan it as they scan batch files.
        metrics.compact_index_failures.inc()
        log.exception("text index not written", extra={"file": path.name})
        return None
    metrics.compact_index_seconds.observe(built.seconds)
    log.info(
        "text index written",
        extra={
            "file": path.name,
            "index_bytes": built.bytes,
            "tokens": built.tokens,
            "seconds": round(built.seconds, 3),
        },
    )
    return built


class _Outputs:
    """The compacted files of one partition: row groups of `group_rows`, a new file every
    `compact_max_rows` rows, each posts file indexed once it is complete."""

    def __init__(
        self, settings: Settings, con: duckdb.DuckDBPyConnection, table: str, directory: Path,
        digest: str,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.con = con
        self.table = table
        self.directory = directory
        self.digest = digest
        self.schema = layout.SCHEMAS[table]
        self.group_rows = POSTS_ROW_GROUP_ROWS if table == "posts" else ROW_GROUP_ROWS
        self.paths: list[Path] = []
        self.rows = 0
        self._writer: AtomicParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, raw: pa.RecordBatch) -> None:
        batch = raw.cast(self.schema)
        self.rows += batch.num_rows
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        room = self.settings.compact_max_rows - (self._writer.rows if self._writer else 0)
        if self._pending_rows >= min(self.group_rows, room):
            self._flush_group()

    def finish(self) -> None:
        self._flush_group()
        if self._writer is not None:
            self._close_file()

    def abort(self) -> None:
        """Remove every output (complete or not) and its token index."""
        if self._writer is not None:
            self._writer.abort()
        for path in self.paths:
            path.unlink(missing_ok=True)
            textindex.sidecar_path(path).unlink(missing_ok=True)

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._writer = AtomicParquetWriter(
                self.directory,
                f"{layout.COMPACTED_PREFIX}{self.digest}-{len(self.paths):03d}",
                self.schema,
                zstd_level=self.settings.compact_zstd_level,
                sorting_columns=[pq.SortingColumn(self.schema.get_field_index("time_us"))],
            )
        self._writer.write(pa.Table.from_batches(self._pending), row_group_size=self.group_rows)
        self._pending, self._pending_rows = [], 0
        if self._writer.rows >= self.settings.compact_max_rows:
            self._close_file()

    def _close_file(self) -> None:
        assert self._writer is not None
        self.paths.append(self._writer.close())
        self._writer = None
        if self.table == "posts":
            index_posts_file(self.con, self.paths[-1])
        crash_point(self.settings, "compact_mid")


def _deletes_for(data_dir: Path, manifest: Manifest, table: str, day: str) -> list[str]:
    """The deletes files that can hide rows of a commit table's day: that day's and later."""
    if table not in layout.COMMIT_TABLES:
        return []
    first = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
    return [str(data_dir / p) for p in manifest.table_files("deletes") if _day_of_path(p) >= first]


def compact_partition(
    settings: Settings, table: str, day: str, *, force: bool = False
) -> Compacted | None:
    """Compact one (table, day); None if there is nothing to do."""
    data_dir = Path(settings.data_dir)
    with compaction_lock(data_dir):
        manifest = read_manifest(data_dir)
        inputs = manifest.table_files(table, [day])
        if not inputs or not (force or needs_compaction(inputs)):
            return None
        started = time.monotonic()
        directory = layout.partition_dir(data_dir, table, day)
        _sweep_orphans(data_dir, directory, manifest)
        digest = hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:16]
        deletes = _deletes_for(data_dir, manifest, table, day)
        files = [str(data_dir / p) for p in inputs]
        rows_in = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        con = _connect(settings)
        try:
            out = _Outputs(settings, con, table, directory, digest)
            sql, params = _query(table, files, deletes)
            try:
                for raw in con.sql(sql, params=params).to_arrow_reader(65_536):
                    out.add(raw)
                out.finish()
            except BaseException:
                out.abort()
                raise
        finally:
            con.close()
        new = [p.relative_to(data_dir).as_posix() for p in out.paths]
        now = time.time()
        with update_manifest(data_dir) as m:
            live = [p for p in m.files.get(table, []) if p not in inputs]
            m.files[table] = live + new
            m.retired.extend((p, now) for p in inputs if p not in new)
        crash_point(settings, "compact_after_swap")
    seconds = time.monotonic() - started
    rows_out = out.rows
    metrics.compact_runs.labels(table).inc()
    metrics.compact_duration.observe(seconds)
    metrics.compact_rows_dropped.labels(table).inc(rows_in - rows_out)
    result = Compacted(table, day, len(inputs), new, rows_in, rows_out, seconds)
    log.info(
        "partition compacted",
        extra={
            "table": table,
            "day": day,
            "inputs": len(inputs),
            "outputs": len(new),
            "rows_in": rows_in,
            "rows_out": rows_out,
            "seconds": round(seconds, 3),
        },
    )
    return result


def remove_expired(settings: Settings, now: float | None = None) -> int:
    """Delete retired files older than compact_grace_s; return how many were deleted."""
    data_dir = Path(settings.data_dir)
    if not read_manifest(data_dir).retired:
        return 0
    now = time.time() if now is None else now
    removed = 0
    with update_manifest(data_dir) as m:
        live = {p for paths in m.files.values() for p in paths}
        keep = []
        for path, retired_at in m.retired:
            if path in live:
                continue  # written again (a batch redone under the same name): not retired
            if now - retired_at >= settings.compact_grace_s:
                (data_dir / path).unlink(missing_ok=True)
                textindex.sidecar_path(data_dir / path).unlink(missing_ok=True)
                removed += 1
            else:
                keep.append((path, retired_at))
        m.retired = keep
    if removed:
        metrics.compact_files_removed.inc(removed)
    return removed


def closed_partitions(manifest: Manifest, cutoff_us: int) -> list[tuple[str, str]]:
    """(table, day) of days ending at or before cutoff_us that still hold batch files."""
    out = []
    for table in layout.TABLES:
        days = sorted({_day_of_path(p) for p in manifest.table_files(table)})
        for day in days:
            if day_end_us(day) <= cutoff_us and needs_compaction(
                manifest.table_files(table, [day])
            ):
                out.append((table, day))
    return out


def compact_closed(settings: Settings, cutoff_us: int) -> list[Compacted]:
    """Compact every partition closed by `cutoff_us` that needs it, then drop expired files.

    `deletes` partitions go first, so the deletes of a day are compact when its posts are.
    """
    manifest = read_manifest(settings.data_dir)
    todo = closed_partitions(manifest, cutoff_us)
    todo.sort(key=lambda td: (td[1], td[0] != "deletes"))
    done = [r for t, d in todo if (r := compact_partition(settings, t, d)) is not None]
    remove_expired(settings)
    return done


def default_cutoff(settings: Settings) -> int:
    """Event-time cutoff: the newest stored time_us (else now) minus compact_after_s."""
    newest = read_manifest(settings.data_dir).last_batch.get("max_time_us")
    now_us = time.time_ns() // 1000
    reference = min(int(newest), now_us) if newest else now_us
    return reference - int(settings.compact_after_s * 1_000_000)


# --- command line ---------------------------------------------------------------------------------

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _day_arg(text: str) -> str:
    try:
        if not _DAY.fullmatch(text):
            raise ValueError
        date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--day", type=_day_arg, help="compact this day (YYYY-MM-DD); default: every closed day"
    )
    parser.add_argument(
        "--table", choices=layout.TABLES, help="compact only this table; default: all"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompact partitions that hold only compacted files (e.g. after changing settings)",
    )
    parser.add_argument(
        "--data-dir", dest="set_data_dir", help="root of the Parquet datasets (APPLIANCE_DATA_DIR)"
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    setup_logging(settings.log_level, settings.log_format)
    tables = [args.table] if args.table else list(layout.TABLES)
    tables.sort(key=lambda t: t != "deletes")
    results: list[Any] = []
    if args.day:
        for table in tables:
            r = compact_partition(settings, table, args.day, force=args.force)
            if r is not None:
                results.append(r)
        remove_expired(settings)
    else:
        manifest = read_manifest(settings.data_dir)
        cutoff = default_cutoff(settings)
        for table in tables:
            days = sorted({_day_of_path(p) for p in manifest.table_files(table)})
            for day in days:
                if day_end_us(day) <= cutoff:
                    r = compact_partition(settings, table, day, force=args.force)
                    if r is not None:
                        results.append(r)
        remove_expired(settings)
    log.info("compaction finished", extra={"partitions": len(results)})
    return 0
