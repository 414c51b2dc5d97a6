"""Writing a batch: dedupe against stored rows, one file per (table, day), the manifest.

Files are named by the batch's stream range, so a batch redone after a crash overwrites its
own files; each is written atomically (store.writer) and made live in one manifest update.
`write_file` and `publish` are also how the tests' fixtures write data, so the query and API
tests read files exactly as the batcher writes them.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from redis.exceptions import RedisError

from appliance import metrics
from appliance.batch.transform import Batch
from appliance.config import Settings
from appliance.store import layout
from appliance.store.crash import crash_point
from appliance.store.manifest import Manifest, read_manifest, update_manifest
from appliance.store.writer import AtomicParquetWriter

ROW_GROUP_ROWS = 131_072  # batch files: row groups small enough to skip by time_us statistics
WRITE_THREADS = 2  # Parquet files written at once (the VM has 2 cores)


# --- deduplication against stored rows ---------------------------------------------------------


class StoredKeys:
    """Natural keys of live files near a time window, read from their key columns.

    Row-group time_us statistics are cached per file (keyed by path, size and mtime), so a
    batch reads only the row groups that overlap its window.
    """

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[int, int, list[tuple[int, int, int]]]] = {}

    def _row_groups(self, path: Path) -> list[tuple[int, int, int]]:
        st = path.stat()
        cached = self._ranges.get(str(path))
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        md = pq.ParquetFile(path).metadata
        col = md.schema.to_arrow_schema().get_field_index("time_us")
        out = []
        for i in range(md.num_row_groups):
            stats = md.row_group(i).column(col).statistics
            if stats is not None and stats.has_min_max:
                out.append((i, int(stats.min), int(stats.max)))
            else:
                out.append((i, -(2**63), 2**63 - 1))
        self._ranges[str(path)] = (st.st_size, st.st_mtime_ns, out)
        return out

    def keys(
        self,
        data_dir: Path,
        manifest: Manifest,
        table: str,
        lo: int,
        hi: int,
        exclude: str,
    ) -> pa.Array | None:
        """Keys of stored rows of `table` with lo <= time_us <= hi, skipping files named `exclude`."""
        days = {layout.day_of(lo), layout.day_of(hi)}
        days.update(layout.day_of(t) for t in range(lo, hi, layout.DAY_US))
        pieces = []
        columns = [*layout.KEY_COLUMNS[table], "time_us"]
        for rel in manifest.table_files(table, sorted(days)):
            path = data_dir / rel
            if path.stem == exclude:
                continue  # our own earlier attempt at this batch: about to be overwritten
            groups = [i for i, a, b in self._row_groups(path) if a <= hi and b >= lo]
            if not groups:
                continue
            part = pq.ParquetFile(path).read_row_groups(groups, columns=columns)
            t = part["time_us"]
            part = part.filter(pc.and_(pc.greater_equal(t, lo), pc.less_equal(t, hi)))
            if part.num_rows:
                pieces.append(layout.key_array(table, part))
        if not pieces:
            return None
        return pa.chunked_array([c for p in pieces for c in p.chunks]).combine_chunks()

    def forget(self, path: Path) -> None:
        self._ranges.pop(str(path), None)


def drop_stored_duplicates(
    table: str,
    data: pa.Table,
    stored: StoredKeys,
    data_dir: Path,
    manifest: Manifest,
    margin_us: int,
    exclude: str,
) -> pa.Table:
    """`data` without the rows whose natural key a live file already holds."""
    times = data["time_us"]
    lo = pc.min(times).as_py() - margin_us
    hi = pc.max(times).as_py() + margin_us
    keys = stored.keys(data_dir, manifest, table, lo, hi, exclude)
    if keys is None:
        return data
    seen = pc.is_in(layout.key_array(table, data), value_set=keys)
    dropped = pc.sum(seen).as_py() or 0
    if not dropped:
        return data
    metrics.batch_duplicates.labels("stored").inc(dropped)
    return data.filter(pc.invert(seen))


def split_days(data: pa.Table) -> dict[str, pa.Table]:
    """The rows of `data` per UTC day of time_us."""
    day_numbers = pc.divide(data["time_us"], layout.DAY_US)
    lo, hi = pc.min(day_numbers).as_py(), pc.max(day_numbers).as_py()
    if lo == hi:
        return {layout.day_of(lo * layout.DAY_US): data}
    return {
        layout.day_of(d * layout.DAY_US): data.filter(pc.equal(day_numbers, d))
        for d in pc.unique(day_numbers).to_pylist()
    }


# --- writing -------------------------------------------------------------------------------------


@dataclass
class Written:
    """What a batch wrote: relative paths with row counts and bytes, per table."""

    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def add(self, table: str, relative: str, rows: int, path: Path) -> None:
        self.files.setdefault(table, []).append(relative)
        self.rows[table] = self.rows.get(table, 0) + rows
        self.bytes[table] = self.bytes.get(table, 0) + path.stat().st_size


def write_file(
    data_dir: Path,
    table: str,
    day: str,
    name: str,
    part: pa.Table,
    zstd_level: int,
    after_first_group: Callable[[AtomicParquetWriter], None] | None = None,
) -> Path:
    """One batch file: `part` (rows of one table and day) as <table>/date=<day>/<name>.parquet,
    in row groups of ROW_GROUP_ROWS, atomically (store.writer). Returns its path."""
    directory = layout.partition_dir(data_dir, table, day)
    schema = layout.SCHEMAS[table]
    with AtomicParquetWriter(directory, name, schema, zstd_level=zstd_level) as out:
        for offset in range(0, part.num_rows, ROW_GROUP_ROWS):
            out.write(part.slice(offset, ROW_GROUP_ROWS))
            if offset == 0 and after_first_group is not None:
                after_first_group(out)
    return out.final


def publish(data_dir: Path, files: dict[str, list[str]], last_batch: dict[str, Any]) -> None:
    """Add written files (relative paths per table) to the manifest with `last_batch`."""
    with update_manifest(data_dir) as m:
        for table, paths in files.items():
            m.files.setdefault(table, []).extend(paths)
        if m.retired:  # a redone batch may rewrite a file compaction retired
            added = {p for paths in files.values() for p in paths}
            m.retired = [(p, t) for p, t in m.retired if p not in added]
        m.last_batch = last_batch


def _jobs(
    settings: Settings, batch: Batch, stored: StoredKeys, manifest: Manifest
) -> list[tuple[str, str, pa.Table]]:
    """(table, day, rows) to write: the batch's tables without stored duplicates, per day,
    largest first so that the writer threads finish together."""
    margin_us = int(settings.batch_dedupe_margin_s * 1_000_000)
    data_dir = Path(settings.data_dir)
    jobs: list[tuple[str, str, pa.Table]] = []
    for table, data in batch.tables().items():
        data = drop_stored_duplicates(
            table, data, stored, data_dir, manifest, margin_us, batch.name
        )
        if data.num_rows:
            jobs.extend((table, day, part) for day, part in split_days(data).items())
    jobs.sort(key=lambda job: -job[2].num_rows)
    return jobs


def _last_batch(batch: Batch, written: Written) -> dict[str, Any]:
    """What the manifest says about the last batch (shown by /v1/stats)."""
    return {
        "time": time.time(),
        "events": batch.frames,
        "rows": written.rows,
        "bytes": written.total_bytes,
        "raw_bytes": batch.raw_bytes,
        "stream": [batch.first_id, batch.last_id],
        "entries": len(batch.ok),
        "max_time_us": max(
            (pc.max(t["time_us"]).as_py() for t in batch.tables().values()), default=None
        ),
    }


def write_batch(settings: Settings, batch: Batch, stored: StoredKeys) -> Written:
    """Write the batch's files and add them to the manifest (steps up to, not including, XACK).

    On any error the files this attempt renamed are removed again (none is in the manifest
    yet), so a failed batch leaves nothing behind; the caller retries or abandons it.
    """
    data_dir = Path(settings.data_dir)
    batch.tables()
    crash_point(settings, "before_write")
    written = Written()
    renamed: list[Path] = []
    lock = threading.Lock()

    def mid_write(out: AtomicParquetWriter) -> None:
        with lock:
            if renamed:
                out.flush()
                crash_point(settings, "mid_write")

    def write(table: str, day: str, part: pa.Table) -> tuple[int | None, str] | None:
        # Errors come back as values: re-raising an exception object from a worker thread in
        # this thread crashed CPython 3.11 here (a segfault in PyException_SetTraceback when two
        # writers failed at once on a full disk).
        try:
            stored.forget(layout.partition_dir(data_dir, table, day) / f"{batch.name}.parquet")
            level = settings.parquet_zstd_level
            final = write_file(data_dir, table, day, batch.name, part, level, mid_write)
        except Exception as exc:
            return getattr(exc, "errno", None), f"{type(exc).__name__}: {exc}"
        with lock:
            renamed.append(final)
            written.add(table, final.relative_to(data_dir).as_posix(), part.num_rows, final)
        return None

    try:
        jobs = _jobs(settings, batch, stored, read_manifest(data_dir))
        # Parquet encoding releases the GIL: WRITE_THREADS files are written at once.
        pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="parquet")
        try:
            errors = [f.result() for f in [pool.submit(write, *job) for job in jobs]]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for error in errors:
            if error is not None:
                code, message = error
                raise OSError(code, message) if code is not None else RuntimeError(message)
        written.paths = renamed
        crash_point(settings, "after_rename")
        if written.files or batch.ok:
            publish(data_dir, written.files, _last_batch(batch, written))
    except BaseException:
        # Remove what this attempt renamed, except files a previous attempt of the same batch
        # already made live (the manifest references them; they hold the same rows).
        live = {p for paths in read_manifest(data_dir).files.values() for p in paths}
        for path in renamed:
            if path.relative_to(data_dir).as_posix() not in live:
                path.unlink(missing_ok=True)
        raise
    crash_point(settings, "after_manifest")
    return written


def failure_cause(exc: BaseException) -> str:
    """A metric label for why a batch attempt failed."""
    if isinstance(exc, RedisError):
        return "redis"
    code = getattr(exc, "errno", None)
    text = str(exc)  # pyarrow's I/O errors carry the errno only in their message
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text:
        return "disk_full"
    if (
        code in (errno.EACCES, errno.EPERM, errno.EROFS)
        or "Permission denied" in text
        or "Read-only file system" in text
    ):
        return "unwritable"
    return "io" if isinstance(exc, OSError | pa.ArrowException) else "error"
