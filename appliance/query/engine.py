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

Visibility (DESIGN invariant 4) is applied on every query: a post version is shown only if no
posts row of its uri has a greater rev and no delete row of its uri has a greater rev. Each worker
keeps a small in-memory index of the rows that can hide a version -- post deletes and post
updates (a create only follows a delete, which already hides the older version) -- as sorted
arrays of (hash(uri), greatest rev), loaded once per live file. Candidate rows of a page are
checked against it in microseconds; the walk fetches more candidates when some are hidden. A
second index holds the latest handle of each DID (from identities), for the handles shown in
results and for author=/mention= given as a handle.
"""

from __future__ import annotations

import base64
import bisect
import collections
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from appliance import metrics
from appliance.config import Settings
from appliance.store import layout, textindex, visibility
from appliance.store.manifest import MANIFEST, Manifest, read_manifest

log = logging.getLogger("appliance.query")
T = TypeVar("T")

FIRST_WINDOW_ROWS = 16_384  # rows the first time window of a walk aims to cover
WINDOW_GROWTH = 4
MAX_TERMS = 16
# A file's token index is used only when it rules out at least half of the file's row groups;
# a word that common fills a page from the first windows anyway.
INDEX_MAX_FRACTION = 0.5
# Consult the token indexes only when, at the hit rate of the first window, the rest of the page
# would need more rows than this (a common word's page or export is then only a few windows away,
# and the lookup would cost more than it saves).
NARROW_ROWS = 1_000_000
Sort = Literal["latest", "oldest"]


# --- errors ------------------------------------------------------------------------------------


class QueryError(Exception):
    """Base of the errors a query can end with."""


class InvalidQuery(QueryError):
    """A parameter is well-formed but unusable (e.g. a cursor from another query): HTTP 400."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


class QueryTimeout(QueryError):
    """The query ran past query_timeout_s and was interrupted: HTTP 504."""


# --- the query model ---------------------------------------------------------------------------


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    """A normalised search: what /v1/search and /v1/export filter on, with no paging."""

    include: tuple[str, ...] = ()  # substrings that must all occur in the text
    exclude: tuple[str, ...] = ()  # substrings that must not occur
    exact: bool = False  # case-sensitive matching
    author: str | None = None  # a DID, or a handle (lower case) resolved through identities
    mention: str | None = None  # likewise
    lang: str | None = None  # lower case; "en" also matches "en-US"
    tag: str | None = None  # lower case, without '#'
    domain: str | None = None  # lower-case host; subdomains match too
    since_us: int | None = None  # inclusive
    until_us: int | None = None  # exclusive
    sort: Sort = "latest"

    def fingerprint(self) -> bytes:
        """A stable digest of the filters: keys the cache and pins a cursor to its query."""
        return hashlib.sha256(msgspec.msgpack.encode(self)).digest()[:12]


def parse_q(q: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a search string into (must-contain, must-not-contain) substrings.

    Words are separated by whitespace; "a quoted phrase" is one substring (an unterminated quote
    runs to the end); a leading '-' excludes the word or phrase; a lone '-' is a literal word.
    Without `exact`, terms are compared in lower case (the engine lowers both sides in SQL).
    """
    include: list[str] = []
    exclude: list[str] = []
    i, n = 0, len(q)
    while i < n:
        if q[i].isspace():
            i += 1
            continue
        negate = q[i] == "-" and i + 1 < n and not q[i + 1].isspace()
        if negate:
            i += 1
        if q[i] == '"':
            end = q.find('"', i + 1)
            end = n if end < 0 else end
            term = q[i + 1 : end].strip()
            i = end + 1
        else:
            start = i
            while i < n and not q[i].isspace():
                i += 1
            term = q[start:i]
        if term:
            (exclude if negate else include).append(term)
    if len(include) + len(exclude) > MAX_TERMS:
        raise InvalidQuery("q", f"at most {MAX_TERMS} words or phrases")
    # duplicates change nothing but the cache key
    return tuple(dict.fromkeys(include)), tuple(dict.fromkeys(exclude))


class Post(msgspec.Struct, kw_only=True):
    """One visible post, as /v1/search and /v1/export return it."""

    uri: str
    did: str
    handle: str | None = None
    text: str | None = None
    created_at: datetime | None = None
    indexed_at: datetime  # when Jetstream saw the commit (time_us)
    langs: list[str] = []
    reply_parent: str | None = None
    reply_root: str | None = None
    quote: str | None = None
    embed_kind: str | None = None
    external_uri: str | None = None
    links: list[str] = []
    mentions: list[str] = []
    tags: list[str] = []


@dataclass(frozen=True)
class Position:
    """A keyset position: rows strictly after it in the walk's order come next."""

    time_us: int
    uri: str


@dataclass
class SearchResult:
    posts: list[Post]
    has_more: bool
    capped: bool  # more rows exist, but the result-limit flag stops here
    page: int
    cursor: str | None
    data_version: int


# --- the cursor --------------------------------------------------------------------------------


class _CursorBody(msgspec.Struct, array_like=True):
    fingerprint: bytes
    time_us: int
    uri: str
    delivered: int  # rows returned before the cursor, for the result-limit cap


class CursorCodec:
    """Opaque keyset cursors, HMAC-signed so a tampered one is refused, pinned to one query."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret

    def encode(self, filters: Filters, after: Position, delivered: int) -> str:
        body = msgspec.msgpack.encode(
            _CursorBody(filters.fingerprint(), after.time_us, after.uri, delivered)
        )
        tag = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + tag).decode().rstrip("=")

    def decode(self, token: str, filters: Filters) -> tuple[Position, int]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError as exc:
            raise InvalidQuery("cursor", "not a cursor returned by this API") from exc
        body, tag = raw[:-16], raw[-16:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        if len(raw) <= 16 or not hmac.compare_digest(tag, expected):
            raise InvalidQuery("cursor", "not a cursor returned by this API (or it was altered)")
        parsed = msgspec.msgpack.decode(body, type=_CursorBody)
        if parsed.fingerprint != filters.fingerprint():
            raise InvalidQuery("cursor", "belongs to a different query; repeat its parameters")
        return Position(parsed.time_us, parsed.uri), parsed.delivered


# --- the snapshot of live files ----------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A row group of a live file, with its time_us range (from Parquet statistics)."""

    path: str
    min_t: int
    max_t: int
    rows: int


@dataclass
class Snapshot:
    """The live files of one manifest version, grouped by table and day."""

    manifest: Manifest
    days: dict[str, dict[str, list[str]]]  # table -> day -> absolute paths

    @property
    def version(self) -> int:
        return self.manifest.version

    def files(
        self, table: str, first_day: str | None = None, last_day: str | None = None
    ) -> list[str]:
        by_day = self.days.get(table, {})
        return [
            path
            for day in sorted(by_day)
            if (first_day is None or day >= first_day) and (last_day is None or day <= last_day)
            for path in by_day[day]
        ]


# --- SQL ---------------------------------------------------------------------------------------

# The uri is not stored: it is derived from did and rkey (`layout.uri_sql`), everywhere the
# same way, so the keyset order, cursors and the visibility index's hash(uri) agree.
_POST_URI = layout.uri_sql("posts")
# Candidate rows are tuples in this column order; the visibility index keys on hash(uri).
_COLUMNS = (
    f"{_POST_URI} AS uri, did, rev, time_us, epoch_us(created_at) AS created_us, text, langs, "
    "reply_parent, reply_root, quote_uri, embed_kind, external_uri, links, mentions, tags, "
    f"hash({_POST_URI}) AS h, hash(did) AS dh"
)
URI, DID, REV, TIME_US, URI_HASH, DID_HASH = 0, 1, 2, 3, 15, 16
_HOST = "lower(regexp_extract({u}, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?([^/?#:]+)', 1))"


def _text_clause(term_param: str, exact: bool) -> str:
    # contains() is a plain substring test: %, _ and \ in a term match themselves, no escaping.
    if exact:
        return f"contains(text, {term_param})"
    return f"contains(lower(text), lower({term_param}))"


def filter_sql(
    filters: Filters, author_did: str | None, mention_did: str | None
) -> tuple[list[str], dict[str, Any]]:
    """WHERE conjuncts and their bound parameters for the filters (time bounds excluded).

    Every user value is a named parameter; the SQL text depends only on which filters are set.
    """
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for i, term in enumerate(filters.include):
        params[f"inc{i}"] = term
        clauses.append(_text_clause(f"$inc{i}", filters.exact))
    for i, term in enumerate(filters.exclude):
        params[f"exc{i}"] = term
        clauses.append(f"NOT coalesce({_text_clause(f'$exc{i}', filters.exact)}, false)")
    if author_did is not None:
        params["author"] = author_did
        clauses.append("did = $author")
    if mention_did is not None:
        params["mention"] = mention_did
        clauses.append("list_contains(mentions, $mention)")
    if filters.lang is not None:
        params["lang"], params["lang_prefix"] = filters.lang, filters.lang + "-"
        clauses.append(
            "len(list_filter(langs, lambda x: lower(x) = $lang "
            "OR starts_with(lower(x), $lang_prefix))) > 0"
        )
    if filters.tag is not None:
        params["tag"] = filters.tag
        clauses.append("list_contains(list_transform(tags, lambda x: lower(x)), $tag)")
    if filters.domain is not None:
        params["domain"], params["subdomain"] = filters.domain, "." + filters.domain
        host = _HOST.format(u="x")
        # the cheap substring test first; the host parse only for rows that pass it
        clauses.append(
            "(contains(lower(coalesce(external_uri, '')), $domain) "
            "OR contains(lower(array_to_string(links, ' ')), $domain))"
        )
        clauses.append(
            "len(list_filter(list_append(coalesce(links, []), external_uri), "
            f"lambda x: {host} = $domain OR ends_with({host}, $subdomain))) > 0"
        )
    return clauses, params


def _row_to_post(row: Sequence[Any]) -> Post:
    (uri, did, _rev, time_us, created_us, text, langs, parent, root, quote, embed, external,
     links, mentions, tags, _hash, _did_hash) = row  # fmt: skip
    return Post(
        uri=uri,
        did=did,
        text=text,
        created_at=_ts(created_us) if created_us is not None else None,
        indexed_at=_ts(time_us),
        langs=langs or [],
        reply_parent=parent,
        reply_root=root,
        quote=quote,
        embed_kind=embed,
        external_uri=external,
        links=links or [],
        mentions=mentions or [],
        tags=tags or [],
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


# --- the engine --------------------------------------------------------------------------------


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
        self._hidden = _PerFileIndex(
            tuple(visibility.hiders("posts")), _load_hiding, visibility.HidingIndex.from_tables
        )
        self._handles = _PerFileIndex(("identities",), _load_handles, _merge_handles)
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
            return cached
        metrics.api_cache.labels("miss").inc()
        end = delivered + limit if cap is None else min(delivered + limit, cap)
        skip = 0 if after is not None else delivered

        def work(cur: duckdb.DuckDBPyConnection) -> SearchResult:
            began = time.perf_counter()
            rows: list[tuple[Any, ...]] = []
            for batch in self._walk(cur, snap, filters, after, need=end - delivered + skip + 1):
                rows.extend(batch)
            more = len(rows) > end - delivered + skip
            page_rows = rows[skip : skip + end - delivered]
            posts = [_row_to_post(r) for r in page_rows]
            self._attach_handles(cur, snap, posts, page_rows)
            capped = more and cap is not None and end >= cap
            has_more = more and not capped
            token = None
            if has_more and page_rows:
                last = page_rows[-1]
                token = self.codec.encode(filters, Position(last[TIME_US], last[URI]), end)
            metrics.api_query_seconds.labels("search").observe(time.perf_counter() - began)
            return SearchResult(
                posts=posts,
                has_more=has_more,
                capped=capped,
                page=delivered // limit + 1,
                cursor=token,
                data_version=snap.version,
            )

        try:
            result = self.run(work)
        except duckdb.IOException:
            # A file of our snapshot was removed (a compaction's grace period ended while we
            # held an old manifest): once the manifest has moved on, one retry on the new one.
            if self.snapshot().version == snap.version:
                raise
            return self.search(filters, limit=limit, page=page, cursor=cursor)
        self._cache.put(key, result)
        return result

    def export(self, filters: Filters, max_rows: int) -> Generator[list[Post], None, None]:
        """Visible posts in search order, at most max_rows, in batches as the walk finds them.

        Each step runs under its own timeout; the caller runs the iterator in a thread.
        """
        snap = self.snapshot()
        cur = self._cursor()
        try:
            walk = self._walk(cur, snap, filters, None, need=max_rows)
            while True:
                batch = self._step(cur, walk)
                if batch is None:
                    return
                posts = [_row_to_post(r) for r in batch]
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
            cached = (snap.version, self.run(lambda cur: self._stats(cur, snap)))
            self._stats_cache = cached
        body = dict(cached[1])
        newest = body.pop("newest_time_us")
        last = snap.manifest.last_batch
        batch_time = last.get("time")
        body.update(
            newest_event_at=_ts(newest) if newest is not None else None,
            ingest_lag_s=round(time.time() - newest / 1e6, 3) if newest is not None else None,
            last_batch_at=(
                datetime.fromtimestamp(batch_time, tz=UTC)
                if isinstance(batch_time, int | float)
                else None
            ),
            last_batch_events=last.get("events") if isinstance(last.get("events"), int) else None,
        )
        return body

    def _stats(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot) -> dict[str, Any]:
        per_day: dict[str, dict[str, int]] = {}
        newest: int | None = None
        files = 0
        for table, by_day in snap.days.items():
            for day, paths in by_day.items():
                for path in paths:
                    segments = self._segments(path, day)
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

    # --- the walk ------------------------------------------------------------------------------

    def resolve(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot, who: str) -> str | None:
        """A DID for an author/mention value: a DID as is, a handle through identities."""
        if who.startswith("did:"):
            return who
        return self._handles.current(cur, snap).holder_of(who)

    def _attach_handles(
        self,
        cur: duckdb.DuckDBPyConnection,
        snap: Snapshot,
        posts: list[Post],
        rows: list[tuple[Any, ...]],
    ) -> None:
        if not posts:
            return
        index = self._handles.current(cur, snap)
        hashes = np.array([r[DID_HASH] for r in rows], dtype=np.uint64)
        for post, handle in zip(posts, index.handles_of(hashes), strict=True):
            post.handle = handle

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
        planner = _WindowPlanner(segments, latest, lo_bound, hi_bound)
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
            target = _next_target(target, remaining, scanned, hits)
            if narrow and remaining > 0 and (hits == 0 or remaining * scanned / hits > NARROW_ROWS):
                narrow = False
                narrowed = self._narrow(cur, segments, filters, author)
                if narrowed is not None:
                    segments, restrict = narrowed
                    if latest:
                        planner = _WindowPlanner(segments, latest, planner.lo_edge, planner.edge)
                    else:
                        planner = _WindowPlanner(segments, latest, planner.edge, planner.hi_edge)

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
        where = ["time_us >= $lo", "time_us < $hi", *clauses]
        bound = dict(params, lo=lo, hi=hi, fetch=fetch)
        if after is not None:
            op = "<" if latest else ">"
            where.append(f"(time_us {op} $kt OR (time_us = $kt AND {_POST_URI} {op} $ku))")
            bound.update(kt=after.time_us, ku=after.uri)
        order = "DESC" if latest else "ASC"
        tail = f"ORDER BY time_us {order}, {_POST_URI} {order} LIMIT $fetch"
        restrict = restrict or {}
        narrowed = [f for f in files if f in restrict]
        plain = [f for f in files if f not in restrict]
        parts = []
        if plain:
            bound["files"] = plain
            parts.append(f"SELECT {_COLUMNS} FROM read_parquet($files) WHERE {' AND '.join(where)}")
        if narrowed:
            ranges = sorted(
                {(a, b) for f in narrowed for a, b in restrict[f] if b >= lo and a < hi}
            )
            # integers from our own file metadata, not user input
            within = " OR ".join(f"time_us BETWEEN {int(a)} AND {int(b)}" for a, b in ranges)
            bound["nfiles"] = narrowed
            parts.append(
                f"SELECT {_COLUMNS} FROM read_parquet($nfiles) "
                f"WHERE {' AND '.join(where)} AND ({within or 'false'})"
            )
        if not parts:
            return []  # a window between candidate row groups
        if len(parts) == 1:
            sql = f"{parts[0]} {tail}"
        else:
            sql = (
                f"SELECT * FROM (({parts[0]} {tail}) UNION ALL ({parts[1]} {tail})) "
                f"ORDER BY time_us {order}, uri {order} LIMIT $fetch"
            )
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


class _Handles:
    """The latest handle of each DID seen in identities, keyed by hash(did)."""

    def __init__(self, table: pa.Table) -> None:
        if table.num_rows:
            table = table.sort_by([("h", "ascending"), ("time_us", "ascending")])
            keys = table.column("h").to_numpy()
            last = np.ones(len(keys), dtype=bool)
            last[:-1] = keys[1:] != keys[:-1]  # the latest event of each DID sorts last
            table = table.filter(pa.array(last))
        self.keys = table.column("h").to_numpy().astype(np.uint64)
        self.times = table.column("time_us").to_numpy()
        self.dids = table.column("did")
        self.handles = table.column("handle")
        self.lowered = pc.utf8_lower(self.handles)

    def handles_of(self, hashes: np.ndarray) -> list[str | None]:
        if len(self.keys) == 0:
            return [None] * len(hashes)
        pos = np.searchsorted(self.keys, hashes)
        pos[pos == len(self.keys)] = 0
        found = self.keys[pos] == hashes
        return [
            self.handles[int(i)].as_py() if ok else None for i, ok in zip(pos, found, strict=True)
        ]

    def holder_of(self, handle: str) -> str | None:
        """The DID whose latest handle this is (the most recent claim if several)."""
        rows = np.flatnonzero(pc.equal(self.lowered, handle).to_numpy(zero_copy_only=False))
        if len(rows) == 0:
            return None
        return str(self.dids[int(rows[np.argmax(self.times[rows])])].as_py())


_HANDLES_SQL = (
    "SELECT hash(did) AS h, did, time_us, handle FROM read_parquet($files) WHERE handle IS NOT NULL"
)


class _PerFileIndex(Generic[T]):
    """An in-memory index over the live files of some tables, read once per file.

    Files never change once live (a redone batch rewrites identical rows), so each file is read
    the first time a snapshot lists it; the merged index is rebuilt when the file set changes.
    """

    def __init__(
        self,
        tables: tuple[str, ...],
        load: Callable[[duckdb.DuckDBPyConnection, str, str], pa.Table],
        merge: Callable[[list[pa.Table]], T],
    ) -> None:
        self._tables = tables
        self._load = load
        self._merge = merge
        self._lock = threading.Lock()
        self._per_file: dict[str, pa.Table] = {}
        self._version = -1
        self._merged = merge([])

    def current(self, cur: duckdb.DuckDBPyConnection, snap: Snapshot) -> T:
        """The index for this snapshot, reading the files it has not seen yet."""
        if self._version == snap.version:
            return self._merged
        with self._lock:
            if self._version == snap.version:
                return self._merged
            wanted = [(t, p) for t in self._tables for p in snap.files(t)]
            per_file = {}
            for table, path in wanted:
                loaded = self._per_file.get(path)
                if loaded is None:
                    loaded = self._read(cur, table, path)
                per_file[path] = loaded
            self._per_file = per_file
            self._merged = self._merge([t for t in per_file.values() if t.num_rows])
            self._version = snap.version
            return self._merged

    def _read(self, cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
        try:
            return self._load(cur, table, path)
        except duckdb.IOException:
            if os.path.exists(path):
                raise
            # retired after our snapshot was taken; its rows live in the file that replaced it
            return pa.table({})


def _load_hiding(cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
    return visibility.load_hiding(cur, "posts", table, path)


def _load_handles(cur: duckdb.DuckDBPyConnection, table: str, path: str) -> pa.Table:
    out: pa.Table = cur.sql(_HANDLES_SQL, params={"files": [path]}).to_arrow_table()
    return out


def _merge_handles(tables: list[pa.Table]) -> _Handles:
    if not tables:
        schema = pa.schema(
            [
                ("h", pa.uint64()),
                ("did", pa.string()),
                ("time_us", pa.int64()),
                ("handle", pa.string()),
            ]
        )
        return _Handles(schema.empty_table())
    return _Handles(pa.concat_tables(tables, promote_options="permissive"))


def _next_target(target: float, remaining: int, scanned: float, hits: int) -> float:
    """Rows the next window should cover: fourfold growth, or less once matches have been seen.

    With a hit rate to go by, aim at the rows the rest of the page needs plus half again, so a
    page that is nearly full does not scan a window four times larger than the last.
    """
    grown = target * WINDOW_GROWTH
    if hits == 0:
        return grown
    needed = remaining * scanned / hits * 1.5
    return min(grown, max(needed, FIRST_WINDOW_ROWS))


class _WindowPlanner:
    """Cuts the time range of a walk into disjoint windows [lo, hi), in walk order.

    Rows are assumed spread evenly over each row group's time range, which gives an estimate of
    the rows before any instant; each window's far edge is placed so that it holds the rows
    asked for. DuckDB applies the time bounds inside the scan, so a window narrower than a row
    group still spares the text matching of the rows outside it. A window larger than a couple of
    row groups ends on a row-group boundary, so no row group is decompressed twice.
    """

    def __init__(
        self, segments: list[Segment], latest: bool, lo_bound: int | None, hi_bound: int | None
    ) -> None:
        self.segments = segments
        self.latest = latest
        if not segments:
            self.lo_edge = self.hi_edge = self.edge = 0
            return
        self.lo_edge = min(s.min_t for s in segments) if lo_bound is None else lo_bound
        self.hi_edge = max(s.max_t for s in segments) + 1 if hi_bound is None else hi_bound
        self.estimate = _RowEstimate(segments, self.lo_edge, min(self.hi_edge, 2**62))
        self.total = self.estimate.rows_before(self.hi_edge)
        self.done = 0.0  # estimated rows behind the current edge
        self.edge = self.hi_edge if latest else self.lo_edge
        # where windows may end to coincide with row groups; a typical row group's size
        starts = {s.min_t if latest else s.max_t + 1 for s in segments}
        self.boundaries = sorted(t for t in starts if self.lo_edge < t < self.hi_edge)
        self.group_rows = sorted(s.rows for s in segments)[len(segments) // 2]

    def next(self, rows: float) -> tuple[int, int, list[str], float] | None:
        """The next window, about `rows` rows wide: (lo, hi, files overlapping, estimated rows)."""
        if self.lo_edge >= self.hi_edge or self.edge == (
            self.lo_edge if self.latest else self.hi_edge
        ):
            return None
        wanted = self.done + max(rows, 1.0)
        if wanted >= self.total:
            far = self.lo_edge if self.latest else self.hi_edge
        else:
            # rows before an instant, counted from the walk's starting edge
            far = self.estimate.instant_with(self.total - wanted if self.latest else wanted)
            if rows >= 2 * self.group_rows:
                far = self._snap(far)
            far = max(far, self.lo_edge) if self.latest else min(far, self.hi_edge)
            if far == self.edge:  # narrower than a microsecond: take one
                far = self.edge - 1 if self.latest else self.edge + 1
        lo, hi = (far, self.edge) if self.latest else (self.edge, far)
        before = self.done
        self.done = (
            self.total - self.estimate.rows_before(far)
            if self.latest
            else self.estimate.rows_before(far)
        )
        self.edge = far
        files = list(dict.fromkeys(s.path for s in self.segments if s.max_t >= lo and s.min_t < hi))
        return lo, hi, files, self.done - before

    def _snap(self, instant: int) -> int:
        """The row-group boundary nearest to instant that still moves the edge forward."""
        i = bisect.bisect_left(self.boundaries, instant)
        near = [b for b in self.boundaries[max(i - 1, 0) : i + 1]]
        if self.latest:
            near = [b for b in near if b < self.edge]
        else:
            near = [b for b in near if b > self.edge]
        return min(near, key=lambda b: abs(b - instant)) if near else instant


def _windows(
    segments: list[Segment], latest: bool, lo_bound: int | None, hi_bound: int | None
) -> Iterator[tuple[int, int, list[str]]]:
    """The windows of a walk that finds nothing: fourfold growth from FIRST_WINDOW_ROWS."""
    planner = _WindowPlanner(segments, latest, lo_bound, hi_bound)
    target = float(FIRST_WINDOW_ROWS)
    while (window := planner.next(target)) is not None:
        yield window[:3]
        target *= WINDOW_GROWTH


class _RowEstimate:
    """Estimated rows before an instant, from row-group time ranges (piecewise linear)."""

    def __init__(self, segments: list[Segment], lo: int, hi: int) -> None:
        changes: dict[int, float] = {lo: 0.0, hi: 0.0}
        for seg in segments:
            start, stop = seg.min_t, seg.max_t + 1
            density = seg.rows / (stop - start)
            start, stop = max(start, lo), min(stop, hi)
            if start >= stop:
                continue
            changes[start] = changes.get(start, 0.0) + density
            changes[stop] = changes.get(stop, 0.0) - density
        self.points = sorted(changes)
        self.rows: list[float] = []
        self.density: list[float] = []  # rows per microsecond after each point
        acc, density, previous = 0.0, 0.0, self.points[0]
        for point in self.points:
            acc += density * (point - previous)
            density += changes[point]
            self.rows.append(acc)
            self.density.append(density)
            previous = point

    def rows_before(self, instant: int) -> float:
        i = bisect.bisect_right(self.points, instant) - 1
        return self.rows[i] + self.density[i] * (instant - self.points[i])

    def instant_with(self, rows: float) -> int:
        """The earliest instant with about `rows` estimated rows before it."""
        i = max(bisect.bisect_left(self.rows, rows) - 1, 0)
        while i + 1 < len(self.points) and self.rows[i + 1] < rows:
            i += 1
        if self.density[i] <= 0:
            return self.points[min(i + 1, len(self.points) - 1)]
        return min(self.points[i] + int((rows - self.rows[i]) / self.density[i]), self.points[-1])
