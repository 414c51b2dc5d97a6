"""`loadtest replay`: a seeded 200k-event replay through the whole stack with every kind of
fault passes verification; the verifier notices a loss; the fault plan is reproducible; a paced
replay compresses a gap in its source."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import websockets

from appliance.config import Settings
from appliance.events import now_us
from loadtest.firehose import FirehoseConfig
from loadtest.jetstream_server import ReplayServer
from loadtest.replay import faults as fl
from loadtest.replay import report, source, verify
from loadtest.replay.monitor import Sample
from loadtest.sources import FileSource
from tests.conftest import REPO_ROOT, RedisProcess, make_settings
from tests.helpers import drain, push, sync_client

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="disk-full mounts a tmpfs: needs root")
def test_a_seeded_200k_replay_with_every_fault_kind_passes_verification(tmp_path: Path) -> None:
    report = tmp_path / "report"
    # 200k events over 1.33 days of stream time (two days per table), paced to about a minute
    # so that the 22 faults (one at a time, each until recovered) fall while data flows.
    argv = [sys.executable, "-m", "loadtest", "replay", "--scale", "200000", "--per-day",
            "150000", "--seed", "3", "--speed", "2000", "--faults", fl.ALL_FAULTS,
            "--report", str(report), "--work", str(tmp_path / "work"), "--cache",
            str(tmp_path / "cache"), "--progress", "lines"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, timeout=580)
    out = done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    assert done.returncode == 0, out
    figures = json.loads((report / "report.json").read_text())
    assert figures["verified"] is True and figures["problems"] == [], out
    assert figures["events_generated"] == 200_000
    assert figures["events_stored"] == figures["events_valid"] > 199_000
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    injected = {f["kind"] for f in figures["faults"]}
    assert injected == set(fl.COUNTED), figures["faults"]
    assert len(figures["faults"]) == 22
    assert all(f["recovered"] for f in figures["faults"])
    oom = next(f for f in figures["faults"] if f["kind"] == "redis-oom")
    assert "circuit opened" in oom["detail"]
    disk = next(f for f in figures["faults"] if f["kind"] == "disk-full")
    assert "failed loudly" in disk["detail"]
    assert figures["rejects"]["found"] == figures["rejects"]["expected"]
    assert sum(figures["rejects"]["expected"].values()) > 100  # bad-frames:0.001 of 200k
    assert figures["processes"]["ingester"]["restarts_by_faults"] == 5
    assert figures["processes"]["redis"]["restarts_by_faults"] == 2
    assert all(q["ok"] for q in figures["query_latencies"])
    assert {q["query"] for q in figures["query_latencies"] if q["expected"]} >= {
        "common word",
        "rare word",
        "lang",
        "tag",
        "date range",
    }
    assert figures["deleted_posts_checked"] > 0 and figures["deleted_posts_visible"] == 0
    # ingest lag on the replay's clock: seconds, not the months since the stream's time_us
    lag = figures["ingest_lag"]["parquet_behind_ingester_s"]
    assert 0 <= lag["median"] <= lag["max"] < figures["wall_s"], figures["ingest_lag"]
    for chart in ("throughput", "ingest_lag", "redis_memory", "batch_durations", "process_rss",
                  "query_latency"):  # fmt: skip
        assert (report / f"{chart}.png").read_bytes()[:8] == PNG
    assert "Verification **passed**" in (report / "report.md").read_text()


def test_the_verifier_reports_an_event_that_was_not_stored(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, batch_interval_s=0.2, compact_auto=False)
    redis_server = RedisProcess(settings)
    try:
        _check_a_loss(tmp_path, settings)
    finally:
        redis_server.stop()


def _check_a_loss(tmp_path: Path, settings: Settings) -> None:
    cfg = FirehoseConfig(seed=5, events=3000, events_per_day=2000)
    capture, expect, cached = source.synthetic(cfg, tmp_path / "cache", jobs=1, chunk=1000)
    assert not cached
    assert source.synthetic(cfg, tmp_path / "cache", jobs=1)[2]  # the second time: cached
    push(settings, list(source.frames_of([capture])))
    drain(settings)
    data = Path(settings.data_dir)
    good = verify.Verification()
    verify.check_storage(data, expect, good)
    assert verify.conclude(good).verified, good.problems
    # One more valid event in the source than in storage: found, by table and day.
    frames = list(source.frames_of([capture]))
    commit = next(f for f in frames if b'"kind":"commit"' in f)
    first = commit.split(b'"did":"did:plc:', 1)[1][:1]
    other = b"b" if first == b"a" else b"a"  # the same event by another DID: a new key
    frames.append(commit.replace(b'"did":"did:plc:' + first, b'"did":"did:plc:' + other, 1))
    queries = [c.query for c in expect.searches]
    bigger = source.finish("test", source.scan(frames, queries, now_us()), queries)
    bad = verify.Verification()
    verify.check_storage(data, bigger, bad)
    assert not verify.conclude(bad).verified
    assert bad.lost == 1 and bad.duplicates == 0
    assert [t.table for t in bad.tables if t.days_mismatched] != []


def test_fault_plans_are_seeded_and_specs_are_checked() -> None:
    spec = fl.parse_faults(fl.ALL_FAULTS)
    assert spec.bad_frames == 0.001 and spec.counts["kill-batcher"] == 5
    assert fl.plan(spec, 7) == fl.plan(spec, 7) != fl.plan(spec, 8)
    assert len(fl.plan(spec, 7)) == 22
    assert all(fl.EARLIEST <= p.at <= fl.LATEST for p in fl.plan(spec, 7))
    for bad in ("kill-everything:1", "stall", "stall:-1", "bad-frames:2", "drop:x"):
        with pytest.raises(ValueError, match="--faults"):
            fl.parse_faults(bad)
    assert source.parse_scale("week", 100) == 700 and source.parse_scale("1_000") == 1000
    with pytest.raises(ValueError, match="--scale"):
        source.parse_scale("fortnight")


def test_a_paced_replay_compresses_a_long_gap_in_its_source(tmp_path: Path) -> None:
    # Two events a day apart: at 10x real time that would be 2.4 hours of silence.
    t0 = 1_782_864_000_000_000
    lines = [
        json.dumps({"did": "did:plc:" + "a" * 24, "time_us": t, "kind": "identity",
                    "identity": {"did": "did:plc:" + "a" * 24, "seq": i, "time": "x"}})
        for i, t in enumerate((t0, t0 + 86_400_000_000))
    ]  # fmt: skip
    path = tmp_path / "gap.jsonl"
    path.write_text("\n".join(lines) + "\n")

    async def run() -> tuple[float, int, float]:
        server = ReplayServer(FileSource([path]), speed=10.0, max_gap_s=0.5)
        async with server, websockets.connect(server.url) as ws:
            await ws.recv()
            began = time.monotonic()
            await ws.recv()
            took = time.monotonic() - began
        return took, server.stats.gaps_compressed, server.stats.gap_seconds_skipped

    took, compressed, skipped = asyncio.run(run())
    assert took < 5.0
    assert compressed == 1 and skipped > 8000


def test_a_reconnect_deep_into_a_rendered_capture_seeks_to_its_frame(tmp_path: Path) -> None:
    cfg = FirehoseConfig(seed=9, events=5000, events_per_day=4000)
    capture, _, _ = source.synthetic(cfg, tmp_path, jobs=1, chunk=1000)
    files = FileSource([capture])
    assert len(files.seek) == 5 and files.seek[3].position == 3000
    everything = list(FileSource([capture]).items(None))
    cursor = everything[3456].time_us
    assert list(files.items(cursor)) == [i for i in everything if i.time_us >= cursor]
    assert next(iter(files.items(everything[10].time_us))) == everything[10]


def test_a_full_buffer_is_still_acknowledged_and_trimmed(tmp_path: Path) -> None:
    # Above maxmemory Redis refuses whatever is queued inside MULTI, XACK included: the
    # batcher must still acknowledge and trim, or the buffer stays full for good.
    settings = make_settings(tmp_path, batch_interval_s=0.2, compact_auto=False)
    redis_server = RedisProcess(settings)
    try:
        cfg = FirehoseConfig(seed=4, events=2000)
        capture, _, _ = source.synthetic(cfg, tmp_path / "cache", jobs=1)
        client = sync_client(settings)
        push(settings, list(source.frames_of([capture])))
        client.xgroup_create(settings.stream_key, settings.consumer_group, id="0")
        client.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            client.set("probe", "x")
        drain(settings, timeout=60)
        assert client.xlen(settings.stream_key) == 0
        client.close()
    finally:
        redis_server.stop()


def test_the_ingest_lag_is_measured_on_the_replays_own_clock() -> None:
    """How many seconds earlier the ingester had received what Parquet holds now."""
    counts = [(0, 0), (100, 0), (200, 100), (300, 100), (300, 300), (400, 300)]
    samples = [Sample(t=float(i), received=r, stored=s) for i, (r, s) in enumerate(counts)]
    assert report.storage_lag(samples) == [None, None, 1.0, 2.0, 1.0, 2.0]
    # the direct path has no ingester: no such lag, rather than a made-up one
    direct = [Sample(t=float(i), stored=100.0 * i) for i in range(4)]
    assert report.storage_lag(direct) == [None] * 4


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_the_disk_full_fault_fills_its_volume_to_the_last_page(tmp_path: Path) -> None:
    with fl.tmpfs(tmp_path / "volume", 8 << 20) as volume:
        (volume / "data").write_bytes(b"x" * 100_000)  # what the batcher had written
        size = fl.fill(volume / "filler")
        assert shutil.disk_usage(volume).free < 4096
        assert (8 << 20) - 200_000 < size < 8 << 20
        (volume / "filler").unlink()
        assert shutil.disk_usage(volume).free >= size  # all of it back
