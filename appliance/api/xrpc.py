"""Bluesky's standard search method over the same engine as /v1/search, so that code written
for Bluesky (the atproto SDKs, bskyr, notebooks) searches this archive by changing a base URL.

    GET /xrpc/app.bsky.feed.searchPosts   the lexicon's parameters; {cursor?, posts: [PostView]}
    GET /xrpc/_health                     {"version": ...}, as XRPC services answer it
    GET /xrpc/<any other method>          501 MethodNotImplemented

Errors are XRPC error bodies, `{"error": "InvalidRequest", "message": ...}` with status 400
(`BadQueryString` for a `q` the engine cannot use), never the REST shape and never a 500 for
bad input. The PostView's `record` is rebuilt from the stored columns (`post_record`).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import Struct, field
from sanic import HTTPResponse, Request, Sanic

from appliance import __version__
from appliance.api.admission import Admission, Overloaded, admitted
from appliance.api.http import json_response, query_args
from appliance.api.models import Q_MAX, ParamError, _domain, _instant, _lang, _tag, _who
from appliance.query.engine import QueryEngine
from appliance.query.model import Busy, Filters, InvalidQuery, Post, QueryTimeout, parse_q

log = logging.getLogger("appliance.api")

NSID = "app.bsky.feed.searchPosts"
POST_TYPE = "app.bsky.feed.post"
INVALID_HANDLE = "handle.invalid"  # what Bluesky shows for a DID without a verified handle
DEFAULT_LIMIT = 25
# The inline operators of Bluesky's search syntax that `q` understands, and the parameter each
# one stands for.
OPERATORS = {
    "from": "author",
    "mentions": "mentions",
    "lang": "lang",
    "domain": "domain",
    "since": "since",
    "until": "until",
}
_OPERATOR = re.compile(r"(" + "|".join(OPERATORS) + r"):(\S+)")
_TOKEN = re.compile(r'-?"[^"]*"?|\S+')
_EMBED_TYPES = {
    "images": "app.bsky.embed.images",
    "video": "app.bsky.embed.video",
    "external": "app.bsky.embed.external",
    "record": "app.bsky.embed.record",
    "record_with_media": "app.bsky.embed.recordWithMedia",
}


class XrpcError(Exception):
    """An XRPC error: its name (InvalidRequest, BadQueryString, ...), message and status."""

    def __init__(
        self, message: str, error: str = "InvalidRequest", status: int = 400, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, for a 503


class XrpcErrorBody(Struct):
    """Every XRPC error response."""

    error: str
    message: str


class SearchPostsParams(Struct, kw_only=True):
    """The parameters of app.bsky.feed.searchPosts (its lexicon)."""

    q: str
    sort: str = "latest"
    since: str = ""
    until: str = ""
    mentions: str = ""
    author: str = ""
    lang: str = ""
    domain: str = ""
    url: str = ""
    tag: list[str] = []
    limit: int = DEFAULT_LIMIT
    cursor: str = ""


class ProfileViewBasic(Struct):
    did: str
    handle: str


class PostView(Struct):
    """app.bsky.feed.defs#postView: the fields the lexicon requires (no counts: not stored)."""

    uri: str
    cid: str
    author: ProfileViewBasic
    record: dict[str, Any]
    indexed_at: str = field(name="indexedAt")


class SearchPostsOutput(Struct, omit_defaults=True):
    """The output of app.bsky.feed.searchPosts (no hitsTotal: counting would cost a full scan)."""

    posts: list[PostView]
    cursor: str | None = None


# --- parameters ---------------------------------------------------------------------------------


def parse_params(args: dict[str, list[str]]) -> SearchPostsParams:
    """The lexicon's parameters from the query string; parameters it does not define are ignored,
    as XRPC servers do."""
    if "q" not in args:
        raise XrpcError('Params must have the property "q"')
    flat: dict[str, Any] = {}
    for name in SearchPostsParams.__struct_fields__:
        values = args.get(name)
        if values is None:
            continue
        if any("\x00" in v for v in values):
            raise XrpcError(f"{name} contains a NUL byte")
        if name == "tag":
            flat[name] = values
        elif len(values) != 1:
            raise XrpcError(f"{name} takes a single value (given {len(values)} times)")
        else:
            flat[name] = values[0]
    try:
        params = msgspec.convert(flat, SearchPostsParams, strict=False)
    except msgspec.ValidationError as exc:
        text, _, path = str(exc).partition(" - at `$.")
        name = path.split("`")[0].split("[")[0] or "params"
        raise XrpcError(f"{name}: {text}") from exc
    if not 1 <= params.limit <= 100:
        raise XrpcError("limit must be an integer from 1 to 100")
    if len(params.q) > Q_MAX:
        raise XrpcError(f"q is longer than {Q_MAX} characters", "BadQueryString")
    if params.sort not in ("latest", "top"):
        raise XrpcError("sort must be latest or top")
    if len(params.tag) > 8 or any(len(t) > 640 for t in params.tag):
        raise XrpcError("tag: at most 8 tags of at most 640 characters")
    return params


def split_operators(q: str) -> tuple[str, dict[str, str]]:
    """(the text of q without its inline operators, {parameter: value} of the operators).

    `from:alice.bsky.social lang:en "a phrase" cats` gives ('"a phrase" cats',
    {"author": "alice.bsky.social", "lang": "en"}). Operators inside quotes or negated stay text.
    """
    text: list[str] = []
    given: dict[str, str] = {}
    for token in _TOKEN.findall(q):
        match = _OPERATOR.fullmatch(token)
        if match is None:
            text.append(token)
            continue
        name, value = OPERATORS[match.group(1)], match.group(2)
        if given.get(name, value) != value:
            raise XrpcError(f"q gives {match.group(1)}: twice", "BadQueryString")
        given[name] = value
    return " ".join(text), given


def to_filters(params: SearchPostsParams) -> Filters:
    """Filters for the engine: the parameters and q's operators, which must agree where both
    are given (since/until narrow to the later start and the earlier end)."""
    text, inline = split_operators(params.q)
    if inline.get("author") == "me":
        raise XrpcError("from:me needs a signed-in viewer; this service has none", "BadQueryString")
    merged: dict[str, str] = {}
    for name in ("author", "mentions", "lang", "domain"):
        value, extra = getattr(params, name), inline.get(name, "")
        if value and extra and value.lower().lstrip("@") != extra.lower().lstrip("@"):
            raise XrpcError(f"{name}={value} and q's operator ({extra}) disagree", "BadQueryString")
        merged[name] = value or extra
    try:
        include, exclude = parse_q(text)
        starts = [_instant("since", v) for v in (params.since, inline.get("since")) if v]
        ends = [_instant("until", v) for v in (params.until, inline.get("until")) if v]
        since, until = max(starts, default=None), min(ends, default=None)
        if since is not None and until is not None and since >= until:
            raise ParamError("until", "must be later than since (until is exclusive)")
        return Filters(
            include=include,
            exclude=exclude,
            author=_who("author", merged["author"]) if merged["author"] else None,
            mention=_who("mentions", merged["mentions"]) if merged["mentions"] else None,
            lang=_lang(merged["lang"]) if merged["lang"] else None,
            domain=_domain(merged["domain"]) if merged["domain"] else None,
            tags=tuple(dict.fromkeys(_tag(t) for t in params.tag if t)),
            url=_url(params.url) if params.url else None,
            since_us=since,
            until_us=until,
            sort="latest",  # "top" is accepted and answered newest first: no engagement counts
        )
    except (ParamError, InvalidQuery) as exc:
        raise XrpcError(
            str(exc), "BadQueryString" if exc.param == "q" else "InvalidRequest"
        ) from exc


def _url(value: str) -> str:
    if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+", value) or len(value) > 2048:
        raise XrpcError("url must be an absolute URL such as https://example.com/page")
    return value


# --- responses ----------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as atproto writes datetimes."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def post_record(post: Post) -> dict[str, Any]:
    """The app.bsky.feed.post record, rebuilt from what the appliance stores: text, createdAt
    (the time seen when the record had none), langs, the reply refs and the embed's type with
    the quoted post's uri and the external link. CIDs of reply and quote targets, facets and the
    embed's contents are not stored (see the storage notes), so they are absent."""
    record: dict[str, Any] = {
        "$type": POST_TYPE,
        "text": post.text or "",
        "createdAt": iso(post.created_at or post.indexed_at),
    }
    if post.langs:
        record["langs"] = post.langs
    if post.reply_parent or post.reply_root:
        parent = post.reply_parent or post.reply_root
        record["reply"] = {"root": {"uri": post.reply_root or parent}, "parent": {"uri": parent}}
    embed_type = _EMBED_TYPES.get(post.embed_kind or "")
    if embed_type is not None:
        embed: dict[str, Any] = {"$type": embed_type}
        quote = {"uri": post.quote} if post.quote else None
        external = {"uri": post.external_uri} if post.external_uri else None
        if post.embed_kind == "record" and quote:
            embed["record"] = quote
        elif post.embed_kind == "external" and external:
            embed["external"] = external
        elif post.embed_kind == "record_with_media":
            if quote:
                embed["record"] = {"$type": _EMBED_TYPES["record"], "record": quote}
            if external:
                embed["media"] = {"$type": _EMBED_TYPES["external"], "external": external}
        record["embed"] = embed
    return record


def post_view(post: Post) -> PostView | None:
    """The PostView of a post; None for a row stored without its cid (the lexicon requires one)."""
    if not post.cid:
        return None
    return PostView(
        uri=post.uri,
        cid=post.cid,
        author=ProfileViewBasic(did=post.did, handle=post.handle or INVALID_HANDLE),
        record=post_record(post),
        indexed_at=iso(post.indexed_at),
    )


def xrpc_error(error: XrpcError) -> HTTPResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return json_response(
        XrpcErrorBody(error.error, error.message), status=error.status, headers=headers
    )


# --- handlers -----------------------------------------------------------------------------------


async def search_posts(request: Request) -> HTTPResponse:
    """Bluesky's app.bsky.feed.searchPosts over the archive (the same posts as /v1/search).

    Takes the lexicon's parameters (q with the from:, mentions:, lang:, domain:, since: and
    until: operators; sort latest, or top answered as latest; tag repeatable, all must match;
    limit 1-100, default 25) and returns {cursor?, posts: [PostView]}. Errors are XRPC error
    bodies {"error", "message"}.
    """
    engine: QueryEngine = request.app.ctx.engine
    try:
        params = parse_params(query_args(request))
        filters = to_filters(params)
        result = await admitted(
            request, engine.search, filters, limit=params.limit, cursor=params.cursor or None
        )
    except XrpcError as exc:
        return xrpc_error(exc)
    except (Overloaded, Busy) as exc:  # the worker's admission control, as /v1/search has it
        admission: Admission = request.app.ctx.admission
        retry = exc.retry_after if isinstance(exc, Overloaded) else admission.retry_after()
        message = f"{exc}; retry after {retry} s"
        return xrpc_error(XrpcError(message, "NotEnoughResources", 503, max(retry, 1)))
    except InvalidQuery as exc:  # a cursor from elsewhere, or another query's
        return xrpc_error(XrpcError(str(exc)))
    except QueryTimeout as exc:
        return xrpc_error(XrpcError(f"{exc}; narrow the search", "UpstreamTimeout", 504))
    except Exception:
        log.exception("searchPosts failed")
        return xrpc_error(XrpcError("Internal Server Error", "InternalServerError", 500))
    views = [view for view in map(post_view, result.posts) if view is not None]
    return json_response(SearchPostsOutput(posts=views, cursor=result.cursor))


async def health(request: Request) -> HTTPResponse:
    """XRPC service health: the version of this service."""
    return json_response({"version": __version__})


async def not_implemented(request: Request, nsid: str) -> HTTPResponse:
    """Any other XRPC method: 501 MethodNotImplemented."""
    return xrpc_error(XrpcError("Method Not Implemented", "MethodNotImplemented", 501))


def register(app: Sanic) -> None:
    """Add the /xrpc routes to the API app."""
    # OPTIONS: the CORS preflight of a browser client (answered by the app's middleware)
    app.add_route(
        search_posts, f"/xrpc/{NSID}", methods=["GET", "OPTIONS"], name="xrpc_search_posts"
    )
    app.add_route(health, "/xrpc/_health", methods=["GET", "OPTIONS"], name="xrpc_health")
    app.add_route(not_implemented, "/xrpc/<nsid:str>", methods=["GET", "POST"], name="xrpc_other")


def with_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """The API's OpenAPI document with the /xrpc routes and their schemas added."""
    paths, schemas = openapi_paths()
    document["paths"].update(paths)
    document["components"]["schemas"].update(schemas)
    return document


def openapi_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, component schemas) of the /xrpc routes for the OpenAPI document."""
    _, components = msgspec.json.schema_components(
        [SearchPostsOutput, XrpcErrorBody], ref_template="#/components/schemas/{name}"
    )

    def query(name: str, schema: dict[str, Any], text: str, required: bool = False) -> Any:
        return {"name": name, "in": "query", "required": required, "description": text,
                "schema": schema}  # fmt: skip

    string = {"type": "string"}
    error = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/XrpcErrorBody"}}}
    }
    summary, _, description = (search_posts.__doc__ or "").strip().partition("\n")
    search = {
        "get": {
            "operationId": "xrpc_search_posts",
            "summary": summary.strip(),
            "description": " ".join(description.split()),
            "parameters": [
                query("q", string, "Search text (as /v1/search's q) and inline operators", True),
                query("sort", {"enum": ["latest", "top"]}, "top is answered as latest"),
                query("since", string, "Inclusive start: date or ISO 8601 datetime"),
                query("until", string, "Exclusive end: date or ISO 8601 datetime"),
                query("mentions", string, "Mentioned DID or handle"),
                query("author", string, "Author DID or handle"),
                query("lang", string, "Language tag"),
                query("domain", string, "Host of a link or external embed"),
                query("url", string, "Exact URL of a link or external embed"),
                query("tag", {"type": "array", "items": string}, "Hashtags; all must match"),
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100, "default": 25},
                    "Posts per page",
                ),
                query("cursor", string, "The cursor of the previous page"),
            ],
            "responses": {
                "200": {
                    "description": "A page of PostViews",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/SearchPostsOutput"}
                        }
                    },
                },
                "400": {"description": "InvalidRequest or BadQueryString", **error},
                "503": {"description": "NotEnoughResources: overloaded, see Retry-After", **error},
                "504": {"description": "UpstreamTimeout: the query ran too long", **error},
            },
        }
    }
    health_op = {
        "get": {
            "operationId": "xrpc_health",
            "summary": (health.__doc__ or "").strip(),
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"version": string},
                                "required": ["version"],
                            }
                        }
                    },
                }
            },
        }
    }
    return {f"/xrpc/{NSID}": search, "/xrpc/_health": health_op}, components
