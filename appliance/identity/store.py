"""The identity store: what is known of each DID, kept durably in SQLite on the data volume.

One row per DID seen as a post author or mention: its handle (verified, or `handle.invalid`),
how it was learnt (`resolver` or `firehose`), when (`resolved_at`, seconds since the epoch; for a
firehose identity event, the event's time), and when to resolve it next (`next_attempt`: 0 for a
DID never resolved, the TTL's end once resolved, a backoff after a failure). The worker is the
only writer; each API worker reads it. WAL mode lets readers read while the worker writes.

SQLite rather than a Parquet table: entries are updated in place a few times per second and read
by key, which Parquet files (immutable, scanned) do badly; one small file on the volume survives
restarts and redeploys like the data beside it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.identity.resolver import INVALID_HANDLE

STORE_NAME = "identity.sqlite3"
BUSY_TIMEOUT_MS = 2000
READ_CHUNK = 500  # DIDs per lookup query (SQLite bounds the bound parameters of one query)

SCHEMA = """
CREATE TABLE IF NOT EXISTS dids (
    did TEXT PRIMARY KEY,
    handle TEXT,                      -- verified handle, 'handle.invalid', or NULL (unknown)
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | ok | invalid | not_found
    source TEXT,                      -- resolver | firehose
    resolved_at REAL NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    posts INTEGER NOT NULL DEFAULT 0  -- posts counted from batch files (a priority and a share)
);
CREATE INDEX IF NOT EXISTS dids_next ON dids (next_attempt);
CREATE INDEX IF NOT EXISTS dids_handle ON dids (handle);
CREATE TABLE IF NOT EXISTS scanned (path TEXT PRIMARY KEY);
"""


def store_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / STORE_NAME


@dataclass(frozen=True)
class Known:
    """What the store says of one DID."""

    handle: str | None  # as shown: a verified handle, 'handle.invalid', or None
    resolved_at: float  # seconds; 0 if never resolved
    fresh: bool  # resolved and not yet due again


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
        conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


class Store:
    """The worker's read-write handle on the store (thread-safe through one lock)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = store_path(data_dir)
        # The worker may start before the batcher has created the data root.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self.path, readonly=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- discovery ------------------------------------------------------------------------------

    def is_scanned(self, path: str) -> bool:
        return bool(self._read("SELECT 1 FROM scanned WHERE path = ?", (path,)))

    def add_dids(self, counts: dict[str, int], path: str) -> None:
        """Record the DIDs of a file (posts per author; mentions count 0) and the file as read,
        in one transaction: a crash re-reads the whole file or none of it."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    # a new DID is due at once, the more posts the sooner (-posts sorts first)
                    "INSERT INTO dids (did, posts, next_attempt) VALUES (?, ?, -?) "
                    "ON CONFLICT (did) DO UPDATE SET posts = posts + excluded.posts",
                    ((did, n, n) for did, n in counts.items()),
                )
                self._conn.execute("INSERT OR IGNORE INTO scanned (path) VALUES (?)", (path,))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def forget_scanned(self, live: set[str]) -> None:
        """Drop scan marks of files no longer live (retired by compaction)."""
        gone = [(p,) for (p,) in self._read("SELECT path FROM scanned") if p not in live]
        if gone:
            self._write("DELETE FROM scanned WHERE path = ?", gone)

    # --- firehose identity events --------------------------------------------------------------

    def apply_events(self, events: Iterable[tuple[str, int, str | None]], ttl_s: float) -> int:
        """Apply identity events (did, time_us, handle): each wins over what is known if it is
        newer. An event without a handle makes the DID due for resolution. Returns how many
        changed an entry."""
        now = time.time()
        applied = 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for did, time_us, handle in events:
                    at = time_us / 1e6
                    if handle is None:
                        cur = self._conn.execute(
                            "UPDATE dids SET next_attempt = 0 WHERE did = ? AND resolved_at < ?",
                            (did, at),
                        )
                    else:
                        status = "invalid" if handle == INVALID_HANDLE else "ok"
                        cur = self._conn.execute(
                            "INSERT INTO dids (did, handle, status, source, resolved_at, "
                            "next_attempt) VALUES (?, ?, ?, 'firehose', ?, ?) "
                            "ON CONFLICT (did) DO UPDATE SET handle = excluded.handle, "
                            "status = excluded.status, source = 'firehose', "
                            "resolved_at = excluded.resolved_at, failures = 0, "
                            "next_attempt = excluded.next_attempt "
                            "WHERE dids.resolved_at < excluded.resolved_at",
                            (did, handle.lower(), status, at, now + ttl_s),
                        )
                    applied += cur.rowcount
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return applied

    # --- the resolution queue ------------------------------------------------------------------

    def claim_due(self, now: float, limit: int, lease_s: float) -> list[str]:
        """Up to `limit` DIDs due for resolution, leased for `lease_s` (a crash mid-resolution
        leaves them due again after the lease)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT did FROM dids WHERE next_attempt <= ? ORDER BY next_attempt LIMIT ?",
                    (now, limit),
                ).fetchall()
                self._conn.executemany(
                    "UPDATE dids SET next_attempt = ? WHERE did = ?",
                    [(now + lease_s, did) for (did,) in rows],
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return [did for (did,) in rows]

    def resolved(
        self, did: str, status: str, handle: str | None, now: float, next_attempt: float
    ) -> bool:
        """Store a resolution unless a firehose event newer than its start arrived meanwhile."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO dids (did, handle, status, source, resolved_at, next_attempt) "
                "VALUES (?, ?, ?, 'resolver', ?, ?) "
                "ON CONFLICT (did) DO UPDATE SET handle = excluded.handle, "
                "status = excluded.status, source = 'resolver', "
                "resolved_at = excluded.resolved_at, next_attempt = excluded.next_attempt, "
                "failures = 0 WHERE dids.resolved_at < excluded.resolved_at",
                (did, handle, status, now, next_attempt),
            )
            return cur.rowcount > 0

    def failed(self, did: str, backoff: Any) -> float:
        """Count a failure and schedule the next attempt by `backoff(failures)` seconds; what
        was known stays shown. Returns the delay."""
        with self._lock:
            row = self._conn.execute(
                "UPDATE dids SET failures = failures + 1 WHERE did = ? RETURNING failures", (did,)
            ).fetchone()
            delay = float(backoff(row[0] if row else 1))
            self._conn.execute(
                "UPDATE dids SET next_attempt = ? WHERE did = ?", (time.time() + delay, did)
            )
            return delay

    def release(self, dids: Iterable[str], at: float) -> None:
        """Make leased DIDs due at `at` again without counting a failure (e.g. a 429)."""
        self._write("UPDATE dids SET next_attempt = ? WHERE did = ?", [(at, d) for d in dids])

    # --- figures --------------------------------------------------------------------------------

    def queue_length(self, now: float) -> int:
        return int(self._read("SELECT count(*) FROM dids WHERE next_attempt <= ?", (now,))[0][0])

    def summary(self) -> dict[str, Any]:
        return summarize(self._read(SUMMARY_SQL, (time.time(),)))


SUMMARY_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'ok'),
       count(*) FILTER (WHERE status = 'invalid'),
       count(*) FILTER (WHERE status = 'not_found'),
       count(*) FILTER (WHERE next_attempt <= ?),
       coalesce(sum(posts), 0),
       coalesce(sum(posts) FILTER (WHERE status = 'ok'), 0),
       coalesce(sum(posts) FILTER (WHERE handle IS NOT NULL), 0),
       max(resolved_at) FILTER (WHERE source = 'resolver')
FROM dids
"""


def summarize(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    dids, ok, invalid, not_found, due, posts, posts_ok, posts_known, last = rows[0]
    return {
        "dids": dids,
        "verified": ok,
        "invalid": invalid,
        "not_found": not_found,
        "queue": due,
        "posts_counted": posts,
        "posts_with_verified_handle": posts_ok / posts if posts else None,
        "posts_with_handle": posts_known / posts if posts else None,
        "last_resolution_at": last,
    }


class Reader:
    """An API worker's read-only view of the store; a missing or busy store reads as empty."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = store_path(data_dir)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection | None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self.path.exists():
                return None
            conn = _connect(self.path, readonly=True)
            self._local.conn = conn
        return conn

    def known(self, dids: Sequence[str]) -> dict[str, Known]:
        """What is known of these DIDs (absent: never seen). Raises sqlite3.Error."""
        conn = self._conn()
        if conn is None or not dids:
            return {}
        now = time.time()
        out = {}
        for start in range(0, len(dids), READ_CHUNK):
            chunk = list(dids[start : start + READ_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT did, handle, resolved_at, next_attempt, status FROM dids "
                f"WHERE did IN ({marks})",
                chunk,
            ).fetchall()
            for did, handle, at, nxt, status in rows:
                out[did] = Known(handle, at, status != "pending" and nxt > now)
        return out

    def holder(self, handle: str) -> tuple[str, float] | None:
        """The DID whose verified handle this is (the latest resolution if several)."""
        conn = self._conn()
        if conn is None:
            return None
        row = conn.execute(
            "SELECT did, resolved_at FROM dids WHERE handle = ? AND status = 'ok' "
            "ORDER BY resolved_at DESC LIMIT 1",
            (handle,),
        ).fetchone()
        return (str(row[0]), float(row[1])) if row else None

    def summary(self) -> dict[str, Any] | None:
        conn = self._conn()
        if conn is None:
            return None
        return summarize(conn.execute(SUMMARY_SQL, (time.time(),)).fetchall())
