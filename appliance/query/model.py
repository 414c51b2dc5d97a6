"""The query model: normalised filters, the result shapes, and the errors a query ends with.

What /v1/search and /v1/export filter on (`Filters`, built by the API from request parameters
and `parse_q`), what a search returns (`Post`, `SearchResult`), and where a page ends
(`Position`, which the cursor carries).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

MAX_TERMS = 16
Sort = Literal["latest", "oldest"]


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


class Busy(QueryError):
    """A long scan found the worker's long-scan lane taken for too long: HTTP 503."""


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    """A normalised search: what /v1/search and /v1/export filter on, with no paging."""

    include: tuple[str, ...] = ()  # substrings that must all occur in the text
    exclude: tuple[str, ...] = ()  # substrings that must not occur
    exact: bool = False  # case-sensitive matching
    author: str | None = None  # a DID, or a handle (lower case) resolved through identities
    mention: str | None = None  # likewise
    lang: str | None = None  # lower case; "en" also matches "en-US"
    tags: tuple[str, ...] = ()  # lower case, without '#'; every one must match
    domain: str | None = None  # lower-case host; subdomains match too
    url: str | None = None  # a link or external embed pointing exactly here
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
    cid: str | None = None  # the record's CID (null in files written before it was kept)
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
