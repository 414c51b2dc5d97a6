"""The batcher against a real redis-server and real Parquet: exactly once, rewinds, deletes,
poison entries, trimming, disk full.

Helpers here (push, stored_digests, assert_stored_equals, drain) are shared with the crash and
compaction tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sanic_testing.reusable import ReusableClient

from appliance import buffer
from appliance.api.app import create_app
from appliance.batch import batcher as batch_mod
from appliance.batch import files, transform
from appliance.config import Settings
from appliance.store.manifest import read_manifest
from loadtest.firehose import FirehoseConfig, generate
from tests.conftest import RedisProcess, free_port, make_settings
from tests.helpers import (
    assert_stored_equals,
    drain,
    group_state,
    live_files,
    push,
    sample,
    sync_client,
    truth_of,
    visible_posts,
    wait_until,
)

# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def fast(tmp_path: Path) -> Settings:
    """Settings for a quick batcher: short interval, compaction off."""
    return make_settings(tmp_path, batch_interval_s=0.3, compact_auto=False)


@pytest.fixture
def redis_fast(fast: Settings) -> Iterator[RedisProcess]:
    server = RedisProcess(fast)
    yield server
    server.stop()


# --- tests -------------------------------------------------------------------------------------


def test_generated_events_land_exactly_once_in_their_day_partitions(
    tmp_path: Path, redis_fast: RedisProcess
) -> None:
    # 30k events over 1.5 days: two day partitions per table, several batches.
    settings = make_settings(
        tmp_path,
        redis_port=redis_fast.settings.redis_port,
        redis_password=redis_fast.settings.redis_password,
        batch_interval_s=0.3,
        batch_max_events=8000,
        compact_auto=False,
    )
    frames = list(generate(FirehoseConfig(seed=11, events=30_000, events_per_day=20_000)))
    truth = truth_of(frames)
    push(settings, frames)
    rows_before = sample("appliance_batch_rows_total", table="posts")
    drain(settings)

    assert_stored_equals(settings.data_dir, truth)
    assert {len(days) for days in truth.tables.values()} == {2}
    m = read_manifest(settings.data_dir)
    assert m.version >= 4  # one update per batch
    assert m.last_batch["rows"] and m.last_batch["stream"][0] <= m.last_batch["stream"][1]
    # Every live file is named by its batch's stream range and opens; nothing else is on disk.
    on_disk = sorted(Path(settings.data_dir).rglob("*.parquet"))
    assert on_disk == sorted(live_files(settings.data_dir))
    assert all(len(p.stem.split("_")) == 2 for p in on_disk)
    # Acknowledged entries are trimmed away.
    client = sync_client(settings)
    assert client.xlen(settings.stream_key) == 0
    client.close()
    assert sample("appliance_batch_rows_total", table="posts") - rows_before == truth.count("posts")


def test_a_rewind_in_a_later_batch_adds_no_duplicate_rows(
    fast: Settings, redis_fast: RedisProcess
) -> None:
    frames = list(generate(FirehoseConfig(seed=12, events=6_000)))
    push(fast, frames[:4_000])
    drain(fast)
    before = sample("appliance_batch_duplicates_total", scope="stored")
    # The ingester restarts with its cursor rewound: the last 1000 events come again.
    push(fast, frames[3_000:])
    drain(fast)
    assert_stored_equals(fast.data_dir, truth_of(frames))
    dropped = sample("appliance_batch_duplicates_total", scope="stored") - before
    assert dropped == truth_of(frames[3_000:4_000]).count()


def test_a_deleted_post_disappears_from_search_and_export_once_its_delete_is_batched(
    fast: Settings, redis_fast: RedisProcess
) -> None:
    # Invariant 4 (docs/architecture.md), end to end: files the batcher wrote, read by the real
    # engine and API.
    from tests.helpers import commit

    def post(i: int, text: str, rev: str, operation: str = "create") -> bytes:
        record = {"text": text, "createdAt": "2026-07-04T14:00:00Z"}
        return commit(record, rkey=f"3aaaaaaaaa{i:03d}", rev=rev, operation=operation)

    push(fast, [post(i, f"lighthouse p{i}", "3mptbypcq3aaa") for i in range(3)], per_entry=1)
    drain(fast)
    uris = visible_posts(fast.data_dir)
    assert len(uris) == 3
    deleted = sorted(uris)[0]
    rkey = deleted.rsplit("/", 1)[1]
    push(
        fast,
        [
            commit(None, rkey=rkey, rev="3mptbypcq3aaf", operation="delete"),
            post(1, "lighthouse p1 edited", "3mptbypcq3aag", operation="update"),
        ],
    )
    drain(fast)
    assert visible_posts(fast.data_dir) == uris - {deleted}

    client = ReusableClient(create_app(fast), port=free_port())
    client.run()
    try:
        _, response = client.get("/v1/search", params={"q": "lighthouse", "limit": 100})
        assert response.status_code == 200, response.text
        shown = {p["uri"]: p["text"] for p in response.json["posts"]}
        _, response = client.get("/v1/export", params={"q": "lighthouse", "format": "jsonl"})
        assert response.status_code == 200, response.text
        lines = response.text.splitlines()
        assert json.loads(lines.pop())["export"]["complete"] is True  # the summary line
        exported = {json.loads(line)["uri"] for line in lines}
    finally:
        client.stop()
    assert set(shown) == exported == uris - {deleted}
    assert sorted(shown.values()) == ["lighthouse p1 edited", "lighthouse p2"]


def test_a_poison_entry_goes_to_the_dead_letter_stream_and_blocks_nothing(
    tmp_path: Path, redis_proc: RedisProcess, settings: Settings
) -> None:
    settings = make_settings(
        tmp_path,
        redis_port=settings.redis_port,
        redis_password=settings.redis_password,
        batch_interval_s=0.2,
        batch_max_attempts=2,
        compact_auto=False,
    )
    frames = list(generate(FirehoseConfig(seed=13, events=300)))
    push(settings, frames[:100])
    client = sync_client(settings)
    # An entry that says 5 frames but holds 2: buffer.unpack raises on it, every time.
    poison_id = client.xadd(settings.stream_key, {b"n": b"5", b"d": frames[0] + b"\n" + frames[1]})
    client.close()
    push(settings, frames[100:])
    before = sample("appliance_batch_dead_letters_total", reason="batch_poison")
    drain(settings)

    assert_stored_equals(settings.data_dir, truth_of(frames))
    client = sync_client(settings)
    letters = client.xrange(settings.dead_letter_key)
    client.close()
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"reason"] == b"batch_poison" and fields[b"source"] == b"batch"
    assert poison_id in fields[b"detail"]
    assert sample("appliance_batch_dead_letters_total", reason="batch_poison") - before == 1
    assert group_state(settings) == (0, 0)


def test_a_frame_that_fails_validation_is_dead_lettered_and_its_entry_kept(
    fast: Settings, redis_fast: RedisProcess
) -> None:
    frames = list(generate(FirehoseConfig(seed=14, events=200)))
    push(fast, [*frames[:50], b'{"did":"nope","kind":"commit"}', *frames[50:]])
    drain(fast)
    assert_stored_equals(fast.data_dir, truth_of(frames))
    client = sync_client(fast)
    letters = client.xrange(fast.dead_letter_key)
    client.close()
    assert [f[b"source"] for _, f in letters] == [b"batch"]


def test_trimming_keeps_every_entry_not_yet_acknowledged(
    fast: Settings, redis_fast: RedisProcess
) -> None:
    frames = list(generate(FirehoseConfig(seed=15, events=1_000)))
    ids = push(fast, frames, per_entry=10)

    async def one_batch() -> None:
        client = buffer.connect(fast)
        batcher = batch_mod.Batcher(fast, client)
        await batcher.group.ensure()
        # Read 30 entries; leave 20 of them failed-looking (pending), 70 unread.
        reply = await client.xreadgroup(
            fast.consumer_group, fast.batch_consumer, {fast.stream_key: ">"}, count=30
        )
        entries = reply[0][1]
        b = transform.Batch("new")
        b.add_entries([(i.decode(), f) for i, f in entries[:10]])
        await batcher.flush(b)
        await client.aclose()

    asyncio.run(one_batch())
    client = sync_client(fast)
    remaining = [i.decode() for i, _ in client.xrange(fast.stream_key)]
    client.close()
    assert remaining == ids[10:]  # acknowledged entries gone; pending and unread kept


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (real ENOSPC), unmounted after the test.

    As root (as `make test` runs, in CI too) a failed mount fails the test: the disk-full
    behaviour must not go untested silently. Without root the test is skipped, with a warning.
    """
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        if os.geteuid() == 0:
            pytest.fail(f"{reason} (running as root: the disk-full tests need this)")
        warnings.warn(f"disk-full tests NOT run: {reason} (run as root)", stacklevel=1)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_fails_loudly_acknowledges_nothing_and_recovers(
    tmp_path: Path, tiny_disk: Path, redis_proc: RedisProcess, settings: Settings
) -> None:
    settings = make_settings(
        tmp_path,
        redis_port=settings.redis_port,
        redis_password=settings.redis_password,
        data_dir=str(tiny_disk / "data"),
        batch_interval_s=0.2,
        compact_auto=False,
    )
    filler = tiny_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)
    # Leave room for the first files of the batch, so it fails part way through writing.
    os.truncate(filler, filler.stat().st_size - 96 * 1024)
    frames = list(generate(FirehoseConfig(seed=16, events=3_000)))
    push(settings, frames)
    before = sample("appliance_batch_failures_total", cause="disk_full")

    async def scenario() -> None:
        client = buffer.connect(settings)
        batcher = batch_mod.Batcher(settings, client)
        task = asyncio.create_task(batcher.run())
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: sample("appliance_batch_failures_total", cause="disk_full") > before,
                10,
                "a disk_full failure counted",
            )
            ready, details = await batcher.ready()
            assert not ready and details["failing"] == "disk_full"
            assert sample("appliance_batch_failing") == 1
            # Nothing acknowledged, nothing visible, no temporary file left behind.
            assert (await asyncio.to_thread(group_state, settings))[0] == 30
            assert not list(Path(settings.data_dir).rglob("*.parquet"))
            assert not list(Path(settings.data_dir).rglob("*.tmp"))
            assert not read_manifest(settings.data_dir).files
            filler.unlink()  # space is back: the retry succeeds
            await asyncio.to_thread(
                wait_until, lambda: batcher.last_success, 10, "a successful batch"
            )
        finally:
            batcher.stop.set()
            await task
            await client.aclose()

    asyncio.run(scenario())
    assert group_state(settings) == (0, 0)
    assert sample("appliance_batch_failing") == 0
    assert_stored_equals(settings.data_dir, truth_of(frames))


def test_a_read_only_data_root_fails_loudly_and_recovers(
    tmp_path: Path, tiny_disk: Path, redis_proc: RedisProcess, settings: Settings
) -> None:
    settings = make_settings(
        tmp_path,
        redis_port=settings.redis_port,
        redis_password=settings.redis_password,
        data_dir=str(tiny_disk),
        batch_interval_s=0.2,
        compact_auto=False,
    )
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    frames = list(generate(FirehoseConfig(seed=18, events=500)))
    push(settings, frames)
    before = sample("appliance_batch_failures_total", cause="unwritable")

    async def scenario() -> None:
        client = buffer.connect(settings)
        batcher = batch_mod.Batcher(settings, client)
        task = asyncio.create_task(batcher.run())
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: sample("appliance_batch_failures_total", cause="unwritable") > before,
                10,
                "an unwritable failure counted",
            )
            assert batcher.failing == "unwritable"
            assert (await asyncio.to_thread(group_state, settings))[0] == 5
            await asyncio.to_thread(
                subprocess.run, ["mount", "-o", "remount,rw", str(tiny_disk)], check=True
            )
            await asyncio.to_thread(
                wait_until, lambda: batcher.last_success, 10, "a successful batch"
            )
        finally:
            batcher.stop.set()
            await task
            await client.aclose()

    asyncio.run(scenario())
    assert group_state(settings) == (0, 0)
    assert_stored_equals(settings.data_dir, truth_of(frames))


def test_a_redone_batch_overwrites_its_own_files(fast: Settings, redis_fast: RedisProcess) -> None:
    """A batch written (files + manifest) but never acknowledged is redone into the same files."""
    frames = list(generate(FirehoseConfig(seed=17, events=2_000)))
    push(fast, frames)

    async def write_without_ack() -> str:
        client = buffer.connect(fast)
        batcher = batch_mod.Batcher(fast, client)
        await batcher.group.ensure()
        b = await batcher.collect_new()
        await asyncio.to_thread(files.write_batch, fast, b, batcher.stored)
        await client.aclose()
        return b.name

    name = asyncio.run(write_without_ack())
    files_before = sorted(live_files(fast.data_dir))
    assert files_before and all(p.stem == name for p in files_before)
    drain(fast)  # the restart: own pending entries first, the same batch again
    assert sorted(live_files(fast.data_dir)) == files_before
    assert_stored_equals(fast.data_dir, truth_of(frames))


def test_main_rejects_an_unknown_crash_point(fast: Settings) -> None:
    import argparse

    bad = make_settings(Path(fast.data_dir).parent, batch_crash_at="sometimes")
    assert batch_mod.main(bad, argparse.Namespace()) == 2
