"""The OpenAPI 3.1 document, built from the handlers' docstrings and the msgspec Structs, and
the interactive docs page."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import msgspec
from sanic import HTTPResponse, Request
from sanic.exceptions import NotFound

from appliance.api.http import JSON
from appliance.api.models import (
    ErrorResponse,
    ExportParams,
    HealthResponse,
    ReadyResponse,
    SearchParams,
    SearchResponse,
    StatsResponse,
)
from appliance.api.routes import export, health, metrics_endpoint, ready, search, stats


async def openapi_json(request: Request) -> HTTPResponse:
    """The OpenAPI 3.1 document of this API."""
    return HTTPResponse(request.app.ctx.openapi, content_type=JSON)


async def docs(request: Request) -> HTTPResponse:
    """Interactive API documentation (Swagger UI, served by the appliance itself)."""
    return HTTPResponse(DOCS_HTML, content_type="text/html; charset=utf-8")


async def docs_asset(request: Request, name: str) -> HTTPResponse:
    """One of the Swagger UI files the /docs page loads (packaged: no network needed)."""
    asset = SWAGGER_UI_ASSETS.get(name)
    if asset is None:
        raise NotFound(f"no documentation asset {name!r}")
    body, content_type = asset
    return HTTPResponse(
        body,
        content_type=content_type,
        headers={"Cache-Control": f"public, max-age={ASSET_MAX_AGE_S}"},
    )


SWAGGER_UI_VERSION = "5.35.0"  # npm swagger-ui-dist, vendored in api/swagger_ui (see SOURCE.txt)
ASSET_MAX_AGE_S = 86_400
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "LICENSE": "text/plain; charset=utf-8",
    "NOTICE": "text/plain; charset=utf-8",
    "swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("appliance.api").joinpath("swagger_ui")
    return {name: (folder.joinpath(name).read_bytes(), kind) for name, kind in _ASSET_TYPES.items()}


SWAGGER_UI_ASSETS = _load_assets()

DOCS_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bluesky post explorer API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head><body><div id="ui"><p>Loading the API documentation… The machine-readable document is
at <a href="/openapi.json">/openapi.json</a>.</p></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.onload = () => SwaggerUIBundle({{url: "/openapi.json", dom_id: "#ui", validatorUrl: null}});</script>
<!-- Swagger UI {SWAGGER_UI_VERSION} (Apache-2.0): /docs/assets/LICENSE -->
</body></html>
"""


def _header(description: str, kind: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


EXPORT_HEADERS = {
    "X-Result-Limit": _header("The most rows this export may hold (limit, or the cap)", "integer"),
    "X-Result-Count": _header(
        "Rows in the file (exports of up to 10,000 rows, gathered before sending)", "integer"
    ),
    "X-Result-Limit-Reached": _header(
        "true when more posts match than the file holds (same condition as X-Result-Count)",
        "boolean",
    ),
    "X-Author-Known": _header(
        "With author=: false when the appliance has never seen that account", "boolean"
    ),
    "X-Mention-Known": _header(
        "With mention=: false when the appliance has never seen that account", "boolean"
    ),
}


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
                    "description": "The file, streamed. It ends with a summary (rows, limit, "
                    "result_limit_reached): a last row `# export complete: ...` in CSV, a last "
                    'line `{"export": {...}}` in JSON lines, key-value metadata '
                    "`appliance.export` in Parquet; a file without it was cut off.",
                    "headers": EXPORT_HEADERS,
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
