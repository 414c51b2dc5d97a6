"""The Jetstream replay server: protocol, filters, cursor, options_update, pacing and hooks."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect

from loadtest import firehose as fh


async def _receive(url: str, n: int, timeout: float = 20.0) -> list[bytes]:
    async with connect(url, max_size=None) as ws:
        return [await asyncio.wait_for(ws.recv(decode=False), timeout) for _ in range(n)]


def test_subprocess_server_sends_the_generated_stream(jetstream_server) -> None:
    server = jetstream_server(events=300, seed=5)
    got = asyncio.run(_receive(server.url, 300))
    assert got == list(fh.generate(fh.FirehoseConfig(seed=5, events=300)))
