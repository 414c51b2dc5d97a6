"""Search cursors: the position after a page's last row, signed and pinned to its query."""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec

from appliance.query.model import Filters, InvalidQuery, Position


class _CursorBody(msgspec.Struct, array_like=True):
    fingerprint: bytes
    time_us: int
    uri: str
    delivered: int  # rows returned before the cursor, for the result-limit cap


class CursorCodec:
    """Opaque keyset cursors, HMAC-signed so a tampered one is refused, pinned to one query."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret

    def encode(self, filters: Filters, after: Position, delivered: int) -> str:
        body = msgspec.msgpack.encode(
            _CursorBody(filters.fingerprint(), after.time_us, after.uri, delivered)
        )
        tag = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + tag).decode().rstrip("=")

    def decode(self, token: str, filters: Filters) -> tuple[Position, int]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError as exc:
            raise InvalidQuery("cursor", "not a cursor returned by this API") from exc
        body, tag = raw[:-16], raw[-16:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        if len(raw) <= 16 or not hmac.compare_digest(tag, expected):
            raise InvalidQuery("cursor", "not a cursor returned by this API (or it was altered)")
        parsed = msgspec.msgpack.decode(body, type=_CursorBody)
        if parsed.fingerprint != filters.fingerprint():
            raise InvalidQuery("cursor", "belongs to a different query; repeat its parameters")
        return Position(parsed.time_us, parsed.uri), parsed.delivered
