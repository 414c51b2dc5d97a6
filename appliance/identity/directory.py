"""What a search knows of identities: the handle to show for each author, and the DID a
handle in `author=` / `mention=` names.

Two sources are merged, the newer winning: the firehose's identity events (the query engine's
in-memory index over the `identities` files, passed in as `(value, time_us)`) and the identity
store the background worker fills (`store.Reader`). A handle neither knows is resolved at query
time (DNS TXT or HTTPS, then checked against the DID document), within
`identity_query_timeout_s`, and remembered in this process for a while. Nothing here ever fails
a search: a store that cannot be read or a resolver that does not answer leaves the answer at
what is known, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from appliance import metrics
from appliance.config import Settings
from appliance.identity.resolver import (
    INVALID_HANDLE,
    RateLimited,
    Resolver,
    Unavailable,
    dns_txt_lookup,
    normalize_handle,
    with_timeout,
)
from appliance.identity.store import Reader

log = logging.getLogger("appliance.identity")

LIVE_CACHE_ENTRIES = 4096
LIVE_FOUND_TTL_S = 3600.0
LIVE_MISSING_TTL_S = 300.0
SUMMARY_TTL_S = 5.0  # the counts scan every DID of the store: not on every /v1/stats  # a handle that names no one may be registered soon

Source = Literal["firehose", "store", "cache", "live", "none", "unavailable"]


@dataclass(frozen=True)
class HandleLookup:
    """The DID a handle names, and where the answer came from. `did` is None when the handle
    names no one (`source="none"`) or no resolver answered in time (`"unavailable"`)."""

    handle: str
    did: str | None
    source: Source


class Directory:
    """Identity lookups for one API worker process (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reader = Reader(settings.data_dir)
        self._live: collections.OrderedDict[str, tuple[str | None, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._summary: tuple[float, dict[str, Any] | None] | None = None

    # --- DID -> handle ----------------------------------------------------------------------------

    def handles_of(
        self, dids: list[str], firehose: list[tuple[str, int] | None]
    ) -> list[str | None]:
        """The handle to show for each DID: the newer of the firehose's latest identity event
        and the store's entry; None if neither knows one."""
        try:
            known = self.reader.known(list(dict.fromkeys(dids)))
        except sqlite3.Error:
            metrics.api_identity_lookups.labels("handle_of", "error").inc(len(dids))
            log.warning("identity store unreadable; showing firehose handles only", exc_info=True)
            known = {}
        out: list[str | None] = []
        results: collections.Counter[str] = collections.Counter()
        shown: collections.Counter[str] = collections.Counter()
        for did, fire in zip(dids, firehose, strict=True):
            entry = known.get(did)
            if fire is not None and (
                entry is None or entry.handle is None or fire[1] / 1e6 > entry.resolved_at
            ):
                handle: str | None = fire[0]
                result = "hit"
            elif entry is not None and entry.handle is not None:
                handle, result = entry.handle, "hit" if entry.fresh else "stale"
            else:
                handle, result = None, "miss"
            results[result] += 1
            if handle is None:
                shown["none"] += 1
            else:
                shown["invalid" if handle == INVALID_HANDLE else "verified"] += 1
            out.append(handle)
        # counted once per page or export batch, not per post (an export streams millions)
        for result, n in results.items():
            metrics.api_identity_lookups.labels("handle_of", result).inc(n)
        for kind, n in shown.items():
            metrics.api_posts_shown.labels(kind).inc(n)
        return out

    # --- handle -> DID ----------------------------------------------------------------------------

    def did_of(self, handle: str, firehose: tuple[str, int] | None) -> HandleLookup:
        """The DID a handle names: the newer of the firehose's and the store's answers, else
        this process's memory of a live resolution, else a live resolution now."""
        handle = handle.lower()
        try:
            stored = self.reader.holder(handle)
        except sqlite3.Error:
            metrics.api_identity_lookups.labels("did_of", "error").inc()
            log.warning("identity store unreadable; handle lookup skips it", exc_info=True)
            stored = None
        if firehose is not None and (stored is None or firehose[1] / 1e6 > stored[1]):
            metrics.api_identity_lookups.labels("did_of", "hit").inc()
            return HandleLookup(handle, firehose[0], "firehose")
        if stored is not None:
            metrics.api_identity_lookups.labels("did_of", "hit").inc()
            return HandleLookup(handle, stored[0], "store")
        remembered = self._remembered(handle)
        if remembered is not None:
            metrics.api_identity_lookups.labels("did_of", "hit").inc()
            return HandleLookup(handle, remembered[0], "cache" if remembered[0] else "none")
        return self._resolve_live(handle)

    def _remembered(self, handle: str) -> tuple[str | None, float] | None:
        with self._lock:
            entry = self._live.get(handle)
            if entry is None or entry[1] < time.monotonic():
                return None
            self._live.move_to_end(handle)
            return entry

    def _remember(self, handle: str, did: str | None) -> None:
        ttl = LIVE_FOUND_TTL_S if did else LIVE_MISSING_TTL_S
        with self._lock:
            self._live[handle] = (did, time.monotonic() + ttl)
            self._live.move_to_end(handle)
            while len(self._live) > LIVE_CACHE_ENTRIES:
                self._live.popitem(last=False)

    def _resolve_live(self, handle: str) -> HandleLookup:
        if normalize_handle(handle) != handle:
            metrics.api_identity_lookups.labels("did_of", "miss").inc()
            return HandleLookup(handle, None, "none")
        timeout = self.settings.identity_query_timeout_s
        try:
            # Called from a query thread (never the event loop): a private loop per lookup.
            did = asyncio.run(with_timeout(self._verified_did(handle, timeout), timeout))
        except (Unavailable, RateLimited) as exc:
            metrics.api_identity_lookups.labels("did_of", "error").inc()
            log.warning("handle not resolved", extra={"handle": handle, "error": str(exc)})
            return HandleLookup(handle, None, "unavailable")
        metrics.api_identity_lookups.labels("did_of", "live").inc()
        self._remember(handle, did)
        return HandleLookup(handle, did, "live" if did else "none")

    async def _verified_did(self, handle: str, timeout: float) -> str | None:
        s = self.settings
        txt = dns_txt_lookup(s.identity_dns, timeout)
        async with Resolver(
            plc_url=s.plc_url, timeout_s=timeout, txt=txt, web_origin=s.identity_web_origin
        ) as resolver:
            return await resolver.verified_did(handle)

    # --- figures ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any] | None:
        """The store's counts for /v1/stats, at most SUMMARY_TTL_S old; None if there is no
        store (no worker has run)."""
        cached = self._summary
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            summary = self.reader.summary()
        except sqlite3.Error:
            log.warning("identity store unreadable for stats", exc_info=True)
            return None
        self._summary = (time.monotonic() + SUMMARY_TTL_S, summary)
        return summary
