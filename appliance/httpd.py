"""A minimal asyncio HTTP endpoint for the worker services: /health, /ready and /metrics.

The ingester and batcher are not web services; a few lines of asyncio serve their probes and
metrics without pulling a web framework into them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_probes(
    host: str, port: int, registry: CollectorRegistry, ready: ReadyCheck
) -> asyncio.Server:
    """Start serving GET /health, /ready (200 or 503 with JSON details) and /metrics."""
    import msgspec

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != "GET":
                out = _response("405 Method Not Allowed", b'{"error":"method"}', "application/json")
            elif path == "/health":
                out = _response("200 OK", b'{"status":"ok"}', "application/json")
            elif path == "/ready":
                ok, details = await ready()
                body = msgspec.json.encode({"ready": ok, **details})
                out = _response(
                    "200 OK" if ok else "503 Service Unavailable", body, "application/json"
                )
            elif path == "/metrics":
                out = _response("200 OK", generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                out = _response("404 Not Found", b'{"error":"not found"}', "application/json")
            writer.write(out)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
