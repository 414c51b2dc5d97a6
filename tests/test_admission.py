"""Admission control through a real Sanic server: a saturated worker answers 503 with Retry-After
at once (queue full) or after api_max_wait_s (no slot freed), and serves again once a slot frees.

The searches are real (DuckDB over real Parquet); one of them is held at the door of the engine
by an event, so which request holds the only slot is certain rather than timed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sanic import Sanic

from appliance.api.app import create_app
from appliance.query import engine as engine_mod
from appliance.query.engine import QueryEngine
from tests.conftest import T0_US, ParquetData, free_port, make_settings
from tests.helpers import metric_values, wait_until


class Served:
    """The app served by Sanic's asyncio server in a thread with its own event loop, so that
    requests from several client threads are in flight at once."""

    def __init__(self, app: Sanic, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        started = threading.Event()

        async def main() -> None:
            server = await app.create_server(
                host="127.0.0.1", port=port, return_asyncio_server=True, access_log=False
            )
            assert server is not None
            await server.startup()
            await server.before_start()
            await server.after_start()
            serving = asyncio.create_task(server.serve_forever())
            started.set()
            await self.stopping.wait()
            await server.before_stop()
            server.close()
            await server.wait_closed()
            serving.cancel()
            await server.after_stop()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),))
        self.thread.start()
        assert started.wait(30), "the server did not start"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def held(
    tmp_path: Path, parquet_data: ParquetData, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[Served, threading.Event, threading.Event]]]:
    """Factory: a server with one query slot whose searches for "held" wait for a release."""
    for i in range(20):
        parquet_data.post(f"post {i} held", t=T0_US + i * 1_000_000)
    parquet_data.flush()
    entered, release = threading.Event(), threading.Event()
    real = QueryEngine.search

    def gated(self: QueryEngine, filters: Any, **kwargs: Any) -> Any:
        if "held" in filters.include:
            entered.set()
            release.wait(30)
        return real(self, filters, **kwargs)

    monkeypatch.setattr(QueryEngine, "search", gated)
    servers: list[Served] = []

    def start(**overrides: Any) -> tuple[Served, threading.Event, threading.Event]:
        settings = make_settings(tmp_path, api_max_running=1, **overrides)
        Sanic.test_mode = True  # as sanic-testing's clients set it: a new app of one name per test
        servers.append(Served(create_app(settings), free_port()))
        return servers[-1], entered, release

    yield start
    release.set()
    for server in servers:
        server.stop()


def _since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each counter gained between two scrapes (other tests share the registry)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _hold(client: Served, entered: threading.Event) -> tuple[threading.Thread, list[Any]]:
    """Start a search that takes the only slot; return once it is inside the engine."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(client.get("/v1/search?q=held")))
    thread.start()
    wait_until(entered.is_set, 10, "the held search to enter the engine")
    return thread, out


def test_a_full_queue_is_503_with_retry_after_and_the_slot_serves_again(
    held: Callable[..., tuple[Served, threading.Event, threading.Event]],
) -> None:
    client, entered, release = held(api_max_waiting=0)
    before = metric_values(client.get("/metrics").text)  # the registry is process-wide
    thread, out = _hold(client, entered)
    refused = client.get("/v1/search?q=post")
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "overloaded"
    assert refused.json()["request_id"] == refused.headers["x-request-id"]
    export = client.get("/v1/export?q=post")
    assert export.status_code == 503
    probe = client.get("/ready")  # probes never queue behind queries
    assert probe.status_code == 200
    release.set()
    thread.join(30)
    assert out[0].status_code == 200 and len(out[0].json()["posts"]) == 20
    served = client.get("/v1/search?q=post")
    assert served.status_code == 200 and len(served.json()["posts"]) == 20
    text = client.get("/metrics")
    values = _since(before, metric_values(text.text))
    assert values['appliance_api_rejected_total{reason="queue_full"}'] == 2
    assert values['appliance_api_requests_total{method="GET",route="/v1/search",status="503"}'] == 1


def test_a_query_that_waits_past_max_wait_is_503(
    held: Callable[..., tuple[Served, threading.Event, threading.Event]],
) -> None:
    client, entered, release = held(api_max_waiting=4, api_max_wait_s=0.3)
    before = metric_values(client.get("/metrics").text)
    thread, out = _hold(client, entered)
    refused = client.get("/v1/stats")
    assert refused.status_code == 503
    assert "within 0.3 s" in refused.json()["detail"]
    release.set()
    thread.join(30)
    assert out[0].status_code == 200
    text = client.get("/metrics")
    assert (
        _since(before, metric_values(text.text))['appliance_api_rejected_total{reason="wait"}'] == 1
    )
    assert metric_values(text.text)["appliance_api_waiting_queries"] == 0


def test_a_waiting_query_is_served_when_the_slot_frees(
    held: Callable[..., tuple[Served, threading.Event, threading.Event]],
) -> None:
    client, entered, release = held(api_max_waiting=4, api_max_wait_s=20)
    thread, out = _hold(client, entered)
    waiting: list[Any] = []
    second = threading.Thread(target=lambda: waiting.append(client.get("/v1/search?q=post")))
    second.start()
    wait_until(
        lambda: metric_values(client.get("/metrics").text)["appliance_api_waiting_queries"] == 1,
        10,
        "the second search to wait for the slot",
    )
    release.set()
    for t in (thread, second):
        t.join(30)
    assert [r.status_code for r in out + waiting] == [200, 200]


def test_a_long_scan_waits_for_the_lane_and_is_503_when_it_stays_taken(
    tmp_path: Path, parquet_data: ParquetData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LONG_SCAN_ROWS a walk needs the worker's long-scan lane; while another long scan
    holds it for longer than api_max_wait_s the search is 503 (Retry-After), short searches are
    served meanwhile, and every walk gives the lane back however it ends."""
    for i in range(3000):
        parquet_data.post(f"filler {i}", t=T0_US + i * 1_000_000)
    parquet_data.flush()
    monkeypatch.setattr(engine_mod, "FIRST_WINDOW_ROWS", 64)
    monkeypatch.setattr(engine_mod, "LONG_SCAN_ROWS", 256)
    Sanic.test_mode = True
    server = Served(
        create_app(make_settings(tmp_path, api_max_wait_s=0.2, cache_entries=0)), free_port()
    )
    try:
        ready = server.get("/ready")
        assert ready.status_code == 200
        assert server.get("/v1/search?q=absent").status_code == 200  # the lane is free
        before = metric_values(server.get("/metrics").text)
        engine: QueryEngine = server.app.ctx.engine
        assert engine._long_lane.acquire(timeout=1)  # another long scan holds it
        try:
            refused = server.get("/v1/search?q=absent")
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert "long scans" in refused.json()["detail"]
            short = server.get("/v1/search?q=filler")  # a page full in the first window
            assert short.status_code == 200 and len(short.json()["posts"]) == 50
        finally:
            engine._long_lane.release()
        assert server.get("/v1/search?q=absent").status_code == 200
        values = _since(before, metric_values(server.get("/metrics").text))
        assert values['appliance_api_long_scans_total{outcome="refused"}'] == 1
        assert values['appliance_api_long_scans_total{outcome="run"}'] == 1
        assert values['appliance_api_rejected_total{reason="long_scan"}'] == 1
        assert engine._long_lane.acquire(blocking=False)  # given back after each walk
        engine._long_lane.release()
    finally:
        server.stop()
