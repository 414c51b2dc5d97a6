"""The ingester: unit checks of its pure parts, and process-level tests against a real redis-server.

Tests with the replay server live in tests/test_ingest_replay.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.protocol import Protocol, Side, State
from websockets.uri import parse_uri
from websockets.utils import accept_key

from appliance import buffer
from appliance.cli import build_parser
from appliance.config import Settings, to_environ
from appliance.ingest import command, frames, jetstream, writer
from tests.conftest import RedisProcess, free_port, make_settings, stop_process
from tests.helpers import client, http_get, metric, scrape, start_ingester, wait_until

# --- helpers shared with the replay tests ----------------------------------------------------------


def try_scrape(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        return scrape(settings)
    except (OSError, AssertionError):
        return None


# --- unit: URLs, backoff, validation, flags -------------------------------------------------------


def test_subscribe_url_carries_subscription_and_fresh_cursor() -> None:
    settings = make_settings(
        Path("/nonexistent"),
        wanted_collections=("app.bsky.feed.post", "app.bsky.graph.*"),
        wanted_dids=("did:plc:abcdefghijklmnopqrstuvwx",),
    )
    base = "wss://js.example/subscribe?compress=false&cursor=1&wantedDids=did:plc:old"
    url = jetstream.subscribe_url(base, settings, 1_782_864_000_000_000)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "js.example", "/subscribe")
    assert query["wantedCollections"] == ["app.bsky.feed.post", "app.bsky.graph.*"]
    assert query["wantedDids"] == ["did:plc:abcdefghijklmnopqrstuvwx"]
    assert query["cursor"] == ["1782864000000000"]  # replaced, not appended
    assert query["compress"] == ["false"]  # other parameters kept
    assert "maxMessageSizeBytes" not in query
    assert "cursor" not in parse_qs(urlsplit(jetstream.subscribe_url(base, settings, None)).query)


def test_display_url_drops_credentials_and_query() -> None:
    shown = jetstream.display_url("wss://user:secret@js.example:8443/subscribe?cursor=5&x=y")
    assert shown == "wss://js.example:8443/subscribe"


def test_backoff_is_exponential_jittered_and_capped() -> None:
    for attempt in range(1, 40):
        ceiling = min(1.0, jetstream.BACKOFF_BASE_S * 2 ** (attempt - 1))
        delays = [jetstream.backoff_delay(attempt, cap_s=1.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len({jetstream.backoff_delay(3, cap_s=1.0) for _ in range(20)}) > 1  # jittered


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"wanted_collections": ("not an nsid",)}, "not an NSID"),
        ({"wanted_collections": tuple(f"app.bsky.c{i}" for i in range(101))}, "at most 100"),
        ({"wanted_dids": ("alice",)}, "not a DID"),
    ],
)
def test_subscription_is_validated(overrides: dict[str, object], message: str) -> None:
    settings = make_settings(Path("/nonexistent"), **overrides)
    with pytest.raises(jetstream.SubscriptionError, match=message):
        jetstream.validate_subscription(settings)


def test_subscription_accepts_nsids_wildcards_and_dids() -> None:
    settings = make_settings(
        Path("/nonexistent"),
        wanted_collections=("app.bsky.feed.post", "app.bsky.graph.*", "chat.bsky.*"),
        wanted_dids=("did:plc:abcdefghijklmnopqrstuvwx", "did:web:example.com"),
    )
    jetstream.validate_subscription(settings)


@pytest.mark.parametrize("newline_in", [None, 0, 2])
def test_a_stream_entry_holds_its_frames_one_per_line(newline_in: int | None) -> None:
    """A frame with newline whitespace is kept as the same JSON, its newlines made spaces."""
    frames = [b'{"a": 1}', b'{"b": [1, 2]}', b'{"c": "x"}']
    if newline_in is not None:
        frames[newline_in] = frames[newline_in].replace(b" ", b"\n ")
    got = buffer.unpack(buffer.pack(frames))
    assert got == [f.replace(b"\n", b" ") for f in frames]
    assert buffer.pack(frames)[buffer.FIELD_COUNT] == b"3"


def test_redis_errors_are_classified() -> None:
    assert writer.redis_error_cause(OutOfMemoryError("OOM command not allowed")) == "oom"
    assert writer.redis_error_cause(ReadOnlyError("READONLY replica")) == "readonly"
    assert writer.redis_error_cause(RedisConnectionError("refused")) == "connection"
    assert writer.redis_error_cause(ResponseError("WRONGTYPE")) == "other"


def test_flags_override_urls_collections_and_dids() -> None:
    args = build_parser("ingest").parse_args(
        [
            "ingest",
            "--url",
            "ws://a/subscribe",
            "--url",
            "ws://b/subscribe",
            "--collections",
            "app.bsky.feed.post,app.bsky.feed.like",
            "--dids",
            "did:plc:abcdefghijklmnopqrstuvwx",
        ]
    )
    assert args.func is command.main
    assert args.set_jetstream_urls == ("ws://a/subscribe", "ws://b/subscribe")
    assert args.set_wanted_collections == ("app.bsky.feed.post", "app.bsky.feed.like")
    assert args.set_wanted_dids == ("did:plc:abcdefghijklmnopqrstuvwx",)


def test_bad_subscription_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    env = {**os.environ, **to_environ(settings)}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "ingest", "--collections", "no spaces allowed"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert b"not an NSID" in proc.stderr


# --- process: Redis and Jetstream unavailable ------------------------------------------------------


@pytest.fixture
def unreachable_settings(tmp_path: Path) -> Settings:
    """Settings whose Jetstream URL has nothing listening (connects fail)."""
    return make_settings(
        tmp_path,
        jetstream_urls=(
            f"ws://127.0.0.1:{free_port()}/subscribe",
            f"ws://127.0.0.1:{free_port()}/subscribe",
        ),
        reconnect_max_backoff_s=0.5,
        log_format="json",
    )


@pytest.fixture
def ingester_factory(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        proc = start_ingester(settings, tmp_path / "ingest.log", *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc, signal.SIGKILL)


def test_redis_down_at_start_opens_circuit_then_closes(
    unreachable_settings: Settings,
    ingester_factory: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    settings = unreachable_settings
    proc = ingester_factory(settings)
    wait_until(lambda: try_scrape(settings), 30, "the ingester's /metrics")
    wait_until(
        lambda: metric(scrape(settings), "appliance_ingest_circuit_open") == 1,
        10,
        "the circuit to open while Redis is down",
    )
    assert http_get(settings.ingest_port, "/health")[0] == 200
    status, body = http_get(settings.ingest_port, "/ready")
    assert status == 503 and b'"redis":false' in body
    assert metric(scrape(settings), "appliance_ingest_redis_errors_total", cause="connection") >= 1

    server = RedisProcess(settings)
    try:
        wait_until(
            lambda: metric(scrape(settings), "appliance_ingest_circuit_open") == 0,
            15,
            "the circuit to close once Redis answers",
        )
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_circuit_transitions_total", state="closed") == 1
        # Nothing listens at the Jetstream URLs: reconnects with backoff, failing over, not ready.
        wait_until(
            lambda: (
                metric(
                    scrape(settings), "appliance_ingest_reconnects_total", cause="connect_failed"
                )
                >= 3
            ),
            15,
            "repeated connect attempts",
        )
        status, body = http_get(settings.ingest_port, "/ready")
        assert status == 503 and b'"redis":true' in body and b'"websocket":false' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        server.stop()
    log = (tmp_path / "ingest.log").read_text()
    assert "circuit open" in log and "circuit closed" in log
    assert settings.redis_password not in log
    # both URLs were tried (failover)
    for url in settings.jetstream_urls:
        assert jetstream.display_url(url) in log


def test_sigterm_while_the_handshake_hangs_exits_promptly(
    tmp_path: Path, ingester_factory: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # A listener that accepts TCP connections but never answers the websocket handshake.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        url = f"ws://127.0.0.1:{blackhole.getsockname()[1]}/subscribe"
        settings = make_settings(tmp_path, jetstream_urls=(url,), log_format="json")
        server = RedisProcess(settings)
        try:
            proc = ingester_factory(settings)
            wait_until(lambda: try_scrape(settings), 30, "the ingester's /metrics")
            blackhole.settimeout(30)
            conn, _ = blackhole.accept()  # the ingester is now inside the handshake
            with conn:
                assert http_get(settings.ingest_port, "/ready")[0] == 503
                proc.send_signal(signal.SIGTERM)
                # it stops without sitting out the 10 s open timeout of the handshake
                assert proc.wait(8) == 0
        finally:
            server.stop()


@pytest.mark.parametrize("raw", [b"yesterday", b"1700000000"])
def test_a_corrupt_saved_cursor_stops_with_a_clear_error(
    tmp_path: Path, unreachable_settings: Settings, raw: bytes
) -> None:
    settings = unreachable_settings
    server = RedisProcess(settings)
    try:
        client(settings).set(settings.cursor_key, raw)
        env = {**os.environ, **to_environ(settings)}
        proc = subprocess.run(
            [sys.executable, "-m", "appliance", "ingest"], env=env, capture_output=True, timeout=60
        )
    finally:
        server.stop()
    assert proc.returncode == 2
    assert b"cannot resume" in proc.stdout and settings.cursor_key.encode() in proc.stdout


# --- the bulk frame reader -------------------------------------------------------------------------


class _Transport(asyncio.Transport):
    """Records what the connection writes; reading is driven by calling data_received."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False


def _server_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False)


def _client_frames(written: bytes) -> list[Frame]:
    """Parse what the client wrote after its handshake request, as a server would."""
    server = Protocol(Side.SERVER, state=State.OPEN)
    server.receive_data(written)
    return [e for e in server.events_received() if isinstance(e, Frame)]


def _open_frame_connection(
    max_size: int = 1 << 20,
) -> tuple[ClientProtocol, frames.FrameConnection, _Transport, bytes]:
    """A client FrameConnection on a fake transport, after its opening handshake request; also
    the server's 101 response to feed it."""
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1/subscribe"), max_size=max_size)
    conn = frames.FrameConnection(protocol, ping_interval=None)
    transport = _Transport()
    conn.connection_made(transport)
    request = protocol.connect()
    protocol.send_request(request)
    protocol.data_to_send()
    head = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(request.headers['Sec-WebSocket-Key'])}\r\n\r\n"
    ).encode()
    return protocol, conn, transport, head


@pytest.mark.parametrize("chunk", [1, 3, 130, 4096, 1 << 20])
def test_frame_connection_splits_frames_at_every_byte_boundary_and_keeps_the_protocol(
    chunk: int,
) -> None:
    """Frames split anywhere (socket reads of `chunk` bytes) come out whole and in order; pings
    are answered; fragmented messages (websockets' own parser) are assembled; a server close
    ends recv_frames cleanly."""

    async def scenario() -> None:
        protocol, conn, transport, head = _open_frame_connection()
        messages = [b"a", b"x" * 125, b"y" * 126, b"z" * 70_000, b'{"k": 1}', b""]
        messages[5:5] = [bytes([i]) * (126 + i) for i in range(5)]  # 16-bit lengths in a row
        messages += [b"b" * 65_535, b"c" * 300]
        wire = head + _server_frame(Opcode.TEXT, messages[0])
        wire += _server_frame(Opcode.PING, b"hi")
        wire += b"".join(_server_frame(Opcode.TEXT, m) for m in messages[1:3])
        wire += _server_frame(Opcode.BINARY, messages[3])
        wire += b"".join(_server_frame(Opcode.TEXT, m) for m in messages[4:8])
        wire += _server_frame(Opcode.PING, b"again")
        wire += b"".join(_server_frame(Opcode.BINARY, m) for m in messages[8:])
        for i in range(0, len(wire), chunk):
            conn.data_received(wire[i : i + chunk])
        assert protocol.state is State.OPEN
        got: list[bytes] = []
        while len(got) < len(messages):
            got += await asyncio.wait_for(conn.recv_frames(), 1)
        assert got == messages
        assert not transport.paused  # the reader took everything: reading resumed
        pongs = _client_frames(bytes(transport.written))
        assert [(f.opcode, f.data) for f in pongs] == [
            (Opcode.PONG, b"hi"),
            (Opcode.PONG, b"again"),
        ]

        # A fragmented message goes through websockets' parser, whole and in order.
        conn.data_received(
            _server_frame(Opcode.TEXT, b"frag", fin=False)
            + _server_frame(Opcode.CONT, b"ment")
            + _server_frame(Opcode.TEXT, b"after")
        )
        assert await asyncio.wait_for(conn.recv_frames(), 1) == [b"fragment", b"after"]

        # The server closes: the client answers the close, then recv_frames raises.
        transport.written.clear()
        conn.data_received(
            _server_frame(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize())
        )
        assert [f.opcode for f in _client_frames(bytes(transport.written))] == [Opcode.CLOSE]
        conn.connection_lost(None)
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(conn.recv_frames(), 1)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("first_byte_or", "second_byte_or"), [(0x40, 0), (0, 0x80)], ids=["rsv1", "masked"]
)
def test_frame_connection_fails_a_bad_16_bit_frame_with_1002_as_websockets_does(
    first_byte_or: int, second_byte_or: int
) -> None:
    """A frame with a 16-bit length and a reserved bit set, or masked, after good ones: the good
    frames come out, then the protocol error closes the connection (1002)."""

    async def scenario() -> None:
        _protocol, conn, transport, head = _open_frame_connection()
        bad = bytearray(_server_frame(Opcode.TEXT, b"q" * 200))
        bad[0] |= first_byte_or
        bad[1] |= second_byte_or
        if second_byte_or:
            bad[4:4] = b"\0\0\0\0"  # a masking key (zero: the payload is unchanged)
        good = [b"g" * 126, b"h" * 300]
        conn.data_received(head + b"".join(_server_frame(Opcode.TEXT, m) for m in good) + bad)
        assert await asyncio.wait_for(conn.recv_frames(), 1) == good
        closes = _client_frames(bytes(transport.written))
        assert [f.opcode for f in closes] == [Opcode.CLOSE]
        assert Close.parse(closes[0].data).code == CloseCode.PROTOCOL_ERROR

    asyncio.run(scenario())


def test_frame_connection_fails_an_oversized_frame_with_1009_as_websockets_does() -> None:
    async def scenario() -> None:
        _protocol, conn, transport, head = _open_frame_connection(max_size=1000)
        conn.data_received(
            head + _server_frame(Opcode.TEXT, b"ok") + _server_frame(Opcode.TEXT, b"x" * 1001)
        )
        assert await asyncio.wait_for(conn.recv_frames(), 1) == [b"ok"]
        closes = _client_frames(bytes(transport.written))
        assert [f.opcode for f in closes] == [Opcode.CLOSE]
        assert Close.parse(closes[0].data).code == CloseCode.MESSAGE_TOO_BIG

    asyncio.run(scenario())
