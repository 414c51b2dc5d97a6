"""The Jetstream subscription: what may be asked for, the /subscribe URL with its cursor, how
URLs are logged, and the reconnect backoff."""

from __future__ import annotations

import random
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from appliance.config import Settings

# Jetstream's own limits on a subscription.
MAX_WANTED_COLLECTIONS = 100
MAX_WANTED_DIDS = 10_000
BACKOFF_BASE_S = 0.1

_NSID_OR_WILDCARD = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,62})(?:\.[a-zA-Z0-9-]{1,63})*(?:\.[a-zA-Z][a-zA-Z0-9]{0,62}|\.\*)"
)
_DID = re.compile(r"did:[a-z]+:[A-Za-z0-9._:%-]{1,2048}")


class SubscriptionError(ValueError):
    """The configured wantedCollections / wantedDids are not acceptable to Jetstream."""


def validate_subscription(settings: Settings) -> None:
    """Check wantedCollections and wantedDids before the first connect (clear error, exit 2)."""
    if len(settings.wanted_collections) > MAX_WANTED_COLLECTIONS:
        raise SubscriptionError(
            f"{len(settings.wanted_collections)} wanted collections; Jetstream accepts at most "
            f"{MAX_WANTED_COLLECTIONS}"
        )
    if len(settings.wanted_dids) > MAX_WANTED_DIDS:
        raise SubscriptionError(
            f"{len(settings.wanted_dids)} wanted DIDs; Jetstream accepts at most {MAX_WANTED_DIDS}"
        )
    for nsid in settings.wanted_collections:
        if len(nsid) > 317 or not _NSID_OR_WILDCARD.fullmatch(nsid):
            raise SubscriptionError(f"wanted collection {nsid[:80]!r} is not an NSID or prefix.*")
    for did in settings.wanted_dids:
        if not _DID.fullmatch(did):
            raise SubscriptionError(f"wanted DID {did[:80]!r} is not a DID")


def subscribe_url(base: str, settings: Settings, cursor_us: int | None) -> str:
    """A fresh /subscribe URL with the subscription and the cursor (µs), replacing any given.

    maxMessageSizeBytes is never sent: Jetstream would skip larger events silently, while we want
    them dead-lettered as oversized.
    """
    parts = urlsplit(base)
    ours = {"cursor", "wantedCollections", "wantedDids", "maxMessageSizeBytes"}
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    query += [("wantedCollections", c) for c in settings.wanted_collections]
    query += [("wantedDids", d) for d in settings.wanted_dids]
    if cursor_us is not None:
        query.append(("cursor", str(cursor_us)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="*:")))


def display_url(url: str) -> str:
    """A URL safe and short enough to log: no credentials, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def backoff_delay(attempt: int, cap_s: float, base_s: float = BACKOFF_BASE_S) -> float:
    """Capped exponential backoff with jitter: in [ceiling/2, ceiling], ceiling = base·2^(n-1)."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt, 1) - 1, 30))
    return ceiling * (0.5 + random.random() / 2)
