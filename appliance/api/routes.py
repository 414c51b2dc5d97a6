"""The API's handlers: /v1/search, /v1/export, /v1/stats and the probes. Their docstrings
are the OpenAPI summaries (`api.openapi`)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import duckdb
import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from sanic import HTTPResponse, Request

from appliance import metrics
from appliance.api.admission import admitted
from appliance.api.exports import WRITERS, ExportSummary
from appliance.api.http import (
    TooLarge,
    blocking,
    json_response,
    log,
    query_args,
    record,
    request_id,
)
from appliance.api.models import (
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
from appliance.query.accounts import AccountLookup
from appliance.query.engine import QueryEngine
from appliance.query.model import Filters, Post, QueryError, QueryTimeout


async def search(request: Request) -> HTTPResponse:
    """Search posts by text, author, mention, language, hashtag, link domain and date.

    Newest first by default; page through results with `page` or with the returned `cursor`.
    With the result limit on (the default), no query reaches past the configured maximum.
    """
    settings: Settings = request.app.ctx.settings
    engine: QueryEngine = request.app.ctx.engine
    params, given = convert_params(query_args(request), SearchParams)
    if "cursor" in given and "page" in given:
        raise ParamError("cursor", "give either page or cursor, not both")
    filters = to_filters(params)
    limit = params.limit if "limit" in given else settings.page_size
    began = time.perf_counter()
    result = await admitted(
        request,
        engine.search,
        filters,
        limit=limit,
        page=None if params.cursor else params.page,
        cursor=params.cursor or None,
    )
    known = await accounts_known(request, filters, found=bool(result.posts))
    return json_response(
        SearchResponse(
            posts=result.posts,
            cursor=result.cursor,
            has_more=result.has_more,
            page=result.page,
            limit=limit,
            result_limit_reached=result.capped,
            author_known=known.get("author"),
            mention_known=known.get("mention"),
            took_ms=round((time.perf_counter() - began) * 1000, 2),
        )
    )


async def export(request: Request) -> HTTPResponse | None:
    """Download the posts a search finds as CSV (default), JSON lines or Parquet.

    Takes the search filters, `format` and `limit`; streams rows in search order. With the
    result limit on, at most the configured maximum; otherwise at most the export hard cap. A
    `limit` above the cap is refused with 413 before anything is scanned. Whether the file holds
    every matching post is said twice: in the X-Result-* headers, and inside the file (a last
    line for CSV and JSON lines, key-value metadata for Parquet), which a saved file keeps.
    """
    settings: Settings = request.app.ctx.settings
    engine: QueryEngine = request.app.ctx.engine
    params, given = convert_params(query_args(request), ExportParams)
    filters = to_filters(params)
    cap = settings.result_limit_max if settings.result_limit else settings.export_hard_cap
    if "limit" in given and params.limit > cap:
        raise TooLarge("limit", f"an export returns at most {cap} rows (asked for {params.limit})")
    max_rows = params.limit if "limit" in given else cap
    began = time.perf_counter()
    # One row more than the file holds: its presence says the file was cut at the limit.
    batches = engine.export(filters, max_rows + 1)
    rows, status = 0, 0
    try:
        # Before the headers, so a bad query or a timeout still gets its status: every row when
        # they fit in memory (the headers then carry the count), else the first batch.
        head = await _prefetch(request, batches, max_rows + 1 if max_rows <= PREFETCH_ROWS else 1)
        headers = await _export_headers(request, filters, head, max_rows, params.format)
        writer = WRITERS[params.format]()
        response = await request.respond(content_type=writer.content_type, headers=headers)
        status = 200  # the headers are out: recorded here whatever happens next
        status, rows, reached = await _stream(request, response, writer, batches, head, max_rows)
        if status == 200:
            summary = ExportSummary(rows=rows, limit=max_rows, result_limit_reached=reached)
            await response.send(writer.end(summary))
            await response.eof()
    finally:
        batches.close()
        metrics.api_export_rows.labels(params.format).inc(rows)
        metrics.api_query_seconds.labels("export").observe(time.perf_counter() - began)
        if status != 0:  # 0: refused before any header, answered (and recorded) as an error
            record(request, status)
    return None


PREFETCH_ROWS = 10_000  # exports up to this many rows are gathered before the first byte


async def _prefetch(request: Request, batches: Iterator[list[Post]], rows: int) -> list[list[Post]]:
    head: list[list[Post]] = []
    have = 0
    while have < rows:
        # Only the first step may be refused (503): the export is then admitted as a whole.
        batch = await admitted(request, next, batches, None, refuse=not head)
        if batch is None:
            break
        head.append(batch)
        have += len(batch)
    return head


async def _export_headers(
    request: Request, filters: Filters, head: list[list[Post]], max_rows: int, fmt: str
) -> dict[str, str]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    extension = WRITERS[fmt].extension
    headers = {
        "Content-Disposition": f'attachment; filename="posts-{stamp}.{extension}"',
        "X-Result-Limit": str(max_rows),
    }
    fetched = sum(len(batch) for batch in head)
    if max_rows <= PREFETCH_ROWS:  # every row is in hand
        headers["X-Result-Count"] = str(min(fetched, max_rows))
        headers["X-Result-Limit-Reached"] = "true" if fetched > max_rows else "false"
    known = await accounts_known(request, filters, found=fetched > 0)
    for name, value in known.items():
        if value is not None:
            headers[f"X-{name.capitalize()}-Known"] = "true" if value else "false"
    return headers


async def _stream(
    request: Request,
    response: Any,
    writer: Any,
    batches: Iterator[list[Post]],
    head: list[list[Post]],
    max_rows: int,
) -> tuple[int, int, bool]:
    """Send the rows; (status, rows sent, whether more posts matched than were sent)."""
    rows = 0
    try:
        await response.send(writer.begin())
        pending = iter(head)
        while True:
            batch = next(pending, None)
            if batch is None:
                batch = await admitted(request, next, batches, None, refuse=False)
            if batch is None:
                return 200, rows, False
            take = batch[: max_rows - rows]
            rows += len(take)
            if take:
                await response.send(writer.rows(take))
            if len(take) < len(batch):
                return 200, rows, True  # the extra row: more posts match than the file holds
    except (QueryError, duckdb.Error) as exc:
        # Headers and rows are out: cut the connection without the final chunk, so the client
        # sees an incomplete download instead of a short file that looks whole.
        log.warning(
            "export cut short",
            extra={
                "rows": rows,
                "error": f"{type(exc).__name__}: {exc}",
                "request_id": request_id(request),
            },
        )
        cast(asyncio.Transport, request.transport).abort()
        return (504 if isinstance(exc, QueryTimeout) else 500), rows, False


async def accounts_known(
    request: Request, filters: Filters, *, found: bool
) -> dict[str, bool | None]:
    """For each of author= and mention= given: whether the appliance has seen that account
    (`query.accounts`); a found post proves it, so the lookup runs only on empty results."""
    lookup: AccountLookup = request.app.ctx.accounts
    known: dict[str, bool | None] = {}
    for name in ("author", "mention"):
        value = getattr(filters, name)
        if value is not None:
            known[name] = (
                True if found else await admitted(request, lookup.known, value, refuse=False)
            )
    return known


async def stats(request: Request) -> HTTPResponse:
    """Stored events and posts per day, table and collection; ingest lag and last batch."""
    convert_params_none(request)
    engine: QueryEngine = request.app.ctx.engine
    began = time.perf_counter()
    body = await admitted(request, engine.stats)
    took = time.perf_counter() - began
    metrics.api_query_seconds.labels("stats").observe(took)
    return json_response(msgspec.convert(dict(body, took_ms=round(took * 1000, 2)), StatsResponse))


def convert_params_none(request: Request) -> None:
    """Endpoints without parameters refuse any."""
    for name in query_args(request):
        raise ParamError(name, "unknown parameter")


async def health(request: Request) -> HTTPResponse:
    """Liveness: the worker answers."""
    return json_response(HealthResponse(status="ok"))


async def ready(request: Request) -> HTTPResponse:
    """Readiness: the data root is readable and the query engine answers."""
    engine: QueryEngine = request.app.ctx.engine
    data_dir = engine.data_dir
    readable = data_dir.is_dir() and os.access(data_dir, os.R_OK | os.X_OK)
    answers, version, detail = False, None, None
    try:
        version = await blocking(request, engine.ping)
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
    return json_response(body, status=200 if ok else 503)


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
