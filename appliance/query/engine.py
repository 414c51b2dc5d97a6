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

Visibility (invariant 4 in docs/architecture.md) is applied on every query, by the rule in
`store.visibility`: each worker keeps its in-memory index of the rows that can hide a version
(post deletes and post updates) as sorted arrays of (hash(uri), greatest rev), loaded once per
live file (`query.index`). Candidate rows of a page are checked against it in microseconds;
the walk fetches more candidates when some are hidden. A second index holds the latest handle
of each DID (from identities, the firehose's identity events); `identity.directory` merges it
with the identity store the background worker fills, for the handles shown in results and for
author=/mention= given as a handle (resolved at query time when neither knows it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import msgspec
import numpy as np

from appliance import metrics
from appliance.config import Settings
from appliance.identity.directory import Directory, HandleLookup
from appliance.query import postings
from appliance.query.cursor import CursorCodec
from appliance.query.exact import ExactWindow, window_groups
from appliance.query.files import LiveFiles
from appliance.query.guard import LRU, Guard
from appliance.query.index import PerFileIndex, load_handles, load_hiding, merge_handles
from appliance.query.model import (
    Busy,
    Filters,
    InvalidQuery,
    Position,
    Post,
    SearchResult,
)
from appliance.query.narrow import Narrowed, Narrowing
from appliance.query.planner import (
    WindowPlanner,
    next_target,
    walk_bounds,
    worth_narrowing,
)
from appliance.query.rows import RowReader
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

log = logging.getLogger("appliance.query")
T = TypeVar("T")

FIRST_WINDOW_ROWS = 16_384  # rows the first time window of a walk aims to cover
MIN_FIRST_WINDOW_ROWS = 256  # ... at least, when the page needs fewer
WINDOW_GROWTH = 4
# Consult the token indexes only when, at the hit rate of the first window, the rest of the page
# would need more rows than this (a common word's page or export is then only a few windows away,
# and the lookup would cost more than it saves).
NARROW_ROWS = 65_536
# A walk that has read this many rows (estimated) and still needs more is a long scan: it goes
# on only holding the worker's long-scan lane, so at most `query_long_scans` of them run at once
# and short searches keep the other query threads (and the cores) meanwhile.
LONG_SCAN_ROWS = 2_000_000


@dataclass(frozen=True)
class _WindowQuery:
    """What the candidate query of one window is built from."""

    files: list[str]
    clauses: list[str]
    params: dict[str, Any]
    lo: int
    hi: int
    latest: bool
    restrict: dict[str, list[tuple[int, int]]]
    exact: dict[str, np.ndarray]  # files read row by row: their candidate rows


def first_window(need: int, density: float | None) -> float:
    """Rows the first window of a walk covers: FIRST_WINDOW_ROWS, or fewer when at most
    `density` of the rows match and so fewer hold the page (with half again to spare)."""
    if density is None or density <= 0:
        return float(FIRST_WINDOW_ROWS)
    return float(min(FIRST_WINDOW_ROWS, max(MIN_FIRST_WINDOW_ROWS, need / density * 1.5)))


class _Lane:
    """A walk's hold on the worker's long-scan lane: taken once, when the walk turns long."""

    def __init__(self, lane: threading.BoundedSemaphore, wait_s: float) -> None:
        self._lane = lane
        self._wait_s = wait_s
        self.held = False

    def enter(self) -> None:
        if self.held:
            return
        if not self._lane.acquire(timeout=self._wait_s):
            metrics.api_long_scans.labels("refused").inc()
            raise Busy(f"other long scans kept the lane for {self._wait_s:g} s")
        metrics.api_long_scans.labels("run").inc()
        self.held = True

    def leave(self) -> None:
        if self.held:
            self.held = False
            self._lane.release()


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
        self.files = LiveFiles(self.data_dir)
        self.rows = RowReader()
        self.postings = postings.Postings()
        self.narrowing = Narrowing(self.files, self.rows, self.postings)
        self._kept_for = -1  # the data version whose files the row and postings caches keep
        self._cache = LRU(settings.cache_entries)
        self._long_lane = threading.BoundedSemaphore(settings.query_long_scans)
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
        """The live files, re-reading the manifest only when it changed."""
        snap = self.files.snapshot()
        if snap.version != self._kept_for:  # forget what was kept for retired files
            live = set(snap.files("posts"))
            self.rows.forget(live)
            self.postings.forget({str(textindex.sidecar_path(p)) for p in live})
            self._kept_for = snap.version
        return snap

    def _segments(self, path: str, day: str) -> list[Segment]:
        return self.files.segments(path, day)

    # --- running queries -----------------------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._db_lock:
            return self._db.cursor()

    def run(self, fn: Callable[[duckdb.DuckDBPyConnection], T], timeout: float | None = None) -> T:
        """Run fn with a fresh cursor; interrupt it after the timeout and raise QueryTimeout."""
        cur = self._cursor()
        try:
            with Guard(cur, self.settings.query_timeout_s if timeout is None else timeout):
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
                    self.files.segments(path, day)
                    self.files.has_index(path)
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
        # an export that has started streaming waits for the long-scan lane rather than end cut
        walk = self._walk(
            cur, snap, filters, None, need=max_rows, lane_wait_s=self.settings.query_timeout_s
        )
        try:
            while True:
                batch = self._step(cur, walk)
                if batch is None:
                    return
                posts = [row_to_post(r) for r in batch]
                self._attach_handles(cur, snap, posts, batch)
                yield posts
        finally:
            walk.close()  # gives the long-scan lane back if the walk held it
            cur.close()

    def _step(
        self, cur: duckdb.DuckDBPyConnection, walk: Generator[list[tuple[Any, ...]], None, None]
    ) -> list[tuple[Any, ...]] | None:
        with Guard(cur, self.settings.query_timeout_s):
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
        lane_wait_s: float | None = None,
    ) -> Generator[list[tuple[Any, ...]], None, None]:
        """Yield batches of visible rows in sort order, `need` rows in all (fewer if no more).

        Past LONG_SCAN_ROWS the walk waits for the long-scan lane up to `lane_wait_s` (by
        default api_max_wait_s), then raises Busy."""
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
        lo_bound, hi_bound = walk_bounds(filters.since_us, filters.until_us, after, latest)
        first_day = layout.day_of(lo_bound) if lo_bound is not None else None
        last_day = layout.day_of(max(hi_bound - 1, 0)) if hi_bound is not None else None
        segments = self.files.posts_segments(snap, first_day, last_day, lo_bound, hi_bound)
        planner = WindowPlanner(segments, latest, lo_bound, hi_bound)
        remaining = need
        scanned, hits = 0.0, 0  # estimated rows read so far, candidate rows they held
        seen: set[str] = set()
        restrict: dict[str, list[tuple[int, int]]] = {}
        exact: dict[str, np.ndarray] = {}
        # The first window is walked as is (a common word fills the page there); if the page is
        # not full after it, the token indexes narrow the rest of the walk to candidate rows.
        narrow = self.settings.query_text_index and bool(
            filters.include or author or mention or filters.lang or filters.tags or filters.domain
        )
        density = (
            self.narrowing.density(cur, segments, filters, author, mention) if narrow else None
        )
        if not (narrow or filters.exclude or filters.url):
            density = 1.0  # every row matches but hidden ones
        target = first_window(need, density)
        if narrow and density is not None and density * FIRST_WINDOW_ROWS < need:
            # the row postings say the first window would not fill the page: skip it
            narrow = False
            narrowed = self._narrow(cur, segments, filters, author, mention)
            if narrowed is not None:
                segments, restrict, exact = narrowed
                planner = planner.rest(segments)
                target = float(FIRST_WINDOW_ROWS)
        wait = self.settings.api_max_wait_s if lane_wait_s is None else lane_wait_s
        lane = _Lane(self._long_lane, wait)
        try:
            while remaining > 0 and (window := planner.next(target)) is not None:
                if scanned >= LONG_SCAN_ROWS:
                    lane.enter()
                lo, hi, files, rows_in_window = window
                query = _WindowQuery(files, clauses, params, lo, hi, latest, restrict, exact)
                found, delivered = yield from self._walk_window(
                    cur, snap, query, after, remaining, seen
                )
                hits += found
                remaining -= delivered
                scanned += rows_in_window
                target = next_target(
                    target,
                    remaining,
                    scanned,
                    hits,
                    first_rows=FIRST_WINDOW_ROWS,
                    growth=WINDOW_GROWTH,
                )
                if narrow and worth_narrowing(remaining, scanned, hits, narrow_rows=NARROW_ROWS):
                    narrow = False
                    narrowed = self._narrow(cur, segments, filters, author, mention)
                    if narrowed is not None:
                        segments, restrict, exact = narrowed
                        planner = planner.rest(segments)
        finally:
            lane.leave()

    def _walk_window(
        self,
        cur: duckdb.DuckDBPyConnection,
        snap: Snapshot,
        query: _WindowQuery,
        after: Position | None,
        remaining: int,
        seen: set[str],
    ) -> Generator[list[tuple[Any, ...]], None, tuple[int, int]]:
        """Yield batches of a window's visible rows not `seen` yet, `remaining` at most; return
        (candidate rows read, rows yielded)."""
        hits, delivered = 0, 0
        position = after
        while remaining > 0:
            fetch = remaining + max(8, remaining // 8)
            rows = self._candidates(cur, query, position, fetch)
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
            delivered += len(batch)
            if batch:
                yield batch
            if len(rows) < fetch:
                break  # this window is exhausted
            position = Position(rows[-1][TIME_US], rows[-1][URI])
        return hits, delivered

    def _candidates(
        self,
        cur: duckdb.DuckDBPyConnection,
        query: _WindowQuery,
        after: Position | None,
        fetch: int,
    ) -> list[tuple[Any, ...]]:
        """The first `fetch` rows of a window passing the filters, in walk order.

        Files in `query.restrict` are read only within the time ranges of their candidate row
        groups (from their token index): DuckDB skips the other row groups by their statistics.
        """
        q = query
        scanned = [f for f in q.files if f not in q.exact]
        built = candidates_sql(
            scanned, q.clauses, q.params, q.lo, q.hi, after, q.latest, fetch, q.restrict
        )
        rows = cur.execute(*built).fetchall() if built is not None else []
        if len(scanned) == len(q.files):
            return rows
        groups = window_groups(
            q.exact, q.files, self.files.row_groups, self.rows, q.lo, q.hi, after, q.latest
        )
        if not groups:
            return rows
        window = ExactWindow(cur, self.rows, q.clauses, q.params, q.latest)
        read = window.first(groups, q.lo, q.hi, after, fetch)
        metrics.api_rows_read.inc(window.rows_read)
        if not rows:
            return read
        both = sorted([*rows, *read], key=lambda r: (r[TIME_US], r[URI]), reverse=q.latest)
        return both[:fetch]

    def _narrow(
        self,
        cur: duckdb.DuckDBPyConnection,
        segments: list[Segment],
        filters: Filters,
        author: str | None,
        mention: str | None,
    ) -> Narrowed | None:
        return self.narrowing.narrow(cur, segments, filters, author, mention)

    def _visible(
        self, cur: duckdb.DuckDBPyConnection, snap: Snapshot, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """The candidate rows no newer version or delete hides, in their order."""
        index = self._hidden.current(cur, snap)
        keep = index.visible([r[URI_HASH] for r in rows], [r[REV] for r in rows])
        visible = [row for row, ok in zip(rows, keep, strict=True) if ok]
        metrics.api_hidden_rows.inc(len(rows) - len(visible))
        return visible
