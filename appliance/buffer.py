"""The Redis Stream hand-off between the ingester and the batcher.

One stream entry carries a micro-batch of validated Jetstream frames, exactly as received:
fields `n` (event count) and `d` (the frames joined by b"\\n"). A valid JSON frame can hold a raw
newline only as insignificant whitespace (control characters inside strings are escaped), so the
ingester replaces such bytes with spaces before joining. The ingester's cursor is written with
the entry in one MULTI/EXEC, so the saved cursor never runs ahead of the buffered data.

Rejected frames go to a separate dead-letter stream with their reason and (capped) bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from appliance.config import Settings

FIELD_COUNT = b"n"
FIELD_DATA = b"d"
DEAD_LETTER_BYTES = 8192  # bytes of a rejected frame kept for inspection


def connect(settings: Settings, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for the buffer (returns bytes, never decodes)."""
    return aioredis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        password=settings.redis_password or None,
        decode_responses=False,
        **kwargs,
    )


def pack(frames: Sequence[bytes]) -> dict[bytes, bytes]:
    """Stream entry fields for a micro-batch of frames."""
    # One memchr over the frames is ~4x cheaper than counting the newlines after joining them.
    if b"\n" in b"".join(frames):  # rare: a frame had newline whitespace
        frames = [f.replace(b"\n", b" ") for f in frames]
    data = b"\n".join(frames)
    return {FIELD_COUNT: str(len(frames)).encode(), FIELD_DATA: data}


def unpack(fields: dict[bytes, bytes]) -> list[bytes]:
    """The frames of one stream entry; raises ValueError if the entry is not ours or torn."""
    data = fields.get(FIELD_DATA)
    count = fields.get(FIELD_COUNT)
    if data is None or count is None:
        raise ValueError("stream entry lacks the n/d fields")
    frames = data.split(b"\n") if data else []
    if len(frames) != int(count):
        raise ValueError(f"stream entry says {int(count)} frames but holds {len(frames)}")
    return frames


def queue_append(
    pipe: Pipeline, settings: Settings, frames: Sequence[bytes], cursor_us: int
) -> None:
    """Queue XADD of one micro-batch and SET of the cursor on a transactional pipeline."""
    pipe.xadd(settings.stream_key, pack(frames))  # type: ignore[arg-type]
    pipe.set(settings.cursor_key, str(cursor_us))


def queue_dead_letter(
    pipe: Pipeline, settings: Settings, reason: str, frame: bytes, source: str, detail: str = ""
) -> None:
    """Queue one rejected frame on the dead-letter stream (approximately capped in length)."""
    pipe.xadd(
        settings.dead_letter_key,
        {
            b"reason": reason.encode(),
            b"source": source.encode(),
            b"detail": detail[:500].encode(),
            b"size": str(len(frame)).encode(),
            b"data": frame[:DEAD_LETTER_BYTES],
        },
        maxlen=settings.dead_letter_maxlen,
        approximate=True,
    )


async def read_cursor(client: aioredis.Redis, settings: Settings) -> int | None:
    """The saved ingester cursor (time_us), or None on a fresh buffer."""
    raw = await client.get(settings.cursor_key)
    return int(raw) if raw is not None else None
