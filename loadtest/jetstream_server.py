"""A Jetstream v1 `/subscribe` websocket server over the synthetic firehose or recorded files.

Protocol (as the real Jetstream):

- `GET /subscribe` upgrades to a websocket; any other path is HTTP 404. Query parameters:
  `wantedCollections` (repeatable, NSIDs or `prefix.*`, at most 100; identity and account events
  always pass), `wantedDids` (repeatable, at most 10,000; applies to every kind), `cursor`
  (unix µs: replay every event whose time_us >= cursor, in source order; absent = from the start
  of the source, also when paced), `maxMessageSizeBytes` (larger events are skipped silently;
  0 = no limit). A bad value is HTTP 400 with a text body naming the parameter; so is
  `compress=true` (zstd compression is not implemented).
- Client text messages `{"type":"options_update","payload":{"wantedCollections":[...],
  "wantedDids":[...],"maxMessageSizeBytes":N}}` replace the filter mid-stream (an absent field
  means "all"). An invalid message is logged, counted in `stats.bad_client_messages` and ignored.
- Frames are sent as text messages, one event each, exactly the source bytes.
- When the source is exhausted the connection stays open and idle, like a live server with
  nothing new to say, until the client closes it or the server stops.

Pacing: `speed=None` (`--speed max`) sends as fast as the client reads (websocket write
back-pressure); a factor F sends event time_us deltas in real time divided by F. A gap in the
source longer than `max_gap_s` of paced wall time (`--max-gap`, default 5 s, below the
ingester's stall timeout) is compressed to `max_gap_s`, logged and counted
(`stats.gaps_compressed`, `stats.gap_seconds_skipped`), so a capture spanning days never looks
like a dead server.

Test hooks refer to a frame's position in the source (generator index, or line number across
recorded files), are checked when a connection's iteration reaches that position (whether or
not the event passes that connection's filter), and each fires ONCE per server process:

- `drop_at`: abort the TCP connection (no close frame) just before sending that event;
- `stall_at` + `stall_seconds`: send nothing for that long before that event (TCP and
  websocket pings stay alive);
- `bad_at`: send one malformed frame just before that event, alternating between "not JSON"
  and "JSON with a bad DID"; counted in `stats.bad_frames`.

At one position the order is: bad frame, stall, drop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from appliance.events import is_nsid
from loadtest import firehose
from loadtest.firehose import Item
from loadtest.sources import FileSource, GeneratorSource, PreloadedSource, Source

log = logging.getLogger("loadtest.serve")

MAX_WANTED_COLLECTIONS = 100
_BATCH = 64  # frames written to the socket at once at full speed
_HEAD16 = struct.Struct(">BBH").pack
_HEAD64 = struct.Struct(">BBQ").pack


def _text_head(frame: bytes) -> bytes:
    """The header of an unmasked, final text frame carrying `frame` (RFC 6455 5.2)."""
    n = len(frame)
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return _HEAD16(0x81, 126, n)
    return _HEAD64(0x81, 127, n)


MAX_WANTED_DIDS = 10_000
_NSID_PREFIX = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*(?:\.[a-zA-Z0-9-]+)*\.\*")
_DID = re.compile(r"did:[a-z]+:[A-Za-z0-9._:%-]{1,2048}")


# --- subscriber options ------------------------------------------------------------------------


class OptionsError(ValueError):
    """A subscriber option is invalid; the message names the parameter."""


@dataclass(frozen=True)
class Filter:
    """What one subscriber wants."""

    collections: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    dids: frozenset[str] = frozenset()
    max_size: int = 0

    @classmethod
    def build(cls, collections: Iterable[str], dids: Iterable[str], max_size: int | None) -> Filter:
        collections = list(collections)
        dids = list(dids)
        if len(collections) > MAX_WANTED_COLLECTIONS:
            raise OptionsError(f"wantedCollections: more than {MAX_WANTED_COLLECTIONS}")
        if len(dids) > MAX_WANTED_DIDS:
            raise OptionsError(f"wantedDids: more than {MAX_WANTED_DIDS}")
        exact, prefixes = set(), []
        for c in collections:
            if not isinstance(c, str):
                raise OptionsError("wantedCollections: not a string")
            if c.endswith(".*") and _NSID_PREFIX.fullmatch(c):
                prefixes.append(c[:-1])  # keep the dot: "app.bsky.*" -> "app.bsky."
            elif is_nsid(c):
                exact.add(c)
            else:
                raise OptionsError(f"wantedCollections: {c[:100]!r} is not an NSID or prefix.*")
        for d in dids:
            if not isinstance(d, str) or not _DID.fullmatch(d):
                raise OptionsError(f"wantedDids: {str(d)[:100]!r} is not a DID")
        if max_size is None:
            max_size = 0
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise OptionsError("maxMessageSizeBytes: not a non-negative integer")
        return cls(frozenset(exact), tuple(prefixes), frozenset(dids), max_size)

    def passes(self, item: Item) -> bool:
        if self.max_size and len(item.frame) > self.max_size:
            return False
        if self.dids and item.did not in self.dids:
            return False
        collection = item.collection
        if collection and (self.collections or self.prefixes):
            return collection in self.collections or collection.startswith(self.prefixes)
        return True


@dataclass(frozen=True)
class Subscription:
    filter: Filter
    cursor: int | None


def parse_query(query: str) -> Subscription:
    """Parse /subscribe query parameters; raise OptionsError naming a bad one."""
    params = parse_qs(query, keep_blank_values=True)
    for name in ("cursor", "maxMessageSizeBytes", "compress", "requireHello"):
        if len(params.get(name, [])) > 1:
            raise OptionsError(f"{name}: given more than once")
    cursor = None
    if "cursor" in params:
        text = params["cursor"][0]
        if not text.isdigit():
            raise OptionsError(f"cursor: {text[:40]!r} is not unix microseconds")
        cursor = int(text)
    max_size = 0
    if "maxMessageSizeBytes" in params:
        text = params["maxMessageSizeBytes"][0]
        if not text.isdigit():
            raise OptionsError(f"maxMessageSizeBytes: {text[:40]!r} is not a non-negative integer")
        max_size = int(text)
    if params.get("compress", ["false"])[0] not in ("", "false"):
        raise OptionsError("compress: zstd compression is not supported by this server")
    if params.get("requireHello", ["false"])[0] not in ("", "false"):
        raise OptionsError("requireHello: not supported by this server")
    flt = Filter.build(params.get("wantedCollections", []), params.get("wantedDids", []), max_size)
    return Subscription(flt, cursor)


class _OptionsPayload(msgspec.Struct, forbid_unknown_fields=True):
    wantedCollections: list[str] = msgspec.field(default_factory=list)
    wantedDids: list[str] = msgspec.field(default_factory=list)
    maxMessageSizeBytes: int = 0


class _ClientMessage(msgspec.Struct):
    type: str
    payload: _OptionsPayload


_client_decoder = msgspec.json.Decoder(_ClientMessage)


def parse_options_update(message: str | bytes) -> Filter:
    """A client `options_update` message -> the new Filter; raise OptionsError."""
    try:
        msg = _client_decoder.decode(message)
    except msgspec.DecodeError as exc:
        raise OptionsError(f"options_update: {exc}") from None
    if msg.type != "options_update":
        raise OptionsError(f"unknown message type {msg.type[:40]!r}")
    p = msg.payload
    return Filter.build(p.wantedCollections, p.wantedDids, p.maxMessageSizeBytes)


# --- the server ----------------------------------------------------------------------------------


@dataclass
class ServerStats:
    connections: int = 0
    frames: int = 0  # event frames sent, all connections
    bad_frames: int = 0
    drops: int = 0
    stalls: int = 0
    bad_client_messages: int = 0
    rejected_requests: int = 0
    gaps_compressed: int = 0
    gap_seconds_skipped: float = 0.0


_BAD_FRAMES = (
    b"this is not JSON {",
    b'{"did":"did:bad:NOT_A_DID","time_us":1782864000000000,"kind":"commit","commit":'
    b'{"rev":"3mptbypluud2a","operation":"delete","collection":"app.bsky.feed.like",'
    b'"rkey":"3mptbyplj5d2a"}}',
)


@dataclass
class _Hooks:
    drop_at: set[int] = field(default_factory=set)
    stall_at: set[int] = field(default_factory=set)
    bad_at: set[int] = field(default_factory=set)
    stall_seconds: float = 5.0

    def positions(self) -> set[int]:
        return self.drop_at | self.stall_at | self.bad_at


class ReplayServer:
    """Serve a Source as Jetstream v1 on host:port (0 = any free port).

    In-process use:

        async with ReplayServer(GeneratorSource(cfg)) as server:
            ... connect to server.url ...
    """

    def __init__(
        self,
        source: Source,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        speed: float | None = None,
        drop_at: Iterable[int] = (),
        stall_at: Iterable[int] = (),
        stall_seconds: float = 5.0,
        bad_at: Iterable[int] = (),
        max_gap_s: float = 5.0,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0 (or None for as fast as the client reads)")
        if stall_seconds < 0:
            raise ValueError("stall_seconds must be >= 0")
        if not max_gap_s > 0:
            raise ValueError("max_gap_s must be > 0")
        self.max_gap_s = max_gap_s
        self.source = source
        self.host = host
        self.port = port
        self.speed = speed
        self.hooks = _Hooks(set(drop_at), set(stall_at), set(bad_at), stall_seconds)
        self._hook_positions = self.hooks.positions()
        self.stats = ServerStats()
        self._server: Server | None = None
        self._subscriptions: dict[int, Subscription] = {}

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/subscribe"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression=None,  # Jetstream does not negotiate permessage-deflate
            max_size=1 << 20,  # client messages are small
            server_header=None,
        )
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != "/subscribe":
            self.stats.rejected_requests += 1
            return _text_response(connection, HTTPStatus.NOT_FOUND, "404 page not found\n")
        try:
            subscription = parse_query(parts.query)
        except OptionsError as exc:
            self.stats.rejected_requests += 1
            return _text_response(connection, HTTPStatus.BAD_REQUEST, f"{exc}\n")
        self._subscriptions[id(connection)] = subscription
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        subscription = self._subscriptions.pop(id(ws), None) or Subscription(Filter(), None)
        self.stats.connections += 1
        state = [subscription.filter]
        log.info("subscriber connected", extra={"peer": str(ws.remote_address)})
        reader = asyncio.create_task(self._read_client(ws, state))
        try:
            await self._send_events(ws, subscription.cursor, state)
            await ws.wait_closed()  # exhausted: stay open and idle, like a quiet live stream
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()
            log.info("subscriber gone", extra={"peer": str(ws.remote_address)})

    async def _read_client(self, ws: ServerConnection, state: list[Filter]) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                try:
                    state[0] = parse_options_update(message)
                except OptionsError as exc:
                    self.stats.bad_client_messages += 1
                    log.warning("ignored client message: %s", exc)

    async def _send_events(
        self, ws: ServerConnection, cursor: int | None, state: list[Filter]
    ) -> None:
        stats = self.stats
        speed = self.speed
        t0_event = t0_wall = 0.0
        batch: list[bytes] = []
        for item in self.source.items(cursor):
            if item.position in self._hook_positions:
                await self._flush(ws, batch)
                if not await self._fire_hooks(ws, item.position):
                    return
            if not state[0].passes(item):
                continue
            if speed is not None:
                if not t0_wall:
                    t0_event, t0_wall = item.time_us, time.monotonic()
                delay = t0_wall + (item.time_us - t0_event) / 1e6 / speed - time.monotonic()
                if delay > self.max_gap_s:
                    t0_wall -= delay - self.max_gap_s  # later events keep their spacing
                    self._compressed(delay)
                    delay = self.max_gap_s
                if delay > 0.001:
                    await self._flush(ws, batch)
                    await asyncio.sleep(delay)
            batch.append(item.frame)
            stats.frames += 1
            if len(batch) >= _BATCH:
                await self._flush(ws, batch)
        await self._flush(ws, batch)

    def _compressed(self, delay: float) -> None:
        self.stats.gaps_compressed += 1
        self.stats.gap_seconds_skipped += delay - self.max_gap_s
        log.info(
            "compressed a gap of %.1f s (paced) in the source to %.1f s (--max-gap)",
            delay,
            self.max_gap_s,
        )

    async def _flush(self, ws: ServerConnection, batch: list[bytes]) -> None:
        """Send the frames of `batch` (one websocket message each) and empty it.

        websockets' send() writes to the socket once per message (a syscall per ~500 B event);
        queuing a batch of messages in the (sans-I/O) protocol and writing their bytes at once
        is several times faster. Falls back to send() if the connection is not open (it raises
        the right error).
        """
        if not batch:
            return
        protocol = ws.protocol
        if protocol.state is State.OPEN and ws.send_in_progress is None:
            if protocol.extensions:
                for frame in batch:
                    protocol.send_text(frame)
                chunks = protocol.data_to_send()
            else:
                # What send_text() would queue, without building a Frame object per message
                # (2-3 µs of this server's CPU each, on the cores the client under test uses):
                # a server frame is unmasked and, without extensions, the header is fixed.
                chunks = protocol.data_to_send()  # anything queued first (a pong) goes first
                chunks.append(b"".join([part for f in batch for part in (_text_head(f), f)]))
            if all(chunks):
                ws.transport.write(b"".join(chunks))
            else:
                # An empty chunk means "half-close" (a close handshake is under way): leave it
                # to websockets, as its send_data() does.
                for chunk in chunks:
                    if chunk:
                        ws.transport.write(chunk)
                    elif ws.transport.can_write_eof():
                        ws.transport.write_eof()
                    else:
                        ws.transport.close()
            await ws.drain()
        else:
            for frame in batch:
                await ws.send(frame, text=True)
        batch.clear()
        # drain() does not yield while the write buffer has room: let the client's messages
        # (options_update) and other connections in.
        await asyncio.sleep(0)

    async def _fire_hooks(self, ws: ServerConnection, position: int) -> bool:
        """Run the hooks due at this position (once per process); False if the connection is
        gone."""
        hooks = self.hooks
        if position in hooks.bad_at:
            hooks.bad_at.discard(position)
            frame = _BAD_FRAMES[self.stats.bad_frames % len(_BAD_FRAMES)]
            self.stats.bad_frames += 1
            log.info("hook: bad frame before position %d", position)
            await ws.send(frame, text=True)
        if position in hooks.stall_at:
            hooks.stall_at.discard(position)
            self.stats.stalls += 1
            log.info("hook: stall %.1f s before position %d", hooks.stall_seconds, position)
            await asyncio.sleep(hooks.stall_seconds)
        if position in hooks.drop_at:
            hooks.drop_at.discard(position)
            self.stats.drops += 1
            log.info("hook: drop before position %d", position)
            # Let what was sent before this event reach the socket, then drop without a close.
            for _ in range(500):
                if not ws.transport.get_write_buffer_size():
                    break
                await asyncio.sleep(0.01)
            ws.transport.abort()
            return False
        self._hook_positions = hooks.positions()
        return True


def _text_response(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    return connection.respond(status, body)  # text/plain; charset=utf-8


# --- command line ----------------------------------------------------------------------------------


def _positions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of indexes"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: positions are >= 0")
    return values


def speed_arg(text: str) -> float | None:
    """A --speed value: 'max' (None: as fast as the client reads) or a factor > 0."""
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed {text!r}: 'max' or a factor > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--speed {text!r}: 'max' or a factor > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6008, help="port (0 = any free port)")
    parser.add_argument(
        "--from",
        dest="files",
        nargs="+",
        metavar="FILE",
        help="serve recorded JSON-lines files (plain or .zst; a directory = its files in name "
        "order) instead of the generator",
    )
    firehose.add_generator_arguments(parser, events_required=False)
    parser.add_argument(
        "--speed",
        type=speed_arg,
        default=None,
        help="'max' (as fast as the client reads; default) or a factor of real time",
    )
    parser.add_argument(
        "--max-gap",
        type=float,
        default=5.0,
        help="paced replays (--speed F) idle at most this many seconds on a gap in the source "
        "(default 5)",
    )
    parser.add_argument(
        "--preload", action="store_true", help="render every frame into memory before listening"
    )
    parser.add_argument(
        "--drop-at", type=_positions, default=[], metavar="I[,I...]",
        help="abort the TCP connection just before the event at these source positions (once)",
    )  # fmt: skip
    parser.add_argument(
        "--stall-at", type=_positions, default=[], metavar="I[,I...]",
        help="send nothing for --stall-seconds before these positions (once)",
    )  # fmt: skip
    parser.add_argument(
        "--stall-seconds", type=float, default=5.0, help="length of a stall (default 5)"
    )
    parser.add_argument(
        "--bad-at", type=_positions, default=[], metavar="I[,I...]",
        help="send a malformed frame just before these positions (once)",
    )  # fmt: skip


def build_source(args: argparse.Namespace) -> Source:
    if args.files:
        if args.events is not None:
            raise SystemExit("loadtest serve: give --events or --from, not both")
        source: Source = FileSource(args.files)
    else:
        if args.events is None:
            raise SystemExit("loadtest serve: give --events N (synthetic) or --from FILE...")
        source = GeneratorSource(firehose.config_from_args(args))
    if args.preload:
        started = time.perf_counter()
        source = PreloadedSource(source)
        log.info(
            "preloaded %d frames in %.1f s",
            len(source.frames),
            time.perf_counter() - started,
        )
    return source


async def _serve(args: argparse.Namespace) -> int:
    source = build_source(args)
    server = ReplayServer(
        source,
        args.host,
        args.port,
        speed=args.speed,
        drop_at=args.drop_at,
        stall_at=args.stall_at,
        stall_seconds=args.stall_seconds,
        bad_at=args.bad_at,
        max_gap_s=args.max_gap,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"listening {server.url}", flush=True)
        await stop.wait()
    log.info("stopped: %s", server.stats)
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        return asyncio.run(_serve(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"loadtest serve: {exc}", file=sys.stderr)
        return 2
