"""A websocket client connection that hands the received frames over in bulk (websockets 17).

Tied to websockets 17.x internals (pyproject pins <18): see `FrameConnection`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.frames import DATA_OPCODES, Frame
from websockets.protocol import Event, State

# Received frames (bytes) the connection holds before it pauses reading the socket.
WS_HELD_BYTES = 1 << 20
# A frame header with a 16-bit payload length: (FIN/RSV/opcode byte, mask/length byte), length.
_HEAD16 = struct.Struct(">HH")


class FrameConnection(ClientConnection):
    """A websocket client connection that hands over the received frames in bulk.

    websockets parses every frame in pure Python (a generator per frame) and queues it for one
    `await recv()` each: about 6 µs per small frame, half the ingester's CPU per event. Once the
    handshake is done, this connection splits the complete, unfragmented, unmasked text/binary
    frames of each socket read itself and `recv_frames()` returns all those received so far. Every
    other frame (ping, pong, close) is passed whole, at a frame boundary, to the websockets
    protocol, which answers pings and runs the closing handshake as before; anything unusual
    (fragmentation, reserved bits, masking, a frame over max_size) switches the connection back
    to websockets' own parsing for good, so its checks and errors (1002, 1009) apply unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = False  # splitting frames ourselves (handshake done, nothing unusual seen)
        self._passthrough = False  # everything goes to websockets' parser
        self._pending = bytearray()  # an incomplete frame (or, before the handshake, bytes)
        self._needed = 0  # bytes _pending must hold before parsing is worth trying
        self._frames: list[bytes] = []
        self._frames_bytes = 0
        self._fragments: list[bytes] = []
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False

    def data_received(self, data: bytes) -> None:
        if self._passthrough:
            super().data_received(data)
            return
        if not self._fast:
            self._handshake_data(data)
            return
        if self._pending:
            self._pending += data
            if len(self._pending) < self._needed:
                return
            data = bytes(self._pending)
            self._pending.clear()
        self._split(data)

    def _handshake_data(self, data: bytes) -> None:
        """Feed websockets exactly the HTTP response head; keep the frames after it."""
        self._pending += data
        end = self._pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self._pending) > 65536:  # not a response head we know: let websockets judge
                self._to_passthrough()
            return
        head = bytes(self._pending[: end + 4])
        rest = bytes(self._pending[end + 4 :])
        self._pending.clear()
        super().data_received(head)
        if self.protocol.state is State.OPEN:
            self._fast = True
            if rest:
                self._split(rest)
        else:
            self._passthrough = True
            if rest:
                super().data_received(rest)

    def _to_passthrough(self, rest: bytes = b"") -> None:
        self._passthrough = True
        self._fast = False
        data = bytes(self._pending) + rest
        self._pending.clear()
        if data:
            super().data_received(data)

    def _split(self, data: bytes) -> None:
        """Take the complete simple data frames of `data`; hand control frames to websockets."""
        frames = self._frames
        size = len(data)
        max_size = self.protocol.max_message_size
        start = 0
        taken = 0
        needed = 0  # the size of the incomplete frame at the end, once its header is there
        unpack_head = _HEAD16.unpack_from
        fast = max_size is None or max_size >= 0xFFFF
        while size - start >= 2:
            if fast:
                # The usual frame: final, unmasked text or binary, no reserved bits, a 16-bit
                # length. One header read each; any other frame takes the general path below.
                while size - start >= 4:
                    head, length = unpack_head(data, start)
                    if head != 0x817E and head != 0x827E:
                        break
                    end = start + 4 + length
                    if end > size:
                        break
                    frames.append(data[start + 4 : end])
                    taken += length
                    start = end
                if size - start < 2:
                    break
            b0 = data[start]
            b1 = data[start + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if size - start < 4:
                    break
                length = int.from_bytes(data[start + 2 : start + 4], "big")
                header = 4
            elif length == 127:
                if size - start < 10:
                    break
                length = int.from_bytes(data[start + 2 : start + 10], "big")
                header = 10
            opcode = b0 & 0x0F
            if (
                b1 & 0x80  # masked: servers must not mask
                or (b0 & 0x70)  # reserved bits
                or (opcode < 8 and (not b0 & 0x80 or opcode == 0))  # fragmented
                or (max_size is not None and length > max_size)
                or (opcode >= 8 and length > 125)
            ):
                self._deliver(taken)
                self._to_passthrough(data[start:])
                return
            end = start + header + length
            if end > size:
                needed = end - start
                break
            if opcode < 8:
                frames.append(data[start + header : end])
                taken += length
            else:
                self._deliver(taken)
                taken = 0
                super().data_received(data[start:end])  # ping, pong or close
                if self.protocol.state is not State.OPEN:
                    self._to_passthrough(data[end:])
                    return
            start = end
        self._deliver(taken)
        if start < size:
            self._pending += data[start:]
            self._needed = needed

    def process_event(self, event: Event) -> None:
        """websockets' parser's data frames (passthrough) join the same bulk queue."""
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            self._fragments.append(bytes(event.data))
            if event.fin:
                message = b"".join(self._fragments)
                self._fragments.clear()
                self._frames.append(message)
                self._deliver(len(message))
            return
        super().process_event(event)

    def _deliver(self, nbytes: int) -> None:
        """Wake the reader; pause the socket while too much is held."""
        self._frames_bytes += nbytes
        waiter = self._waiter
        if self._frames and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._frames_bytes >= WS_HELD_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv_frames(self) -> list[bytes]:
        """All frames received since the last call (at least one); ConnectionClosed at the end."""
        while not self._frames:
            if self._ended:
                await asyncio.shield(self.connection_lost_waiter)
                raise self.close_exc
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frames = self._frames
        self._frames = []
        self._frames_bytes = 0
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        return frames
