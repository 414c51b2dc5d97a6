"""Acceptance end to end: the replay server → `appliance ingest` → redis-server →
`appliance batch` → Parquet, compared with the generator's ground truth, with a kill -9 of the
ingester (its restart rewinds the cursor, so events arrive twice) and of the batcher on the way.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from appliance.cli import main as cli_main
from appliance.config import Settings
from appliance.query.engine import QueryEngine
from appliance.store import layout
from loadtest.firehose import FirehoseConfig, ground_truth, time_at
from tests.conftest import RedisProcess, ServerHandle, make_settings, stop_process
from tests.helpers import (
    all_keys,
    assert_all_parquet_files_open,
    assert_stored_equals,
    group_state,
    live_files,
    start_batcher,
    start_ingester,
    sync_client,
    visible_posts,
    wait_until,
)


def saved_cursor(settings: Settings) -> int | None:
    client = sync_client(settings)
    try:
        raw = client.get(settings.cursor_key)
    except redis.exceptions.ConnectionError:
        return None
    finally:
        client.close()
    return int(raw) if raw is not None else None


@pytest.mark.slow
def test_a_replay_of_200k_events_lands_in_parquet_exactly_once(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle]
) -> None:
    # 200k events over 1.33 days of stream time: two partitions per table.
    cfg = FirehoseConfig(seed=41, events=200_000, events_per_day=150_000)
    server = jetstream_server(
        events=cfg.events, seed=cfg.seed, per_day=cfg.events_per_day, preload=True
    )
    settings = make_settings(
        tmp_path,
        jetstream_urls=(server.url,),
        stall_timeout_s=2.0,
        reconnect_max_backoff_s=1.0,
        ingest_flush_ms=50,
        batch_interval_s=1.0,
        batch_max_events=40_000,
        compact_auto=False,  # compared with the ground truth first, compacted below
        log_format="json",
    )
    truth = ground_truth(cfg)
    last_us = time_at(cfg, cfg.events - 1)
    redis_server = RedisProcess(settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ingester = start_ingester(settings, tmp_path / "ingest.log")
        batcher = start_batcher(settings, tmp_path / "batch.log")
        procs += [ingester, batcher]
        # kill -9 both services part way; their restarts must lose and duplicate nothing.
        wait_until(lambda: (saved_cursor(settings) or 0) > time_at(cfg, 60_000), 120, "ingest")
        ingester.send_signal(signal.SIGKILL)
        ingester.wait(10)
        ingester = start_ingester(settings, tmp_path / "ingest.log")
        procs.append(ingester)
        wait_until(lambda: (saved_cursor(settings) or 0) > time_at(cfg, 120_000), 120, "ingest")
        batcher.send_signal(signal.SIGKILL)
        batcher.wait(10)
        batcher = start_batcher(settings, tmp_path / "batch.log")
        procs.append(batcher)
        wait_until(lambda: saved_cursor(settings) == last_us, 180, "the last event's cursor")

        def drained() -> bool:
            assert batcher.poll() is None, "the batcher exited"
            return group_state(settings) == (0, 0)

        wait_until(drained, 180, "the batcher to drain the stream", interval=0.2)
        for proc in (ingester, batcher):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            stop_process(proc, signal.SIGKILL)
        redis_server.stop()

    data = Path(settings.data_dir)
    assert_stored_equals(data, truth)  # every table and day: same keys, none twice
    assert_all_parquet_files_open(data)
    assert set(data.rglob("*.parquet")) == set(live_files(data))  # no orphan, no leftover
    # Deleted posts: hidden by the rule, and physically gone once their day is compacted.
    assert truth.deleted_post_uris
    stored_posts = {uri for uri, _ in all_keys(data, "posts")}
    visible = visible_posts(data)
    assert visible == stored_posts - truth.deleted_post_uris
    # What the API's engine counts (/v1/stats) is what was sent, each event once.
    engine = QueryEngine(Settings(data_dir=str(data), result_limit=False))
    try:
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["events"] == truth.count() and stats["posts"] == truth.count("posts")
    first_day = live_files(data, "posts")[0].parent.name.removeprefix("date=")
    assert cli_main(["compact", "--day", first_day, "--data-dir", str(data)]) == 0
    day_posts = [p for p in live_files(data, "posts") if first_day in str(p)]
    assert len(day_posts) == 1 and day_posts[0].name.startswith(layout.COMPACTED_PREFIX)
    compacted = set(layout.uri_array("posts", pq.read_table(day_posts[0])).to_pylist())
    assert compacted and compacted.isdisjoint(truth.deleted_post_uris)
    assert visible_posts(data) == visible
