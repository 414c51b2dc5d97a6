"""The workers' probe endpoint (appliance/httpd.py) on a free loopback port: /health, /ready
(with the worker's own readiness check), /metrics from its registry, 404 and 405."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from appliance.httpd import serve_probes
from tests.conftest import free_port


def test_the_probe_endpoint_answers_health_readiness_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("probe_test_events", "events", registry=registry).inc(3)
    state = {"ok": False}

    async def ready() -> tuple[bool, dict[str, object]]:
        return state["ok"], {"redis": "down" if not state["ok"] else "ok"}

    def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def body() -> list[tuple[int, bytes]]:
        port = free_port()
        server = await serve_probes("127.0.0.1", port, registry, ready)
        try:
            out = []
            for path, method in [("/health", "GET"), ("/ready", "GET"), ("/metrics", "GET"),
                                 ("/nope", "GET"), ("/health", "POST")]:  # fmt: skip
                out.append(await asyncio.to_thread(get, port, path, method))
            state["ok"] = True
            out.append(await asyncio.to_thread(get, port, "/ready?verbose=1"))
            return out
        finally:
            server.close()
            await server.wait_closed()

    health, not_ready, metrics_, missing, post, ready_now = asyncio.run(body())
    assert health == (200, b'{"status":"ok"}')
    assert not_ready[0] == 503 and json.loads(not_ready[1]) == {"ready": False, "redis": "down"}
    assert metrics_[0] == 200 and b"probe_test_events_total 3.0" in metrics_[1]
    assert missing[0] == 404 and post[0] == 405
    assert ready_now[0] == 200 and json.loads(ready_now[1])["ready"] is True
