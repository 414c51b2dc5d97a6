"""`appliance serve`: the REST API over the query engine (Sanic).

    GET /v1/search   a page of posts          GET /health   alive
    GET /v1/export   a download (csv, jsonl,  GET /ready    data root readable, DuckDB answers
                     parquet), streamed       GET /metrics  Prometheus, summed over workers
    GET /v1/stats    counts and freshness     GET /docs, /openapi.json

`create_app(settings)` builds the app; Sanic's worker processes are spawned and each calls the
factory again through an AppLoader, so nothing is built at import time. Each worker opens its own
query engine (DuckDB) before it serves and closes it after. Handlers validate every parameter
into a Struct (400 naming the parameter), run DuckDB in a thread pool (the event loop keeps
answering probes), and every error is JSON `{"error", "detail"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar, cast

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException
from sanic.worker.loader import AppLoader

from appliance import metrics
from appliance.api.models import (
    ErrorResponse,
    ExportParams,
    HealthResponse,
    ParamError,
    ReadyResponse,
    SearchParams,
    SearchResponse,
    StatsResponse,
    convert_params,
    to_filters,
)
from appliance.config import Settings
from appliance.logs import setup_logging
from appliance.query.engine import QueryEngine
from appliance.query.model import InvalidQuery, Post, QueryError, QueryTimeout

log = logging.getLogger("appliance.api")
access_log = logging.getLogger("appliance.api.access")
T = TypeVar("T")

APP_NAME = "appliance-api"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client in each worker
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON = "application/json"


class TooLarge(Exception):
    """An export asks for more rows than the cap allows: HTTP 413, decided before scanning."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param
        self.detail = detail


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HTTPResponse:
    return HTTPResponse(
        msgspec.json.encode(body), status=status, headers=headers, content_type=JSON
    )


async def _blocking(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking engine call in the worker's thread pool."""
    pool: ThreadPoolExecutor = request.app.ctx.pool
    return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))


def _args(request: Request) -> dict[str, list[str]]:
    return dict(request.get_args(keep_blank_values=True))


# --- /v1 ---------------------------------------------------------------------------------------


async def search(request: Request) -> HTTPResponse:
    """Search posts by text, author, mention, language, hashtag, link domain and date.

    Newest first by default; page through results with `page` or with the returned `cursor`.
    With the result limit on (the default), no query reaches past the configured maximum.
    """
    settings: Settings = request.app.ctx.settings
    engine: QueryEngine = request.app.ctx.engine
    params, given = convert_params(_args(request), SearchParams)
    if "cursor" in given and "page" in given:
        raise ParamError("cursor", "give either page or cursor, not both")
    filters = to_filters(params)
    limit = params.limit if "limit" in given else settings.page_size
    began = time.perf_counter()
    result = await _blocking(
        request,
        engine.search,
        filters,
        limit=limit,
        page=None if params.cursor else params.page,
        cursor=params.cursor or None,
    )
    return _json(
        SearchResponse(
            posts=result.posts,
            cursor=result.cursor,
            has_more=result.has_more,
            page=result.page,
            limit=limit,
            result_limit_reached=result.capped,
            took_ms=round((time.perf_counter() - began) * 1000, 2),
        )
    )


async def export(request: Request) -> HTTPResponse | None:
    """Download the posts a search finds as CSV (default), JSON lines or Parquet.

    Takes the search filters, `format` and `limit`; streams rows in search order. With the
    result limit on, at most the configured maximum; otherwise at most the export hard cap. A
    `limit` above the cap is refused with 413 before anything is scanned.
    """
    settings: Settings = request.app.ctx.settings
    engine: QueryEngine = request.app.ctx.engine
    params, given = convert_params(_args(request), ExportParams)
    filters = to_filters(params)
    cap = settings.result_limit_max if settings.result_limit else settings.export_hard_cap
    if "limit" in given and params.limit > cap:
        raise TooLarge("limit", f"an export returns at most {cap} rows (asked for {params.limit})")
    max_rows = params.limit if "limit" in given else cap
    began = time.perf_counter()
    batches = engine.export(filters, max_rows)
    # The first batch comes before the headers, so a bad query or a timeout still gets its status.
    first = await _blocking(request, next, batches, None)
    writer = _WRITERS[params.format]()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = await request.respond(
        content_type=writer.content_type,
        headers={"Content-Disposition": f'attachment; filename="posts-{stamp}.{writer.extension}"'},
    )
    rows, status = 0, 200
    try:
        await response.send(writer.begin())
        batch = first
        while batch is not None:
            rows += len(batch)
            await response.send(writer.rows(batch))
            batch = await _blocking(request, next, batches, None)
        await response.send(writer.end())
        await response.eof()
    except (QueryError, duckdb.Error) as exc:
        # Headers and rows are out: cut the connection without the final chunk, so the client
        # sees an incomplete download instead of a short file that looks whole.
        status = 504 if isinstance(exc, QueryTimeout) else 500
        log.warning(
            "export cut short",
            extra={
                "rows": rows,
                "error": f"{type(exc).__name__}: {exc}",
                "request_id": _request_id(request),
            },
        )
        cast(asyncio.Transport, request.transport).abort()
    finally:
        batches.close()
        metrics.api_export_rows.labels(params.format).inc(rows)
        metrics.api_query_seconds.labels("export").observe(time.perf_counter() - began)
        _record(request, status)
    return None


async def stats(request: Request) -> HTTPResponse:
    """Stored events and posts per day, table and collection; ingest lag and last batch."""
    convert_params_none(request)
    engine: QueryEngine = request.app.ctx.engine
    began = time.perf_counter()
    body = await _blocking(request, engine.stats)
    took = time.perf_counter() - began
    metrics.api_query_seconds.labels("stats").observe(took)
    return _json(msgspec.convert(dict(body, took_ms=round(took * 1000, 2)), StatsResponse))


def convert_params_none(request: Request) -> None:
    """Endpoints without parameters refuse any."""
    for name in _args(request):
        raise ParamError(name, "unknown parameter")


# --- exports -----------------------------------------------------------------------------------

EXPORT_FIELDS = [f.name for f in msgspec.structs.fields(Post)]
_LIST_FIELDS = {"langs", "links", "mentions", "tags"}
_TIME_FIELDS = {"created_at", "indexed_at"}


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat().replace("+00:00", "Z")


class _CsvWriter:
    """RFC 4180 CSV (CRLF, quotes doubled), UTF-8; list columns as JSON arrays."""

    content_type = "text/csv; charset=utf-8; header=present"
    extension = "csv"

    def _encode(self, rows: list[list[str]]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerows(rows)
        return out.getvalue().encode()

    def begin(self) -> bytes:
        return self._encode([EXPORT_FIELDS])

    def rows(self, posts: list[Post]) -> bytes:
        table = []
        for post in posts:
            row = []
            for name in EXPORT_FIELDS:
                value = getattr(post, name)
                if name in _LIST_FIELDS:
                    row.append(msgspec.json.encode(value).decode())
                elif name in _TIME_FIELDS:
                    row.append(_iso(value))
                else:
                    row.append("" if value is None else str(value))
            table.append(row)
        return self._encode(table)

    def end(self) -> bytes:
        return b""


class _JsonlWriter:
    """One JSON object per line, the same objects /v1/search returns."""

    content_type = "application/x-ndjson"
    extension = "jsonl"

    def begin(self) -> bytes:
        return b""

    def rows(self, posts: list[Post]) -> bytes:
        return b"".join(msgspec.json.encode(p) + b"\n" for p in posts)

    def end(self) -> bytes:
        return b""


_STRS = pa.list_(pa.string())
_TS = pa.timestamp("us", tz="UTC")
EXPORT_SCHEMA = pa.schema(
    [
        pa.field(
            name,
            _STRS if name in _LIST_FIELDS else _TS if name in _TIME_FIELDS else pa.string(),
            nullable=name not in {"uri", "did", "indexed_at"},
        )
        for name in EXPORT_FIELDS
    ]
)


class _Sink(io.RawIOBase):
    """A write-only file that hands back what was written since the last drain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._pos += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._pos

    def drain(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class _ParquetWriter:
    """Parquet (zstd), one row group per batch, written as the batches arrive."""

    content_type = "application/vnd.apache.parquet"
    extension = "parquet"

    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer = pq.ParquetWriter(self._sink, EXPORT_SCHEMA, compression="zstd")

    def begin(self) -> bytes:
        return self._sink.drain()

    def rows(self, posts: list[Post]) -> bytes:
        columns = {name: [getattr(p, name) for p in posts] for name in EXPORT_FIELDS}
        self._writer.write_table(pa.table(columns, schema=EXPORT_SCHEMA))
        return self._sink.drain()

    def end(self) -> bytes:
        self._writer.close()
        return self._sink.drain()


_WRITERS: dict[str, Callable[[], _CsvWriter | _JsonlWriter | _ParquetWriter]] = {
    "csv": _CsvWriter,
    "jsonl": _JsonlWriter,
    "parquet": _ParquetWriter,
}


# --- probes, metrics, docs ---------------------------------------------------------------------


async def health(request: Request) -> HTTPResponse:
    """Liveness: the worker answers."""
    return _json(HealthResponse(status="ok"))


async def ready(request: Request) -> HTTPResponse:
    """Readiness: the data root is readable and the query engine answers."""
    engine: QueryEngine = request.app.ctx.engine
    data_dir = engine.data_dir
    readable = data_dir.is_dir() and os.access(data_dir, os.R_OK | os.X_OK)
    answers, version, detail = False, None, None
    try:
        version = await _blocking(request, engine.ping)
        answers = True
    except Exception as exc:  # any failure means not ready; say which
        detail = f"{type(exc).__name__}: {exc}"
    warm = engine.warmed.is_set()
    ok = readable and answers and warm
    if not readable:
        detail = f"data root {data_dir} is not a readable directory"
    elif not warm:
        detail = "loading file statistics and the visibility index"
    body = ReadyResponse(
        ready=ok,
        data_dir_readable=readable,
        query_engine=answers,
        data_version=version,
        detail=detail,
    )
    return _json(body, status=200 if ok else 503)


async def metrics_endpoint(request: Request) -> HTTPResponse:
    """Prometheus metrics of the API, summed over all worker processes."""
    return HTTPResponse(api_metrics(request.app.ctx.metrics_dir), content_type=CONTENT_TYPE_LATEST)


class _ApiOnly:
    """The multiprocess collector, restricted to the API's series."""

    def __init__(self, directory: str) -> None:
        self._inner = MultiProcessCollector(None, directory)

    def collect(self) -> Iterator[Any]:
        return (m for m in self._inner.collect() if m.name.startswith(metrics.API_PREFIX))


def api_metrics(directory: str | None) -> bytes:
    """The exposition text: summed over workers' files in multiprocess mode, else in-process."""
    if not directory:
        return generate_latest(metrics.API)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ApiOnly(directory))
    return generate_latest(registry)


async def openapi_json(request: Request) -> HTTPResponse:
    """The OpenAPI 3.1 document of this API."""
    return HTTPResponse(request.app.ctx.openapi, content_type=JSON)


async def docs(request: Request) -> HTTPResponse:
    """Interactive API documentation (Swagger UI)."""
    return HTTPResponse(_DOCS_HTML, content_type="text/html; charset=utf-8")


_DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Bluesky post explorer API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"><p>Loading the API documentation… The machine-readable document is
at <a href="/openapi.json">/openapi.json</a>.</p></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>window.onload = () => SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>
"""


# --- errors, CORS, request ids, access log -----------------------------------------------------


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
        log.exception("unhandled error", extra={"request_id": _request_id(request)})
        status, error, detail = 500, "internal error", "see the server log for this request id"
    body = ErrorResponse(
        error=error, detail=detail, parameter=param, request_id=_request_id(request)
    )
    return _json(body, status=status)


def _request_id(request: Request) -> str:
    rid = getattr(request.ctx, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.ctx.request_id = rid
    return str(rid)


async def on_request(request: Request) -> HTTPResponse | None:
    request.ctx.started = time.perf_counter()
    _request_id(request)
    if request.method == "OPTIONS":
        return HTTPResponse(status=204)  # CORS preflight; headers are added on the way out
    return None


async def on_response(request: Request, response: HTTPResponse) -> None:
    response.headers["X-Request-ID"] = _request_id(request)
    settings: Settings = request.app.ctx.settings
    origin = request.headers.get("origin")
    if origin and (origin in settings.cors_origins or "*" in settings.cors_origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Content-Disposition"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "X-Request-ID"
            response.headers["Access-Control-Max-Age"] = "600"
    if (
        response.status == 200
        and request.route is not None
        and request.route.name.endswith(".export")
    ):
        return  # a stream: recorded when it ends
    _record(request, response.status)


def _record(request: Request, status: int) -> None:
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
            "request_id": _request_id(request),
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


# --- the app -----------------------------------------------------------------------------------


def create_app(
    settings: Settings, cursor_secret: str | None = None, metrics_dir: str | None = None
) -> Sanic:
    """The API app. Called once in each worker process (through an AppLoader).

    `metrics_dir` is the PROMETHEUS_MULTIPROC_DIR `appliance serve` set up for its workers;
    without it (one process, e.g. tests) metrics live in this process.
    """
    setup_logging(settings.log_level, settings.log_format)
    app = Sanic(APP_NAME, env_prefix=None, configure_logging=False)
    app.config.KEEP_ALIVE_TIMEOUT = 15
    app.config.REQUEST_MAX_SIZE = 64 * 1024  # GET only: no bodies to speak of
    app.ctx.settings = settings
    app.ctx.metrics_dir = metrics_dir
    app.ctx.openapi = msgspec.json.encode(openapi_document())
    secret = (cursor_secret or settings.api_cursor_secret or "").encode() or None

    @app.before_server_start
    async def open_engine(app: Sanic) -> None:
        app.ctx.pool = ThreadPoolExecutor(
            max_workers=max(2, settings.duckdb_threads * 2), thread_name_prefix="query"
        )
        app.ctx.engine = engine = QueryEngine(settings, cursor_secret=secret)
        threading.Thread(target=_warm, args=(engine,), name="warm", daemon=True).start()

    @app.after_server_stop
    async def close_engine(app: Sanic) -> None:
        app.ctx.pool.shutdown(wait=True, cancel_futures=True)
        app.ctx.engine.close()

    v1 = Blueprint("v1", url_prefix="/v1")
    for path, handler in (("/search", search), ("/export", export), ("/stats", stats)):
        v1.add_route(handler, path, methods=["GET", "OPTIONS"], name=handler.__name__)
    root = Blueprint("root")
    for path, handler in (
        ("/health", health),
        ("/ready", ready),
        ("/metrics", metrics_endpoint),
        ("/openapi.json", openapi_json),
        ("/docs", docs),
    ):
        root.add_route(handler, path, methods=["GET"], name=handler.__name__)
    app.blueprint(v1)
    app.blueprint(root)
    app.register_middleware(on_request, "request")
    app.register_middleware(on_response, "response")  # type: ignore[arg-type]
    app.error_handler.add(Exception, on_error)
    return app


def _warm(engine: QueryEngine) -> None:
    began = time.perf_counter()
    try:
        engine.warm()
    except Exception:  # queries load what they need themselves; say why warming failed
        log.exception("warming the query engine failed")
        return
    log.info("query engine warm", extra={"seconds": round(time.perf_counter() - began, 2)})


# --- OpenAPI -----------------------------------------------------------------------------------


def _summary(fn: Callable[..., Any]) -> tuple[str, str]:
    doc = (fn.__doc__ or "").strip()
    first, _, rest = doc.partition("\n")
    return first.strip(), " ".join(line.strip() for line in rest.splitlines()).strip()


def _query_parameters(kind: type[msgspec.Struct]) -> list[dict[str, Any]]:
    schema = msgspec.json.schema(kind)
    props = schema.get("$defs", {}).get(kind.__name__, schema).get("properties", {})
    out = []
    for name, prop in props.items():
        prop = dict(prop)
        description = prop.pop("description", "")
        out.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": prop,
            }
        )
    return out


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, built from the handler docstrings and the msgspec Structs."""
    _, components = msgspec.json.schema_components(
        [SearchResponse, StatsResponse, ErrorResponse, HealthResponse, ReadyResponse],
        ref_template="#/components/schemas/{name}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {JSON: {"schema": ref("ErrorResponse")}}}

    def op(fn: Callable[..., Any], ok: dict[str, Any], params: type[msgspec.Struct] | None,
           errors: dict[str, str]) -> dict[str, Any]:  # fmt: skip
        summary, description = _summary(fn)
        return {
            "get": {
                "operationId": fn.__name__,
                "summary": summary,
                "description": description,
                "parameters": _query_parameters(params) if params else [],
                "responses": {"200": ok, **{code: error(text) for code, text in errors.items()}},
            }
        }

    def json_ok(name: str) -> dict[str, Any]:
        return {"description": "OK", "content": {JSON: {"schema": ref(name)}}}

    bad = {"400": "A parameter is unknown, repeated or invalid (named in `parameter`)"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bluesky post explorer API",
            "version": "1",
            "description": "Search and export public Bluesky posts captured from the firehose.",
        },
        "paths": {
            "/v1/search": op(
                search, json_ok("SearchResponse"), SearchParams, {**bad, "504": "Query timeout"}
            ),
            "/v1/export": op(
                export,
                {
                    "description": "The file, streamed",
                    "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        "application/vnd.apache.parquet": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                ExportParams,
                {**bad, "413": "limit above the export cap", "504": "Query timeout"},
            ),
            "/v1/stats": op(stats, json_ok("StatsResponse"), None, bad),
            "/health": op(health, json_ok("HealthResponse"), None, {}),
            "/ready": op(ready, json_ok("ReadyResponse"), None, {"503": "Not ready"}),
            "/metrics": op(
                metrics_endpoint,
                {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                None,
                {},
            ),
        },
        "components": {"schemas": components},
    }


# --- `appliance serve` -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", dest="set_api_host", metavar="HOST", help="address to listen on")
    parser.add_argument(
        "--port", dest="set_api_port", metavar="PORT", type=int, help="port to listen on"
    )
    parser.add_argument(
        "--workers", dest="set_api_workers", metavar="N", type=int, help="worker processes"
    )
    parser.add_argument(
        "--data-dir", dest="set_data_dir", metavar="DIR", help="root of the Parquet datasets"
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the API with `api_workers` processes until SIGINT/SIGTERM."""
    setup_logging(settings.log_level, settings.log_format)
    # Workers inherit the environment: each keeps its metric values in this directory.
    metrics_dir = tempfile.mkdtemp(prefix="appliance-api-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    secret = settings.api_cursor_secret or os.urandom(32).hex()
    loader = AppLoader(factory=partial(create_app, settings, secret, metrics_dir))
    app = loader.load()
    app.prepare(
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        access_log=False,
        motd=False,
    )
    log.info(
        "API listening",
        extra={
            "url": f"http://{settings.api_host}:{settings.api_port}",
            "workers": settings.api_workers,
            "metrics_dir": metrics_dir,
        },
    )
    try:
        Sanic.serve(primary=app, app_loader=loader)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
