"""Both halves of the Redis Stream hand-off against a real redis-server: the producer's entry
format and the consumer group's read, claim, acknowledge and trim (appliance/buffer.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from appliance import buffer
from appliance.buffer import ConsumerGroup
from appliance.config import Settings
from tests.conftest import RedisProcess
from tests.helpers import sync_client

T = TypeVar("T")


def test_an_entry_carries_its_frames_and_a_torn_entry_is_refused() -> None:
    frames = [b'{"a":1}', b'{"b":\n2}', b"{}"]
    fields = buffer.pack(frames)
    assert fields[buffer.FIELD_COUNT] == b"3"
    assert buffer.unpack(fields) == [b'{"a":1}', b'{"b": 2}', b"{}"]  # newline whitespace
    with pytest.raises(ValueError, match="says 4 frames but holds 3"):
        buffer.unpack({**fields, buffer.FIELD_COUNT: b"4"})
    with pytest.raises(ValueError, match="lacks the n/d fields"):
        buffer.unpack({b"x": b"y"})


@pytest.fixture
def redis_server(settings: Settings) -> Iterator[RedisProcess]:
    server = RedisProcess(settings)
    yield server
    server.stop()


def run(settings: Settings, body: Callable[..., Awaitable[T]]) -> T:
    async def main() -> T:
        client = buffer.connect(settings)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def add(settings: Settings, n: int) -> list[str]:
    r = sync_client(settings)
    ids = [r.xadd(settings.stream_key, buffer.pack([b"{}"])).decode() for _ in range(n)]  # type: ignore[arg-type]
    r.close()
    return ids


def test_entries_stay_pending_until_acknowledged_and_go_to_dead_letters_with_it(
    settings: Settings, redis_server: RedisProcess
) -> None:
    ids = add(settings, 5)

    async def body(client: Any) -> None:
        group = ConsumerGroup(client, settings, "c1")
        await group.ensure()
        await group.ensure()  # exists already: fine
        got = await group.read_new(count=3, block_ms=100)
        assert [i for i, _ in got] == ids[:3]
        assert await group.read_pending("0", 100) == got  # delivered, not acknowledged
        assert await group.times_delivered(ids[0]) == 2  # read, then read again as pending
        assert await group.times_delivered(ids[4]) == 0  # never delivered
        assert await group.oldest_unacked() == (3, ids[0])
        await group.ack(ids[:2], [("bad_did", b"frame", "detail")])
        assert [i for i, _ in await group.read_pending("0", 100)] == [ids[2]]
        assert await group.read_pending(ids[2], 100) == []  # nothing after the last pending

    run(settings, body)
    r = sync_client(settings)
    dead = r.xrange(settings.dead_letter_key)
    r.close()
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"bad_did"
    assert dead[0][1][b"source"] == b"batch" and dead[0][1][b"data"] == b"frame"


def test_trim_keeps_everything_not_yet_acknowledged(
    settings: Settings, redis_server: RedisProcess
) -> None:
    ids = add(settings, 6)

    async def body(client: Any) -> tuple[list[str], list[str], Any]:
        group = ConsumerGroup(client, settings, "c1")
        await group.ensure()
        await group.read_new(count=4, block_ms=100)
        await group.ack([ids[0], ids[2]])  # ids[1] and ids[3] stay pending
        await group.trim()
        after_pending = [i.decode() for i, _ in await client.xrange(settings.stream_key)]
        await group.ack([ids[1], ids[3]])
        await group.trim()  # nothing pending: below the first unread entry
        after_acked = [i.decode() for i, _ in await client.xrange(settings.stream_key)]
        return after_pending, after_acked, await group.oldest_unacked()

    after_pending, after_acked, oldest = run(settings, body)
    assert after_pending == ids[1:]  # trimmed below the oldest pending entry only
    assert after_acked == ids[4:]  # the unread entries are kept
    assert oldest == (0, ids[4])


def test_a_second_consumer_claims_the_entries_a_dead_one_left_pending(
    settings: Settings, redis_server: RedisProcess
) -> None:
    ids = add(settings, 3)

    async def body(client: Any) -> tuple[str, list[str], list[str]]:
        dead = ConsumerGroup(client, settings, "dead")
        await dead.ensure()
        await dead.read_new(count=3, block_ms=100)
        await client.xdel(settings.stream_key, ids[1])  # deleted before acknowledgement
        alive = ConsumerGroup(client, settings, "alive")
        start, claimed, deleted = await alive.claim("0-0", idle_ms=0, count=10)
        return start, [i for i, _ in claimed], deleted

    start, claimed, deleted = run(settings, body)
    assert start == "0-0"  # done in one call
    assert claimed == [ids[0], ids[2]]
    assert deleted == [ids[1]]
