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
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import msgspec
from sanic import Blueprint, Sanic
from sanic.worker.loader import AppLoader

from appliance.api import xrpc
from appliance.api.admission import Admission, Overloaded, on_overloaded, pool_threads
from appliance.api.http import on_error, on_request, on_response
from appliance.api.openapi import docs, docs_asset, openapi_document, openapi_json
from appliance.api.routes import export, health, metrics_endpoint, ready, search, stats
from appliance.config import Settings
from appliance.logs import setup_logging
from appliance.query.accounts import AccountLookup
from appliance.query.engine import QueryEngine
from appliance.query.model import Busy

log = logging.getLogger("appliance.api")

APP_NAME = "appliance-api"
REQUEST_MAX_HEADER_BYTES = 16_384
WARM_WAIT_ON_STOP_S = 30.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client in each worker


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
    # The request line and headers: Sanic's ceiling (16 KiB), so an over-long parameter reaches
    # the handler and gets its 400 naming it; past this, 413.
    app.config.REQUEST_MAX_HEADER_SIZE = REQUEST_MAX_HEADER_BYTES
    app.ctx.settings = settings
    app.ctx.metrics_dir = metrics_dir
    app.ctx.openapi = msgspec.json.encode(xrpc.with_openapi(openapi_document()))
    secret = (cursor_secret or settings.api_cursor_secret or "").encode() or None

    @app.before_server_start
    async def open_engine(app: Sanic) -> None:
        app.ctx.pool = ThreadPoolExecutor(
            max_workers=pool_threads(settings), thread_name_prefix="query"
        )
        app.ctx.admission = Admission.from_settings(settings)
        app.ctx.engine = engine = QueryEngine(settings, cursor_secret=secret)
        app.ctx.accounts = AccountLookup(engine)
        threading.Thread(target=_warm, args=(engine,), name="warm", daemon=True).start()

    @app.after_server_stop
    async def close_engine(app: Sanic) -> None:
        app.ctx.pool.shutdown(wait=True, cancel_futures=True)
        # A stop right after the start: let warming finish its query first (DuckDB refuses to
        # close a connection that is busy).
        app.ctx.engine.warmed.wait(WARM_WAIT_ON_STOP_S)
        app.ctx.engine.close()

    v1 = Blueprint("v1", url_prefix="/v1")
    for path, handler in (("/search", search), ("/export", export), ("/stats", stats)):
        v1.add_route(handler, path, methods=["GET", "HEAD", "OPTIONS"], name=handler.__name__)
    root = Blueprint("root")
    for path, handler in (
        ("/health", health),
        ("/ready", ready),
        ("/metrics", metrics_endpoint),
        ("/openapi.json", openapi_json),
        ("/docs", docs),
    ):
        root.add_route(handler, path, methods=["GET", "HEAD"], name=handler.__name__)
    root.add_route(
        docs_asset, "/docs/assets/<name:str>", methods=["GET", "HEAD"], name="docs_asset"
    )
    app.blueprint(v1)
    app.blueprint(root)
    xrpc.register(app)  # /xrpc/app.bsky.feed.searchPosts, /xrpc/_health
    app.register_middleware(on_request, "request")
    app.register_middleware(on_response, "response")  # type: ignore[arg-type]
    app.error_handler.add(Exception, on_error)
    app.error_handler.add(Overloaded, on_overloaded)
    app.error_handler.add(Busy, on_overloaded)
    return app


def _warm(engine: QueryEngine) -> None:
    began = time.perf_counter()
    try:
        engine.warm()
    except Exception:  # queries load what they need themselves; say why warming failed
        log.exception("warming the query engine failed")
        return
    log.info("query engine warm", extra={"seconds": round(time.perf_counter() - began, 2)})


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
    log.info("API stopped")
    return 0
