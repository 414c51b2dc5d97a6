"""The API's request and response shapes (msgspec Structs) and the validation of parameters.

Query parameters are converted into a params Struct (unknown names, repeats, NUL bytes, bad types
and ranges are refused), then checked for meaning (handles, dates, hosts) and normalised into
`query.Filters`. Every refusal is a `ParamError` naming the parameter, answered as HTTP 400.
The OpenAPI document is generated from the same Structs.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from appliance.query.model import Filters, InvalidQuery, Post, parse_q

Q_MAX = 512
PARAM_NAME_SHOWN = 64  # longest parameter name an error repeats in full
INT_PARAMS = frozenset({"limit", "page"})
_DIGITS = re.compile(r"[0-9]{1,18}")
_DID = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_HANDLE = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_LANG = re.compile(r"[a-zA-Z]{2,3}(-[a-zA-Z0-9]{1,8})*")
_HOST = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class ParamError(Exception):
    """A request parameter is missing, malformed or out of range: HTTP 400 naming it."""

    def __init__(self, param: str | None, detail: str) -> None:
        if param is not None and len(param) > PARAM_NAME_SHOWN:
            param = param[:PARAM_NAME_SHOWN] + "…"  # never echo a huge name whole
        super().__init__(f"{param}: {detail}" if param else detail)
        self.param = param
        self.detail = detail


def _p(text: str, **constraints: Any) -> Meta:
    return Meta(description=text, **constraints)


# --- parameters --------------------------------------------------------------------------------


class FilterParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Filters shared by /v1/search and /v1/export. An empty value means "not given"."""

    q: Annotated[
        str,
        _p(
            'Text to find: case-insensitive substrings that must all occur; "a phrase" in '
            "double quotes is one substring (an unclosed quote runs to the end of q); -word "
            "excludes; %, _ and \\ match themselves",
            max_length=Q_MAX,
        ),
    ] = ""
    exact: Annotated[bool, _p("Match q case-sensitively")] = False
    author: Annotated[
        str, _p("Author DID (did:plc:…) or handle (alice.bsky.social)", max_length=2048)
    ] = ""
    mention: Annotated[str, _p("Mentioned DID or handle", max_length=2048)] = ""
    lang: Annotated[str, _p("Language tag of the post (en also matches en-US)", max_length=35)] = ""
    tag: Annotated[str, _p("Hashtag, without '#', case-insensitive", max_length=640)] = ""
    domain: Annotated[
        str, _p("Host of a link or external embed; subdomains match too", max_length=253)
    ] = ""
    since: Annotated[
        str,
        _p("Inclusive start: YYYY-MM-DD or an ISO 8601 datetime (UTC if no offset)", max_length=64),
    ] = ""
    until: Annotated[
        str,
        _p("Exclusive end: YYYY-MM-DD or an ISO 8601 datetime (UTC if no offset)", max_length=64),
    ] = ""
    sort: Annotated[
        Literal["latest", "oldest"], _p("Order by time indexed: newest or oldest first")
    ] = "latest"


class SearchParams(FilterParams, kw_only=True, forbid_unknown_fields=True):
    """Parameters of GET /v1/search."""

    limit: Annotated[int, _p("Posts per page", ge=1, le=100)] = 50
    page: Annotated[int, _p("Page number, from 1 (not with cursor)", ge=1)] = 1
    cursor: Annotated[
        str, _p("Opaque cursor from a previous response, for the next page", max_length=1024)
    ] = ""


class ExportParams(FilterParams, kw_only=True, forbid_unknown_fields=True):
    """Parameters of GET /v1/export."""

    format: Annotated[Literal["csv", "jsonl", "parquet"], _p("File format of the download")] = "csv"
    limit: Annotated[
        int, _p("Rows at most (default and ceiling: the configured result limit)", ge=1)
    ] = 1000


def convert_params(
    args: dict[str, list[str]], kind: type[SearchParams] | type[ExportParams]
) -> tuple[Any, set[str]]:
    """Validate raw query arguments into `kind`; also return the names actually given."""
    flat: dict[str, str | int] = {}
    for name, values in args.items():
        if "\x00" in name:
            raise ParamError(None, "a parameter name contains a NUL byte")
        if len(values) != 1:
            raise ParamError(name, "given more than once; it takes a single value")
        if "\x00" in values[0]:
            raise ParamError(name, "contains a NUL byte")
        flat[name] = values[0]
        if name in INT_PARAMS and values[0] != "" and not _DIGITS.fullmatch(values[0]):
            # msgspec alone would take 1e2 and 5.0 but refuse 05: one rule, decimal digits
            raise ParamError(name, "a whole number in decimal digits, such as 50")
        if name in INT_PARAMS and values[0] != "":
            flat[name] = int(values[0])
    try:
        params = msgspec.convert(flat, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise _param_error(str(exc)) from exc
    return params, {k for k, v in flat.items() if v != ""}


def _param_error(message: str) -> ParamError:
    # msgspec says "Expected `int` <= 100 - at `$.limit`" or "Object contains unknown field `x`"
    if message.startswith("Object contains unknown field"):
        name = message.split("`")[1]
        return ParamError(name, "unknown parameter")
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        return ParamError(path.rstrip("`"), text)
    return ParamError(None, message)


def to_filters(params: FilterParams) -> Filters:
    """Check the meaning of the filter parameters and normalise them into Filters."""
    try:
        include, exclude = parse_q(params.q)
    except InvalidQuery as exc:
        raise ParamError(exc.param, exc.detail) from exc
    since = _instant("since", params.since) if params.since else None
    until = _instant("until", params.until) if params.until else None
    if since is not None and until is not None and since >= until:
        raise ParamError("until", "must be later than since (until is exclusive)")
    return Filters(
        include=include,
        exclude=exclude,
        exact=params.exact,
        author=_who("author", params.author) if params.author else None,
        mention=_who("mention", params.mention) if params.mention else None,
        lang=_lang(params.lang) if params.lang else None,
        tags=(_tag(params.tag),) if params.tag else (),
        domain=_domain(params.domain) if params.domain else None,
        since_us=since,
        until_us=until,
        sort=params.sort,
    )


def _who(name: str, value: str) -> str:
    value = value.strip().removeprefix("@")
    if value.startswith("did:"):
        if not _DID.fullmatch(value):
            raise ParamError(name, "not a valid DID (did:method:identifier)")
        return value
    if len(value) > 253 or not _HANDLE.fullmatch(value):
        raise ParamError(name, "neither a DID nor a handle such as alice.bsky.social")
    return value.lower()


def _lang(value: str) -> str:
    if not _LANG.fullmatch(value):
        raise ParamError("lang", "not a language tag such as en or pt-BR")
    return value.lower()


def _tag(value: str) -> str:
    tag = value.strip().removeprefix("#").removeprefix("＃")
    if not tag or any(c.isspace() for c in tag):
        raise ParamError("tag", "a hashtag without spaces, with or without the leading #")
    return tag.lower()


def _domain(value: str) -> str:
    host = value.strip().lower().rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ParamError("domain", "not a valid host name") from exc
    if not host or len(host) > 253 or not _HOST.fullmatch(host):
        raise ParamError("domain", "a host name such as example.com (no scheme or path)")
    return host


def _instant(name: str, value: str) -> int:
    """Microseconds since the epoch for a date (midnight UTC) or an ISO 8601 datetime."""
    text = value.strip()
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError as exc:
        raise ParamError(name, "not a date (YYYY-MM-DD) or ISO 8601 datetime") from exc
    if not 1970 <= moment.astimezone(UTC).year <= 9998:
        raise ParamError(name, "out of range (1970 to 9998)")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --- responses ---------------------------------------------------------------------------------


class SearchResponse(msgspec.Struct, kw_only=True):
    """A page of posts, newest (or oldest) first."""

    posts: list[Post]
    cursor: str | None  # pass as ?cursor= for the next page; null when there is none
    has_more: bool
    page: int
    limit: int
    result_limit_reached: bool  # more posts exist, but the result limit stops here
    # For author= / mention= given: false when the appliance has never seen that account (no
    # stored post, identity or account event of the DID; no identity event gave the handle),
    # true when it has; null when not asked (or the lookup timed out).
    author_known: bool | None = None
    mention_known: bool | None = None
    took_ms: float


class DayStats(msgspec.Struct, kw_only=True):
    date: str
    events: int  # rows of every table for the day
    posts: int  # posts rows (creates and updates)
    tables: dict[str, int]


class IdentityStats(msgspec.Struct, kw_only=True):
    """The identity store: DIDs known, their handles, and the backfill still to do."""

    dids: int  # post authors and mentioned accounts seen
    verified: int  # with a handle verified back through DNS or HTTPS
    invalid: int  # shown as handle.invalid
    not_found: int  # no DID document
    queue: int  # due for (re)resolution
    posts_counted: int  # posts counted from batch files
    posts_with_verified_handle: float | None  # share of those whose author has a verified handle
    posts_with_handle: float | None  # share with any handle (verified or handle.invalid)
    last_resolution_at: float | None  # unix time of the newest background resolution


class StatsResponse(msgspec.Struct, kw_only=True):
    """Counts of stored events by day, table and collection, and how fresh the data is."""

    data_version: int
    files: int
    events: int
    posts: int
    days: list[DayStats]
    collections: dict[str, int]  # commit rows (creates and updates) by collection
    deletes_by_collection: dict[str, int]
    newest_event_at: datetime | None
    ingest_lag_s: float | None  # now minus the newest stored event
    last_batch_at: datetime | None
    last_batch_events: int | None
    identity: IdentityStats | None = None  # null until the identity worker has run
    took_ms: float


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error: a short message, a detail, and the parameter at fault if any."""

    error: str
    detail: str
    parameter: str | None = None
    request_id: str | None = None


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str


class ReadyResponse(msgspec.Struct, kw_only=True):
    ready: bool
    data_dir_readable: bool
    query_engine: bool
    data_version: int | None = None
    detail: str | None = None
