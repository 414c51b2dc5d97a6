"""Whether the appliance has seen an account: the "unknown author" answer of the API.

A search by `author=` (or `mention=`) that finds nothing means one of two things to a researcher:
the account exists here but has no matching posts, or the appliance has never seen that account
at all (a typo, or an account that posted nothing while the appliance listened). `account_known`
tells them apart, and is asked only when a search or export found no posts (a found post proves
the account known), so it costs nothing on the common path.

Known means: a handle that the engine's handle lookup ties to a DID (the one that turns
`author=alice.bsky.social` into a DID: stored identity events, the identity store, a live
resolution), or a DID with any stored post, identity or account event. Another source of
accounts plugs in at `resolve`: give `AccountLookup` a function that returns a DID for a value
the engine does not know.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import duckdb

from appliance.query.engine import QueryEngine
from appliance.query.model import QueryTimeout

# Tables whose rows name the account that acted; a DID in any of them has been seen.
SEEN_IN = ("identities", "accounts", "posts")
_CACHE_ENTRIES = 1024

Resolver = Callable[[str], str | None]


class AccountLookup:
    """`known(value)` for an author/mention value (a DID or a lower-case handle), cached per
    data version. One per API worker, beside its query engine."""

    def __init__(self, engine: QueryEngine, resolve: Resolver | None = None) -> None:
        self.engine = engine
        self.resolve = resolve  # outside knowledge of handles/DIDs, when one is configured
        self._cache: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, value: str) -> bool | None:
        """True if the appliance has seen the account, False if never, None if the lookup ran
        past the query timeout (the answer is then not known either way)."""
        snap = self.engine.snapshot()
        key = (value, snap.version)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]

        def work(cur: duckdb.DuckDBPyConnection) -> bool:
            did = self.engine.resolve(cur, snap, value)
            if did is None and self.resolve is not None:
                did = self.resolve(value)
            if did is None:
                return False
            if not value.startswith("did:"):
                return True  # a handle an identity event (or the resolver) gave to a DID
            return any(_did_seen(cur, snap.files(table), did) for table in SEEN_IN)

        try:
            answer = self.engine.run(work)
        except QueryTimeout:
            return None
        with self._lock:
            self._cache[key] = answer
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return answer


def _did_seen(cur: duckdb.DuckDBPyConnection, files: list[str], did: str) -> bool:
    if not files:
        return False
    row = cur.execute(
        "SELECT 1 FROM read_parquet($files) WHERE did = $did LIMIT 1",
        {"files": files, "did": did},
    ).fetchone()
    return row is not None
