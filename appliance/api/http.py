"""HTTP plumbing shared by the API's handlers: JSON responses, the engine's thread pool,
request ids, CORS, the access log, and every error as JSON {"error", "detail"}."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import msgspec
from sanic import HTTPResponse, Request
from sanic.exceptions import SanicException

from appliance import metrics
from appliance.api.models import ErrorResponse, ParamError
from appliance.config import Settings
from appliance.query.model import InvalidQuery, QueryTimeout

log = logging.getLogger("appliance.api")
access_log = logging.getLogger("appliance.api.access")
T = TypeVar("T")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON = "application/json"


class TooLarge(Exception):
    """An export asks for more rows than the cap allows: HTTP 413, decided before scanning."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param
        self.detail = detail


def iso_us(moment: datetime) -> str:
    """Every timestamp the API writes: UTC with microseconds and Z, so string order is time
    order (2026-07-04T14:38:08.000000Z)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fixed_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _fixed_times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fixed_times(v) for v in value]
    if isinstance(value, datetime):
        return iso_us(value)
    return value


def encode_json(body: Any) -> bytes:
    """JSON with every datetime as `iso_us` (msgspec alone drops a zero fraction)."""
    return msgspec.json.encode(_fixed_times(msgspec.to_builtins(body, builtin_types=(datetime,))))


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> HTTPResponse:
    return HTTPResponse(encode_json(body), status=status, headers=headers, content_type=JSON)


async def blocking(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking engine call in the worker's thread pool."""
    pool: ThreadPoolExecutor = request.app.ctx.pool
    return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))


def query_args(request: Request) -> dict[str, list[str]]:
    """The query parameters; bytes that are not UTF-8 are a 400, never silently replaced."""
    args = dict(request.get_args(keep_blank_values=True, errors="surrogateescape"))
    for name, values in args.items():
        if not _utf8(name):
            raise ParamError(None, "a parameter name is not valid UTF-8")
        if not all(_utf8(value) for value in values):
            raise ParamError(name, "not valid UTF-8 (percent-encode text as UTF-8 bytes)")
    return args


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte, kept by surrogateescape
        return False
    return True


async def on_error(request: Request, exc: Exception) -> HTTPResponse:
    """Every error as JSON {"error", "detail"} with its status."""
    param: str | None = None
    if isinstance(exc, ParamError | InvalidQuery):
        status, error, detail, param = 400, "invalid parameter", exc.detail, exc.param
        if param:
            error = f"invalid parameter: {param}"
    elif isinstance(exc, TooLarge):
        status, error, detail, param = 413, "export too large", exc.detail, exc.param
    elif isinstance(exc, QueryTimeout):
        status, error, detail = 504, "query timeout", f"{exc}; narrow the search (dates, author)"
    elif isinstance(exc, SanicException):
        status = exc.status_code
        error = {404: "not found", 405: "method not allowed"}.get(status, "request refused")
        detail = str(exc) or error
    else:
        log.exception("unhandled error", extra={"request_id": request_id(request)})
        status, error, detail = 500, "internal error", "see the server log for this request id"
    body = ErrorResponse(
        error=error, detail=detail, parameter=param, request_id=request_id(request)
    )
    return json_response(body, status=status)


def request_id(request: Request) -> str:
    rid = getattr(request.ctx, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.ctx.request_id = rid
    return str(rid)


async def on_request(request: Request) -> HTTPResponse | None:
    request.ctx.started = time.perf_counter()
    request_id(request)
    if request.method == "OPTIONS":
        return HTTPResponse(status=204)  # CORS preflight; headers are added on the way out
    return None


async def on_response(request: Request, response: HTTPResponse) -> None:
    response.headers["X-Request-ID"] = request_id(request)
    settings: Settings = request.app.ctx.settings
    origin = request.headers.get("origin")
    if origin and (origin in settings.cors_origins or "*" in settings.cors_origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = (
            "X-Request-ID, Content-Disposition, X-Result-Limit, X-Result-Count, "
            "X-Result-Limit-Reached, X-Author-Known, X-Mention-Known"
        )
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "X-Request-ID"
            response.headers["Access-Control-Max-Age"] = "600"
    if (
        response.status == 200
        and request.route is not None
        and request.route.name.endswith(".export")
    ):
        return  # a stream: recorded when it ends
    record(request, response.status)


def record(request: Request, status: int) -> None:
    """Count, time and log one answered request (one JSON line)."""
    started = getattr(request.ctx, "started", None)
    seconds = time.perf_counter() - started if started is not None else 0.0
    route = "/" + request.route.path if request.route is not None else "unmatched"
    metrics.api_requests.labels(route, request.method, str(status)).inc()
    metrics.api_request_seconds.labels(route, str(status)).observe(seconds)
    access_log.info(
        "%s %s %d",
        request.method,
        request.path,
        status,
        extra={
            "request_id": request_id(request),
            "method": request.method,
            "path": request.path,
            "query": request.query_string[:1000],
            "route": route,
            "status": status,
            "ms": round(seconds * 1000, 2),
            "remote": request.client_ip,
            "worker": os.getpid(),
        },
    )
