"""The Jetstream replay server: protocol, filters, cursor, options_update, pacing and hooks."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from appliance import events as ev
from loadtest import firehose as fh
from loadtest.firehose import Item
from loadtest.jetstream_server import ReplayServer, _text_head
from loadtest.sources import FileSource, GeneratorSource, PreloadedSource, Source

NOW = 1_900_000_000_000_000


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_the_servers_frame_header_is_what_websockets_would_send(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert _text_head(data) + data == Frame(Opcode.TEXT, data).serialize(mask=False)


async def take(ws: ClientConnection, n: int, timeout: float = 20.0) -> list[bytes]:
    out = []
    for _ in range(n):
        frame = await asyncio.wait_for(ws.recv(decode=False), timeout)
        assert isinstance(frame, bytes)
        out.append(frame)
    return out


async def silent(ws: ClientConnection, seconds: float = 0.5) -> bool:
    """True if nothing arrives for `seconds` (the stream is exhausted, the socket open)."""
    try:
        await asyncio.wait_for(ws.recv(decode=False), seconds)
    except TimeoutError:
        return ws.state is State.OPEN
    return False


def serve(source: Source, body: Callable[[ReplayServer], Awaitable[Any]], **kwargs: Any) -> Any:
    async def main() -> Any:
        async with ReplayServer(source, **kwargs) as server:
            return await body(server)

    return asyncio.run(main())


def items(cfg: fh.FirehoseConfig) -> list[Item]:
    return list(fh.generate_items(cfg))


# --- the subprocess (CLI) server -----------------------------------------------------------


def test_cli_server_sends_the_generated_stream_then_idles(jetstream_server: Any) -> None:
    server = jetstream_server(events=300, seed=5)
    expected = list(fh.generate(fh.FirehoseConfig(seed=5, events=300)))

    async def client() -> tuple[list[bytes], bool]:
        async with connect(server.url, max_size=None) as ws:
            return await take(ws, 300), await silent(ws, 1.0)

    got, idle = asyncio.run(client())
    assert got == expected
    assert idle  # exhausted: open and quiet, like a live stream with nothing new


def test_cli_drop_hook_aborts_once_and_cursor_resumes(jetstream_server: Any) -> None:
    cfg = fh.FirehoseConfig(seed=6, events=1000)
    frames = list(fh.generate(cfg))
    server = jetstream_server(events=1000, seed=6, drop_at=[500])

    async def client() -> tuple[list[bytes], int | None, list[bytes]]:
        got: list[bytes] = []
        code = None
        async with connect(server.url, max_size=None) as ws:
            try:
                while True:
                    got.append(await asyncio.wait_for(ws.recv(decode=False), 10))  # type: ignore[arg-type]
            except ConnectionClosedError as exc:
                code = exc.rcvd.code if exc.rcvd else None
        cursor = fh.time_at(cfg, len(got) - 1)
        async with connect(f"{server.url}?cursor={cursor}", max_size=None) as ws:
            resumed = await take(ws, 1000 - len(got) + 1)
            assert await silent(ws)
        return got, code, resumed

    got, code, resumed = asyncio.run(client())
    assert got == frames[:500]  # everything before event 500, then the TCP connection died
    assert code is None  # no close frame: an abrupt drop
    assert resumed == frames[499:]  # inclusive cursor; the hook does not fire twice


def test_cli_stall_hook_keeps_the_connection_silent(jetstream_server: Any) -> None:
    frames = list(fh.generate(fh.FirehoseConfig(seed=7, events=400)))
    server = jetstream_server(events=400, seed=7, stall_at=[200], stall_seconds=2)

    async def client() -> tuple[list[bytes], bool]:
        async with connect(server.url, max_size=None) as ws:
            first = await take(ws, 200)
            # nothing during (the first half of) the stall, then the rest
            quiet = await silent(ws, 1.0)
            rest = await take(ws, 200)
            return first + rest, quiet

    got, quiet = asyncio.run(client())
    assert got == frames
    assert quiet


def test_cli_bad_frame_hook_injects_counted_malformed_frames(jetstream_server: Any) -> None:
    frames = list(fh.generate(fh.FirehoseConfig(seed=8, events=100)))
    server = jetstream_server(events=100, seed=8, bad_at=[10, 20])

    async def client() -> tuple[list[bytes], list[bytes]]:
        async with connect(server.url, max_size=None) as ws:
            first = await take(ws, 102)
        async with connect(server.url, max_size=None) as ws:
            again = await take(ws, 100)
            assert await silent(ws)
        return first, again

    first, again = asyncio.run(client())
    bad1, bad2 = first[10], first[21]
    assert first[:10] + first[11:21] + first[22:] == frames
    reasons = []
    for bad in (bad1, bad2):
        with pytest.raises(ev.Rejected) as caught:
            ev.decode(bad, now=NOW)
        reasons.append(caught.value.reason)
    assert reasons == ["invalid_json", "bad_did"]
    assert again == frames  # each hook fires once per server process


# --- filters, cursor, options (in process) ---------------------------------------------------


def test_collection_filters_exact_and_wildcard() -> None:
    cfg = fh.FirehoseConfig(seed=21, events=4000)
    expected = [
        i.frame
        for i in items(cfg)
        if i.collection == ""  # identity and account always pass
        or i.collection == "app.bsky.feed.post"
        or i.collection.startswith("app.bsky.graph.")
    ]
    query = "?wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*"

    async def body(server: ReplayServer) -> tuple[list[bytes], bool]:
        async with connect(server.url + query, max_size=None) as ws:
            return await take(ws, len(expected)), await silent(ws)

    got, idle = serve(GeneratorSource(cfg), body)
    assert got == expected and idle
    kinds = {msgspec.json.decode(f)["kind"] for f in got}
    assert kinds == {"commit", "identity", "account"}


def test_did_filter_applies_to_every_kind() -> None:
    cfg = fh.FirehoseConfig(seed=22, events=4000)
    all_items = items(cfg)
    counts: dict[str, int] = {}
    for i in all_items:
        counts[i.did] = counts.get(i.did, 0) + 1
    dids = sorted(counts, key=counts.__getitem__)[-3:]
    expected = [i.frame for i in all_items if i.did in dids]
    query = "?" + "&".join(f"wantedDids={d}" for d in dids)

    async def body(server: ReplayServer) -> tuple[list[bytes], bool]:
        async with connect(server.url + query, max_size=None) as ws:
            return await take(ws, len(expected)), await silent(ws)

    got, idle = serve(GeneratorSource(cfg), body)
    assert got == expected and idle and len(got) >= 10


def test_max_message_size_skips_larger_events_silently() -> None:
    cfg = fh.FirehoseConfig(seed=23, events=1500, oversized_fraction=0.01)
    all_items = items(cfg)
    big = [i for i in all_items if len(i.frame) > 1_000_000]
    assert big
    small = [i.frame for i in all_items if len(i.frame) <= 1_000_000]

    async def body(server: ReplayServer) -> tuple[list[bytes], list[bytes]]:
        async with connect(server.url + "?maxMessageSizeBytes=1000000", max_size=None) as ws:
            limited = await take(ws, len(small))
            assert await silent(ws)
        async with connect(server.url + "?maxMessageSizeBytes=0", max_size=None) as ws:
            unlimited = await take(ws, len(all_items))
        return limited, unlimited

    limited, unlimited = serve(GeneratorSource(cfg), body)
    assert limited == small
    assert unlimited == [i.frame for i in all_items]


def test_cursor_replays_exactly_from_an_instant() -> None:
    cfg = fh.FirehoseConfig(seed=24, events=3000)
    frames = [i.frame for i in items(cfg)]

    async def body(server: ReplayServer) -> dict[int, list[bytes]]:
        out = {}
        for start in (1234, 2999):
            cursor = fh.time_at(cfg, start)
            async with connect(f"{server.url}?cursor={cursor}", max_size=None) as ws:
                out[start] = await take(ws, 3000 - start)
                assert await silent(ws, 0.3)
            async with connect(f"{server.url}?cursor={cursor + 1}", max_size=None) as ws:
                out[start + 1] = await take(ws, 3000 - start - 1)
                assert await silent(ws, 0.3)
        async with connect(f"{server.url}?cursor={cfg.start_us - 10**9}", max_size=None) as ws:
            out[0] = await take(ws, 3000)
        return out

    got = serve(GeneratorSource(cfg), body)
    for start, received in got.items():
        assert received == frames[start:], start
        if received:
            assert msgspec.json.decode(received[0])["time_us"] >= fh.time_at(cfg, start)


def test_options_update_changes_the_filter_mid_stream() -> None:
    cfg = fh.FirehoseConfig(seed=25, events=20_000)
    all_items = items(cfg)
    frames = [i.frame for i in all_items]
    wanted = {"app.bsky.feed.post"}

    def passes(i: Item) -> bool:
        return i.collection == "" or i.collection in wanted

    update = msgspec.json.encode(
        {"type": "options_update", "payload": {"wantedCollections": sorted(wanted)}}
    )

    async def body(server: ReplayServer) -> list[bytes]:
        got: list[bytes] = []
        async with connect(server.url, max_size=None) as ws:
            got += await take(ws, 100)
            await ws.send(b"{not an update", text=True)  # ignored, counted
            await ws.send(update, text=True)
            with contextlib.suppress(TimeoutError):
                while True:  # until the stream is exhausted
                    got.append(await asyncio.wait_for(ws.recv(decode=False), 0.5))  # type: ignore[arg-type]
        assert server.stats.bad_client_messages == 1
        return got

    got = serve(GeneratorSource(cfg), body)
    # Unfiltered frames up to some point m, then exactly the filtered rest of the stream.
    # m is at most the first position where got and the unfiltered stream differ.
    prefix = next((k for k, (a, b) in enumerate(zip(got, frames, strict=False)) if a != b), None)
    assert prefix is not None and prefix >= 100
    switch = next(
        (
            m
            for m in range(prefix, 99, -1)
            if got[m:] == [i.frame for i in all_items[m:] if passes(i)]
        ),
        None,
    )
    assert switch is not None, "received stream is not 'unfiltered prefix + filtered rest'"
    assert len(got) - switch > 1000  # the filter took effect long before the end


def test_bad_requests_get_http_errors() -> None:
    cfg = fh.FirehoseConfig(seed=26, events=10)
    cases = {
        "/other": (404, ""),
        "/subscribe?wantedCollections=not_an_nsid": (400, "wantedCollections"),
        "/subscribe?wantedCollections=app.*.post": (400, "wantedCollections"),
        "/subscribe?wantedDids=alice": (400, "wantedDids"),
        "/subscribe?cursor=yesterday": (400, "cursor"),
        "/subscribe?cursor=-5": (400, "cursor"),
        "/subscribe?maxMessageSizeBytes=-1": (400, "maxMessageSizeBytes"),
        "/subscribe?compress=true": (400, "compress"),
    }

    async def body(server: ReplayServer) -> dict[str, tuple[int, str]]:
        out = {}
        base = server.url.removesuffix("/subscribe")
        for path in cases:
            with pytest.raises(InvalidStatus) as caught:
                async with connect(base + path):
                    pass
            response = caught.value.response
            out[path] = (response.status_code, response.body.decode())
        return out

    got = serve(GeneratorSource(cfg), body)
    for path, (status, word) in cases.items():
        assert got[path][0] == status, path
        assert word in got[path][1], path


def test_speed_factor_follows_time_us() -> None:
    # one event per second of stream time, served 10x faster: 20 s of stream in about 2 s
    cfg = fh.FirehoseConfig(seed=27, events=21, events_per_day=86_400)

    async def body(server: ReplayServer) -> float:
        async with connect(server.url, max_size=None) as ws:
            await take(ws, 1)
            started = time.monotonic()
            await take(ws, 20)
            return time.monotonic() - started

    elapsed = serve(GeneratorSource(cfg), body, speed=10.0)
    # never ahead of the schedule (how closely it follows it is a figure for the benchmarks)
    assert elapsed >= 1.8


def test_recorded_files_are_served_with_the_same_filters_and_cursor(tmp_path: Path) -> None:
    cfg = fh.FirehoseConfig(seed=28, events=3000)
    all_items = items(cfg)
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"".join(i.frame + b"\n" for i in all_items[:1000]))
    packed = tmp_path / "b.jsonl.zst"
    packed.write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(i.frame + b"\n" for i in all_items[1000:]))
    )
    cursor = fh.time_at(cfg, 900)
    query = f"?cursor={cursor}&wantedCollections=app.bsky.feed.*"
    expected = [
        i.frame
        for i in all_items[900:]
        if i.collection == "" or i.collection.startswith("app.bsky.feed.")
    ]

    async def body(server: ReplayServer) -> tuple[list[bytes], list[bytes]]:
        async with connect(server.url, max_size=None) as ws:
            everything = await take(ws, 3000)
        async with connect(server.url + query, max_size=None) as ws:
            filtered = await take(ws, len(expected))
            assert await silent(ws)
        return everything, filtered

    for source in (FileSource([plain, packed]), PreloadedSource(FileSource([tmp_path]))):
        everything, filtered = serve(source, body)
        assert everything == [i.frame for i in all_items]
        assert filtered == expected


def test_preloaded_generator_serves_the_same_frames() -> None:
    cfg = fh.FirehoseConfig(seed=29, events=2000)
    cursor = fh.time_at(cfg, 700)

    async def body(server: ReplayServer) -> list[bytes]:
        async with connect(f"{server.url}?cursor={cursor}", max_size=None) as ws:
            return await take(ws, 1300)

    preloaded = PreloadedSource(GeneratorSource(cfg))
    assert serve(preloaded, body) == [i.frame for i in items(cfg)][700:]


def test_missing_files_and_bad_cli_arguments_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileSource([tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError):
        ReplayServer(GeneratorSource(fh.FirehoseConfig()), speed=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], b"--events"),
        (["--events", "10", "--from", "x.jsonl"], b"not both"),
        (["--from", "/nonexistent/x.jsonl"], b"no such file"),
        (["--events", "10", "--speed", "fast"], b"--speed"),
        (["--events", "10", "--drop-at", "1,x"], b"--drop-at"),
    ],
)
def test_cli_serve_reports_bad_arguments(args: list[str], message: bytes) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "serve", "--port", "0", *args],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr
