"""The query engine: DuckDB over the live Parquet files named by the manifest.

One engine per API worker process. It owns one locked-down DuckDB database (external access
limited to the data root, a memory limit, a thread count) and hands each request its own cursor,
because a DuckDB connection is not thread-safe. A timer interrupts the cursor of a request that
runs past `query_timeout_s`; the request then fails with `QueryTimeout` (HTTP 504).

Plans read no more than they must. Posts files are sorted by time_us within a day (the compactor
sorts; a batch covers a few minutes), so the engine walks *time windows* placed with the
row-group statistics of the files, newest first for `sort=latest` (oldest first for `oldest`):
the first holds about 16k rows, each next one four times more, and the walk stops once it holds
the rows a page needs. DuckDB skips the row groups outside a window by their statistics and
applies the time bounds inside the scan, so the first page of a common word matches text in a
few thousand rows, date filters prune whole days, and only a word that is rare scans everything.

Visibility (DESIGN invariant 4) is applied on every query, by the rule in `store.visibility`:
each worker keeps its in-memory index of the rows that can hide a version (post deletes and
post updates) as sorted arrays of (hash(uri), greatest rev), loaded once per live file
(`query.index`). Candidate rows of a page are checked against it in microseconds; the walk
fetches more candidates when some are hidden. A second index holds the latest handle of each
DID (from identities, the firehose's identity events); `identity.directory` merges it with the
identity store the background worker fills, for the handles shown in results and for
author=/mention= given as a handle (resolved at query time when neither knows it).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import msgspec
import numpy as np
import pyarrow.parquet as pq

from appliance import metrics
from appliance.config import Settings
from appliance.identity.directory import Directory, HandleLookup
from appliance.query.cursor import CursorCodec
from appliance.query.index import PerFileIndex, load_handles, load_hiding, merge_handles
from appliance.query.model import (
    Filters,
    InvalidQuery,
    Position,
    Post,
    QueryTimeout,
    SearchResult,
)
from appliance.query.planner import WindowPlanner, next_target
from appliance.query.snapshot import Segment, Snapshot
from appliance.query.sql import (
    DID_HASH,
    REV,
    TIME_US,
    URI,
    URI_HASH,
    candidates_sql,
    filter_sql,
    row_to_post,
    utc,
)
from appliance.query.stats import stored_rows
from appliance.store import layout, textindex, visibility
from appliance.store.manifest import MANIFEST, read_manifest

log = logging.getLogger("appliance.query")
T = TypeVar("T")

FIRST_WINDOW_ROWS = 16_384  # rows the first time window of a walk aims to cover
WINDOW_GROWTH = 4
# A file's token index is used only when it rules out at least half of the file's row groups;
# a word that common fills a page from the first windows anyway.
INDEX_MAX_FRACTION = 0.5
# Consult the token indexes only when, at the hit rate of the first window, the rest of the page
# would need more rows than this (a common word's page or export is then only a few windows away,
# and the lookup would cost more than it saves).
NARROW_ROWS = 1_000_000


class _LRU:
    """A small thread-safe LRU map (the result cache); size 0 disables it."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class _Guard:
    """Interrupts a cursor's running query once `seconds` have passed.

    A query that finishes in the same instant the timer fires still counts as timed out, so a
    request never outlives its timeout by racing the interrupt.
    """

    def __init__(self, cur: duckdb.DuckDBPyConnection, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._cur = cur
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._cur.interrupt()

    def __enter__(self) -> _Guard:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self._timer.cancel()
        if self.fired or isinstance(exc, duckdb.InterruptException):
            metrics.api_query_timeouts.inc()
            raise QueryTimeout(f"query interrupted after {self.seconds:g} s") from exc


class QueryEngine:
    """Search, export and stats over the live Parquet files, for one API worker."""

    def __init__(self, settings: Settings, cursor_secret: bytes | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.codec = CursorCodec(cursor_secret or os.urandom(32))
        self._db = duckdb.connect(
            ":memory:",
            config={
                "threads": settings.duckdb_threads,
                "memory_limit": settings.duckdb_memory_limit,
            },
        )
        # Lock the database down before any user value can reach it: files only under the data
        # root, no other file system, network or extension access, settings frozen.
        self._db.execute("SET allowed_directories = $dirs", {"dirs": [str(self.data_dir) + "/"]})
        self._db.execute("SET enable_external_access = false")
        self._db.execute("SET parquet_metadata_cache = true")
        # Fetch only time_us, uri and text until the top rows of a window are known, also for
        # pages of 100 and deep pages (DuckDB's default stops at LIMIT 50).
        self._db.execute("SET late_materialization_max_rows = 2048")
        self._db.execute("SET lock_configuration = true")
        self._db_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._manifest_stat: tuple[int, int, int] | None = None
        self._row_groups: dict[str, list[Segment]] = {}
        self._indexed: dict[str, bool] = {}  # posts file -> has a valid token index
        self._cache = _LRU(settings.cache_entries)
        self._stats_cache: tuple[int, dict[str, Any]] | None = None
        self._hidden = PerFileIndex(
            tuple(visibility.hiders("posts")), load_hiding, visibility.HidingIndex.from_tables
        )
        self._handles = PerFileIndex(("identities",), load_handles, merge_handles)
        self.identity = Directory(settings)
        self.warmed = threading.Event()

    def close(self) -> None:
        self._db.close()

    # --- files ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The live files, re-reading the manifest only when its inode, mtime or size changed."""
        path = self.data_dir / MANIFEST
        try:
            st = path.stat()
            stat_key: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stat_key = None
        with self._snapshot_lock:
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

    def _segments(self, path: str, day: str) -> list[Segment]:
        """The row groups of a file with their time_us ranges, read once per file.

        A live file never changes (a redone batch rewrites the same rows under the same name).
        """
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

    # --- running queries -----------------------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._db_lock:
            return self._db.cursor()

    def run(self, fn: Callable[[duckdb.DuckDBPyConnection], T], timeout: float | None = None) -> T:
        """Run fn with a fresh cursor; interrupt it after the timeout and raise QueryTimeout."""
        cur = self._cursor()
        try:
            with _Guard(cur, self.settings.query_timeout_s if timeout is None else timeout):
                return fn(cur)
        finally:
            cur.close()

    def warm(self) -> None:
        """Load what the first query would: file statistics, the visibility and handle indexes."""
        snap = self.snapshot()
        cur = self._cursor()
        try:
            self._hidden.current(cur, snap)
            self._handles.current(cur, snap)
            for day, paths in snap.days.get("posts", {}).items():
                for path in paths:
                    self._segments(path, day)
                    self._has_index(path)
        finally:
            cur.close()
            self.warmed.set()

    # --- search --------------------------------------------------------------------------------

    def search(
        self,
        filters: Filters,
        *,
        limit: int,
        page: int | None = None,
        cursor: str | None = None,
    ) -> SearchResult:
        """One page of visible posts, by page number (1-based) or by an opaque cursor."""
        snap = self.snapshot()
        resolved = self.with_dids(snap, filters)
        if resolved is None:  # author= or mention= names no one we can find: nothing to show
            return SearchResult([], False, False, max(page or 1, 1), None, snap.version)
        filters = resolved
        cap = self.settings.result_limit_max if self.settings.result_limit else None
        if cursor is not None:
            after, delivered = self.codec.decode(cursor, filters)
            if cap is not None and delivered >= cap:  # issued before the flag was switched on
                return SearchResult([], False, True, delivered // limit + 1, None, snap.version)
        else:
            after, delivered = None, (max(page or 1, 1) - 1) * limit
            if cap is not None and delivered >= cap:
                raise InvalidQuery(
                    "page",
                    f"page {page} starts past the {cap}-result limit; "
                    f"at most {-(-cap // limit)} pages of {limit}",
                )
        key = (filters, limit, page, cursor, snap.version)
        cached = self._cache.get(key)
        if cached is not None:
            metrics.api_cache.labels("hit").inc()
            # Handles change without the data changing (the identity worker resolves them
            # meanwhile): a cached page gets its authors' handles anew.
            return self._rehandled(snap, *cached)
        metrics.api_cache.labels("miss").inc()
        end = delivered + limit if cap is None else min(delivered + limit, cap)
        skip = 0 if after is not None else delivered

        def work(cur: duckdb.DuckDBPyConnection) -> tuple[SearchResult, np.ndarray]:
            began = time.perf_counter()
            rows: list[tuple[Any, ...]] = []
            for batch in self._walk(cur, snap, filters, after, need=end - delivered + skip + 1):
                rows.extend(batch)
            more = len(rows) > end - delivered + skip
            page_rows = rows[skip : skip + end - delivered]
            posts = [row_to_post(r) for r in page_rows]
            hashes = self._attach_handles(cur, snap, posts, page_rows)
            capped = more and cap is not None and end >= cap
            has_more = more and not capped
            token = None
            if has_more and page_rows:
                last = page_rows[-1]
                token = self.codec.encode(filters, Position(last[TIME_US], last[URI]), end)
            metrics.api_query_seconds.labels("search").observe(time.perf_counter() - began)
            result = SearchResult(
                posts=posts,
                has_more=has_more,
                capped=capped,
                page=delivered // limit + 1,
                cursor=token,
                data_version=snap.version,
            )
            return result, hashes

        try:
            result, hashes = self.run(work)
        except duckdb.IOException:
            # A file of our snapshot was removed (a compaction's grace period ended while we
            # held an old manifest): once the manifest has moved on, one retry on the new one.
            if self.snapshot().version == snap.version:
                raise
            return self.search(filters, limit=limit, page=page, cursor=cursor)
        self._cache.put(key, (result, hashes))
        return result

    def export(self, filters: Filters, max_rows: int) -> Generator[list[Post], None, None]:
        """Visible posts in search order, at most max_rows, in batches as the walk finds them.

        Each step runs under its own timeout; the caller runs the iterator in a thread.
        """
        snap = self.snapshot()
        resolved = self.with_dids(snap, filters)
        if resolved is None:
            return
        filters = resolved
        cur = self._cursor()
        try:
            walk = self._walk(cur, snap, filters, None, need=max_rows)
            while True:
                batch = self._step(cur, walk)
                if batch is None:
                    return
                posts = [row_to_post(r) for r in batch]
                self._attach_handles(cur, snap, posts, batch)
                yield posts
        finally:
            cur.close()

    def _step(
        self, cur: duckdb.DuckDBPyConnection, walk: Iterator[list[tuple[Any, ...]]]
    ) -> list[tuple[Any, ...]] | None:
        with _Guard(cur, self.settings.query_timeout_s):
            return next(walk, None)

    # --- stats and probes ----------------------------------------------------------------------

    def ping(self) -> int:
        """The data version, once DuckDB has answered a trivial query (for /ready)."""
        snap = self.snapshot()
        self.run(lambda cur: cur.execute("SELECT 1").fetchone(), timeout=5.0)
        return snap.version

    def stats(self) -> dict[str, Any]:
        """Rows per day and table (from Parquet metadata), per collection, and freshness."""
        snap = self.snapshot()
        cached = self._stats_cache
        if cached is None or cached[0] != snap.version:
            cached = (snap.version, self.run(lambda cur: stored_rows(cur, snap, self._segments)))
            self._stats_cache = cached
        body = dict(cached[1])
        newest = body.pop("newest_time_us")
        last = snap.manifest.last_batch
        batch_time = last.get("time")
        body.update(
            newest_event_at=utc(newest) if newest is not None else None,
            ingest_lag_s=round(time.time() - newest / 1e6, 3) if newest is not None else None,
            last_batch_at=(
                datetime.fromtimestamp(batch_time, tz=UTC)
                if isinstance(batch_time, int | float)
                else None
            ),
            last_batch_events=last.get("events") if isinstance(last.get("events"), int) else None,
            identity=self.identity.summary(),
        )
        return body

    # --- the walk ------------------------------------------------------------------------------

    def resolve(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot, who: str) -> str | None:
        """A DID for an author/mention value: a DID as is, a handle through `_lookup`."""
        if who.startswith("did:"):
            return who
        return self._lookup(cur, snap, who).did

    def _lookup(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot, handle: str) -> HandleLookup:
        claim = self._handles.current(cur, snap).claim_of(handle.lower())
        return self.identity.did_of(handle, claim)

    def lookup_handle(self, handle: str, snap: Snapshot | None = None) -> HandleLookup:
        """The DID a handle names (firehose identity events, the identity store, or a live
        resolution within identity_query_timeout_s), and where the answer came from."""
        snap = snap or self.snapshot()
        return self.run(lambda cur: self._lookup(cur, snap, handle))

    def with_dids(self, snap: Snapshot, filters: Filters) -> Filters | None:
        """The filters with author=/mention= handles replaced by their DIDs (so the cache and
        cursors key on the DID); None if a handle names no one that can be found."""
        changes = {}
        for name in ("author", "mention"):
            value = getattr(filters, name)
            if value is None or value.startswith("did:"):
                continue
            found = self.lookup_handle(value, snap)
            if found.did is None:
                return None
            changes[name] = found.did
        return msgspec.structs.replace(filters, **changes) if changes else filters

    def _attach_handles(
        self,
        cur: duckdb.DuckDBPyConnection,
        snap: Snapshot,
        posts: list[Post],
        rows: list[tuple[Any, ...]],
    ) -> np.ndarray:
        """Set each post's handle; returns the hash(did) of each row (to refresh them later)."""
        hashes = np.array([r[DID_HASH] for r in rows], dtype=np.uint64)
        if posts:
            index = self._handles.current(cur, snap)
            shown = self.identity.handles_of([p.did for p in posts], index.latest_of(hashes))
            for post, handle in zip(posts, shown, strict=True):
                post.handle = handle
        return hashes

    def _rehandled(self, snap: Snapshot, cached: SearchResult, hashes: np.ndarray) -> SearchResult:
        """A copy of a cached page with its authors' current handles."""
        if not cached.posts:
            return cached
        cur = self._cursor()
        try:
            index = self._handles.current(cur, snap)
        finally:
            cur.close()
        dids = [p.did for p in cached.posts]
        shown = self.identity.handles_of(dids, index.latest_of(hashes))
        posts = [
            msgspec.structs.replace(post, handle=handle)
            for post, handle in zip(cached.posts, shown, strict=True)
        ]
        return dataclasses.replace(cached, posts=posts)

    def _walk(
        self,
        cur: duckdb.DuckDBPyConnection,
        snap: Snapshot,
        filters: Filters,
        after: Position | None,
        need: int,
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Yield batches of visible rows in sort order, `need` rows in all (fewer if no more)."""
        author = mention = None
        if filters.author is not None:
            author = self.resolve(cur, snap, filters.author)
            if author is None:
                return
        if filters.mention is not None:
            mention = self.resolve(cur, snap, filters.mention)
            if mention is None:
                return
        clauses, params = filter_sql(filters, author, mention)
        latest = filters.sort == "latest"
        lo_bound = filters.since_us
        hi_bound = filters.until_us  # exclusive
        if after is not None:
            if latest:
                hi_bound = (
                    after.time_us + 1 if hi_bound is None else min(hi_bound, after.time_us + 1)
                )
            else:
                lo_bound = after.time_us if lo_bound is None else max(lo_bound, after.time_us)
        first_day = layout.day_of(lo_bound) if lo_bound is not None else None
        last_day = layout.day_of(max(hi_bound - 1, 0)) if hi_bound is not None else None
        segments = self._segments_in(snap, first_day, last_day, lo_bound, hi_bound)
        planner = WindowPlanner(segments, latest, lo_bound, hi_bound)
        remaining, target = need, float(FIRST_WINDOW_ROWS)
        scanned, hits = 0.0, 0  # estimated rows read so far, candidate rows they held
        seen: set[str] = set()
        # The first window is walked as is (a common word fills the page there); if the page is
        # not full after it, the token indexes narrow the rest of the walk to candidate groups.
        narrow = self.settings.query_text_index and (filters.include or author is not None)
        restrict: dict[str, list[tuple[int, int]]] = {}
        while remaining > 0 and (window := planner.next(target)) is not None:
            lo, hi, files, rows_in_window = window
            position = after
            while remaining > 0:
                fetch = remaining + max(8, remaining // 8)
                rows = self._candidates(
                    cur, files, clauses, params, lo, hi, position, latest, fetch, restrict
                )
                hits += len(rows)
                if not rows:
                    break
                visible = self._visible(cur, snap, rows)
                batch = []
                for row in visible:
                    if row[URI] in seen:
                        continue  # the same version stored twice
                    seen.add(row[URI])
                    batch.append(row)
                    if len(batch) == remaining:
                        break
                remaining -= len(batch)
                if batch:
                    yield batch
                if len(rows) < fetch:
                    break  # this window is exhausted
                position = Position(rows[-1][TIME_US], rows[-1][URI])
            scanned += rows_in_window
            target = next_target(
                target, remaining, scanned, hits, first_rows=FIRST_WINDOW_ROWS, growth=WINDOW_GROWTH
            )
            if narrow and remaining > 0 and (hits == 0 or remaining * scanned / hits > NARROW_ROWS):
                narrow = False
                narrowed = self._narrow(cur, segments, filters, author)
                if narrowed is not None:
                    segments, restrict = narrowed
                    if latest:
                        planner = WindowPlanner(segments, latest, planner.lo_edge, planner.edge)
                    else:
                        planner = WindowPlanner(segments, latest, planner.edge, planner.hi_edge)

    def _segments_in(
        self,
        snap: Snapshot,
        first_day: str | None,
        last_day: str | None,
        lo: int | None,
        hi: int | None,
    ) -> list[Segment]:
        out = []
        for day, paths in snap.days.get("posts", {}).items():
            if (first_day is not None and day < first_day) or (
                last_day is not None and day > last_day
            ):
                continue
            for path in paths:
                for seg in self._segments(path, day):
                    if (lo is None or seg.max_t >= lo) and (hi is None or seg.min_t < hi):
                        out.append(seg)
        return out

    def _candidates(
        self,
        cur: duckdb.DuckDBPyConnection,
        files: list[str],
        clauses: list[str],
        params: dict[str, Any],
        lo: int,
        hi: int,
        after: Position | None,
        latest: bool,
        fetch: int,
        restrict: dict[str, list[tuple[int, int]]] | None = None,
    ) -> list[tuple[Any, ...]]:
        """The first `fetch` rows of a window passing the filters, in walk order.

        Files in `restrict` are read only within the time ranges of their candidate row groups
        (from their token index): DuckDB skips the other row groups by their statistics.
        """
        query = candidates_sql(files, clauses, params, lo, hi, after, latest, fetch, restrict)
        if query is None:
            return []  # a window between candidate row groups
        sql, bound = query
        return cur.execute(sql, bound).fetchall()

    def _has_index(self, path: str) -> bool:
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

    def _narrow(
        self,
        cur: duckdb.DuckDBPyConnection,
        segments: list[Segment],
        filters: Filters,
        author: str | None,
    ) -> tuple[list[Segment], dict[str, list[tuple[int, int]]]] | None:
        """The segments left once token indexes rule row groups out, and per narrowed file the
        time ranges of its candidate row groups; None if no index applies.
        """
        pieces: list[str] = []
        for term in filters.include:
            pieces.extend(textindex.pieces(cur, term))
        pieces = list(dict.fromkeys(pieces))
        if not pieces and author is None:
            return None  # terms of emoji or punctuation only: nothing to look up
        by_file: dict[str, list[Segment]] = {}
        for seg in segments:
            by_file.setdefault(seg.path, []).append(seg)
        indexed = [p for p in by_file if self._has_index(p)]
        if not indexed:
            return None
        sidecars = {str(textindex.sidecar_path(p)): p for p in indexed}
        try:
            found = textindex.candidate_groups(cur, list(sidecars), pieces, author)
        except duckdb.InterruptException:
            raise
        except duckdb.Error:
            metrics.api_text_index.labels("error").inc()
            log.exception("token index lookup failed; scanning instead")
            return None
        if found is None:
            metrics.api_text_index.labels("not_selective").inc(len(indexed))
            return None
        groups = {sidecars[s]: g for s, g in found.items()}
        kept: list[Segment] = []
        restrict: dict[str, list[tuple[int, int]]] = {}
        for path, segs in by_file.items():
            candidates = groups.get(path)
            every = self._row_groups.get(path, [])
            if candidates is None or len(candidates) > INDEX_MAX_FRACTION * len(every):
                if candidates is not None:
                    metrics.api_text_index.labels("not_selective").inc()
                kept.extend(segs)
                continue
            metrics.api_text_index.labels("narrowed").inc()
            wanted = {id(s) for s in segs}
            ranges: list[tuple[int, int]] = []
            previous = -2
            for g in sorted(candidates):
                if g >= len(every) or id(every[g]) not in wanted:
                    continue
                seg = every[g]
                kept.append(seg)
                if g == previous + 1:  # adjacent row groups: one range
                    ranges[-1] = (ranges[-1][0], seg.max_t)
                else:
                    ranges.append((seg.min_t, seg.max_t))
                previous = g
            restrict[path] = ranges
        return kept, restrict

    def _visible(
        self, cur: duckdb.DuckDBPyConnection, snap: Snapshot, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """The candidate rows no newer version or delete hides, in their order."""
        index = self._hidden.current(cur, snap)
        keep = index.visible([r[URI_HASH] for r in rows], [r[REV] for r in rows])
        visible = [row for row, ok in zip(rows, keep, strict=True) if ok]
        metrics.api_hidden_rows.inc(len(rows) - len(visible))
        return visible
