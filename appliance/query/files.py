"""The live files a query reads: the manifest's files by table and day, re-read only when the
manifest changes, and what is read once per file (row-group time ranges, token-index validity).

A live file never changes (a redone batch rewrites the same rows under the same name), so what
is learnt about a file is kept until the file leaves the manifest.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from appliance import metrics
from appliance.query.snapshot import Segment, Snapshot
from appliance.store import layout, textindex
from appliance.store.manifest import MANIFEST, read_manifest

log = logging.getLogger("appliance.query")


class LiveFiles:
    """The store's live files for one engine, with per-file facts cached."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._manifest_stat: tuple[int, int, int] | None = None
        self._row_groups: dict[str, list[Segment]] = {}
        self._indexed: dict[str, bool] = {}  # posts file -> has a valid token index

    def snapshot(self) -> Snapshot:
        """The live files, re-reading the manifest only when its inode, mtime or size changed."""
        path = self.data_dir / MANIFEST
        try:
            st = path.stat()
            stat_key: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stat_key = None
        with self._lock:
            if self._snapshot is None or stat_key != self._manifest_stat:
                manifest = read_manifest(self.data_dir)
                days: dict[str, dict[str, list[str]]] = {}
                for table, paths in manifest.files.items():
                    for rel in paths:
                        parts = rel.split("/")
                        if len(parts) < 3 or not parts[1].startswith("date=") or ".." in parts:
                            continue  # not a partition file; the manifest is ours, but be strict
                        day = parts[1].removeprefix("date=")
                        days.setdefault(table, {}).setdefault(day, []).append(
                            str(self.data_dir / rel)
                        )
                self._snapshot = Snapshot(manifest, days)
                self._manifest_stat = stat_key
                live = {p for by_day in days.values() for paths in by_day.values() for p in paths}
                self._row_groups = {p: s for p, s in self._row_groups.items() if p in live}
                self._indexed = {p: ok for p, ok in self._indexed.items() if p in live}
            return self._snapshot

    def segments(self, path: str, day: str) -> list[Segment]:
        """The row groups of a file with their time_us ranges, read once per file."""
        cached = self._row_groups.get(path)
        if cached is not None:
            return cached
        try:
            meta = pq.read_metadata(path)
        except FileNotFoundError:
            return []  # retired by a compaction after our snapshot; its rows live in the new file
        day_start = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1_000_000
        column = meta.schema.names.index("time_us")
        segments = []
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            stats = group.column(column).statistics
            if stats is not None and stats.has_min_max:
                lo, hi = int(stats.min), int(stats.max)
            else:  # no statistics: assume the whole partition day
                lo, hi = day_start, day_start + layout.DAY_US - 1
            segments.append(Segment(path, lo, hi, group.num_rows))
        self._row_groups[path] = segments
        return segments

    def row_groups(self, path: str) -> list[Segment]:
        """Every row group of a file whose segments were read (else none), by row-group number."""
        return self._row_groups.get(path, [])

    def posts_segments(
        self,
        snap: Snapshot,
        first_day: str | None,
        last_day: str | None,
        lo: int | None,
        hi: int | None,
    ) -> list[Segment]:
        """The row groups of the posts files that may hold a time in [lo, hi)."""
        out = []
        for day, paths in snap.days.get("posts", {}).items():
            if (first_day is not None and day < first_day) or (
                last_day is not None and day > last_day
            ):
                continue
            for path in paths:
                for seg in self.segments(path, day):
                    if (lo is None or seg.max_t >= lo) and (hi is None or seg.min_t < hi):
                        out.append(seg)
        return out

    def has_index(self, path: str) -> bool:
        """Whether a posts file has a valid token index (checked once per file)."""
        known = self._indexed.get(path)
        if known is not None:
            return known
        sidecar = textindex.sidecar_path(path)
        try:
            ok = textindex.valid_for(sidecar, path)
        except OSError:
            ok = False
            if Path(path).name.startswith(layout.COMPACTED_PREFIX):
                metrics.api_text_index.labels("missing").inc()
                log.warning("token index missing; the file is scanned", extra={"file": path})
        else:
            if not ok:
                metrics.api_text_index.labels("invalid").inc()
                log.warning("token index invalid; the file is scanned", extra={"file": path})
        self._indexed[path] = ok
        return ok
