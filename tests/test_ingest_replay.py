"""The ingester end to end: the replay server → `appliance ingest` (a real subprocess) → redis-server.

Every test compares the natural keys in the Redis Stream buffer with the generator's: duplicates
are allowed (rewinds re-deliver), a missing key is not.
"""

from __future__ import annotations

import collections
import functools
import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

from appliance import buffer, events
from appliance.config import Settings
from appliance.store.layout import NaturalKey, natural_key
from loadtest.firehose import FirehoseConfig, generate_items
from tests.conftest import RedisProcess, ServerHandle, make_settings, stop_process
from tests.helpers import client, http_get, metric, scrape, start_ingester, wait_until

MAX_EVENT_BYTES = 20_000  # small, so oversized frames stay small too


# --- the stream as the generator made it -----------------------------------------------------------


class Expected:
    """Valid events of a generated stream, as the ingester should buffer them."""

    def __init__(self, keys: set[NaturalKey], last_us: int, rejected: int) -> None:
        self.keys = keys
        self.last_us = last_us
        self.rejected = rejected


def _matches(
    item_collection: str, item_did: str, collections: tuple[str, ...], dids: tuple[str, ...]
) -> bool:
    if dids and item_did not in dids:
        return False
    if not collections:
        return True
    if not item_collection:  # identity and account events pass any collection filter (Jetstream)
        return True
    return any(
        item_collection.startswith(c[:-1]) if c.endswith(".*") else item_collection == c
        for c in collections
    )


@functools.lru_cache(maxsize=16)
def expected(
    cfg: FirehoseConfig, collections: tuple[str, ...] = (), dids: tuple[str, ...] = ()
) -> Expected:
    keys: set[NaturalKey] = set()
    last = 0
    rejected = 0
    now = events.now_us()
    for item in generate_items(cfg):
        if not _matches(item.collection, item.did, collections, dids):
            continue
        try:
            event = events.decode(item.frame, now, MAX_EVENT_BYTES)
        except events.Rejected:
            rejected += 1
            continue
        keys.add(natural_key(event))
        last = max(last, event.time_us)
    return Expected(keys, last, rejected)


def buffered(settings: Settings) -> collections.Counter[NaturalKey]:
    """Natural keys of every event in the buffer (with their multiplicity)."""
    r = client(settings)
    out: collections.Counter[NaturalKey] = collections.Counter()
    start = "-"
    while True:
        entries = r.xrange(settings.stream_key, min=start, count=2000)
        if not entries:
            break
        for _, fields in entries:
            for frame in buffer.unpack(fields):
                out[natural_key(events.decode(frame, max_bytes=MAX_EVENT_BYTES))] += 1
        start = "(" + entries[-1][0].decode()
    r.close()
    return out


def saved_cursor(settings: Settings) -> int | None:
    try:
        raw = client(settings).get(settings.cursor_key)
    except redis.exceptions.ConnectionError:
        return None
    return int(raw) if raw is not None else None


def assert_none_lost(settings: Settings, want: Expected) -> collections.Counter[NaturalKey]:
    got = buffered(settings)
    missing = want.keys - set(got)
    assert not missing, (
        f"{len(missing)} of {len(want.keys)} events missing, e.g. {sorted(missing)[:3]}"
    )
    extra = set(got) - want.keys
    assert not extra, f"{len(extra)} events in the buffer that the stream lacks"
    assert saved_cursor(settings) == want.last_us
    return got


# --- processes -----------------------------------------------------------------------------------


def serve(
    jetstream_server: Callable[..., ServerHandle], cfg: FirehoseConfig, **flags: object
) -> ServerHandle:
    """The replay server (`loadtest serve`, via the shared fixture) serving `cfg`'s stream."""
    if cfg.malformed_fraction:
        flags["malformed"] = cfg.malformed_fraction
    if cfg.oversized_fraction:
        flags["oversized"] = cfg.oversized_fraction
        flags["oversized_bytes"] = cfg.oversized_bytes
    return jetstream_server(events=cfg.events, seed=cfg.seed, **flags)


class Ingesters:
    """Starts `appliance ingest` children; kills leftovers at teardown."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        proc = start_ingester(settings, self.log_path, *args)
        self.procs.append(proc)
        return proc

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def cleanup(self) -> None:
        for proc in self.procs:
            stop_process(proc, signal.SIGKILL)


@pytest.fixture
def ingesters(tmp_path: Path) -> Iterator[Ingesters]:
    out = Ingesters(tmp_path / "ingest.log")
    yield out
    out.cleanup()


def replay_settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "jetstream_urls": (url,),
        "stall_timeout_s": 2.0,
        "reconnect_max_backoff_s": 1.0,
        "ingest_flush_ms": 50,
        "max_event_bytes": MAX_EVENT_BYTES,
        "log_format": "json",
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


def wait_done(settings: Settings, want: Expected, timeout: float = 90) -> None:
    wait_until(lambda: saved_cursor(settings) == want.last_us, timeout, "the last event's cursor")


def stop_cleanly(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


# --- acceptance ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_replay_of_100k_events_buffers_every_one(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=11, events=100_000)
    server = serve(jetstream_server, cfg, preload=True)
    # Once the stream is exhausted the server stays silent: with the short stall timeout of the
    # other tests the ingester would reconnect (and count the rewound events again) while this
    # test reads the buffer back, and the counts below would race it.
    settings = replay_settings(tmp_path, server.url, stall_timeout_s=60.0)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    try:
        proc = ingesters.start(settings)
        third = cfg.start_us + (want.last_us - cfg.start_us) // 3
        wait_until(lambda: (saved_cursor(settings) or 0) > third, 60, "a third of the stream")
        assert http_get(settings.ingest_port, "/ready")[0] == 200
        wait_done(settings, want, timeout=120)
        # (its memory is measured by `loadtest bench ingest`: peak RSS, printed, not asserted)
        got = assert_none_lost(settings, want)
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_events_total") == sum(got.values())
        assert metric(samples, "appliance_ingest_cursor_time_us") == want.last_us
        assert metric(samples, "appliance_ingest_dead_letters_total") == 0
        assert metric(samples, "appliance_ingest_gaps_total") == 0
        # entries hold micro-batches, not single events
        assert client(settings).xlen(settings.stream_key) < len(want.keys) / 10
        stop_cleanly(proc)
    finally:
        redis_server.stop()


@pytest.mark.slow
def test_kill9_of_the_ingester_at_five_random_moments_loses_nothing(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=12, events=100_000)
    # Paced (about 20 s for the stream) so that all five kills land mid-stream even when the
    # machine is idle and the ingester would drain a --speed max server in a few seconds.
    server = serve(jetstream_server, cfg, preload=True, speed=50)
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    rng = random.Random(12)
    want = expected(cfg)
    try:
        cursors = []
        for _ in range(5):
            proc = ingesters.start(settings)
            before = saved_cursor(settings)
            wait_until(
                lambda before=before: saved_cursor(settings) != before, 30, "the ingester to write"
            )
            time.sleep(rng.uniform(0.05, 0.6))
            proc.kill()  # SIGKILL: no flush, no goodbye
            proc.wait(10)
            cursors.append(saved_cursor(settings))
        assert cursors[-1] is not None and cursors[-1] < want.last_us, "killed too late to matter"
        proc = ingesters.start(settings)
        wait_done(settings, want, timeout=120)
        assert_none_lost(settings, want)
        stop_cleanly(proc)
    finally:
        redis_server.stop()
    # every restart resumed from the saved cursor minus the rewind margin
    rewind = int(settings.cursor_rewind_s * 1_000_000)
    connects = [line for line in ingesters.log_lines() if line["msg"] == "connected"]
    resumed = [line["cursor"] for line in connects[1:]]
    assert all(c is not None for c in resumed)
    for cursor in cursors:
        assert cursor - rewind in resumed


@pytest.mark.slow
def test_kill9_of_redis_opens_and_closes_the_circuit_and_loses_nothing(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=13, events=60_000)
    server = serve(jetstream_server, cfg, preload=True)
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    try:
        proc = ingesters.start(settings)
        first = wait_until(lambda: saved_cursor(settings), 30, "the first write")
        wait_until(lambda: (saved_cursor(settings) or 0) > first, 30, "a later write")
        redis_server.kill9()
        wait_until(
            lambda: metric(scrape(settings), "appliance_ingest_circuit_open") == 1,
            10,
            "the circuit to open",
        )
        assert metric(scrape(settings), "appliance_ingest_connected") == 0  # not reading
        wait_until(
            lambda: (
                metric(scrape(settings), "appliance_ingest_redis_errors_total", cause="connection")
                >= 3
            ),
            30,
            "writes retried while Redis is down",
        )
        redis_server.restart()
        wait_done(settings, want)
        assert_none_lost(settings, want)
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_circuit_open") == 0
        assert metric(samples, "appliance_ingest_circuit_transitions_total", state="open") >= 1
        assert metric(samples, "appliance_ingest_circuit_transitions_total", state="closed") >= 1
        assert metric(samples, "appliance_ingest_redis_errors_total", cause="connection") >= 1
        stop_cleanly(proc)
    finally:
        redis_server.stop()


@pytest.mark.slow
def test_redis_at_maxmemory_pauses_without_eviction_and_resumes(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=14, events=60_000)
    server = serve(jetstream_server, cfg, preload=True)
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    r = client(settings)
    try:
        proc = ingesters.start(settings)
        wait_until(lambda: (saved_cursor(settings) or 0) > 0, 30, "the first write")
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", str(used + 2_000_000))
        wait_until(
            lambda: metric(scrape(settings), "appliance_ingest_circuit_open") == 1,
            30,
            "the circuit to open on OOM",
        )
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_redis_errors_total", cause="oom") >= 1
        # Near the limit, used_memory moves (buffers, AOF) and a retried write may rightly get
        # through; hold Redis firmly over its limit to watch the paused state.
        r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) // 2))

        def ooms() -> float:
            return metric(scrape(settings), "appliance_ingest_redis_errors_total", cause="oom")

        seen = ooms()
        wait_until(lambda: ooms() > seen, 30, "a write refused under the lower limit")
        length = r.xlen(settings.stream_key)
        seen = ooms()
        wait_until(lambda: ooms() >= seen + 2, 30, "two more refused retries")
        # paused: no websocket, nothing written, nothing evicted
        assert metric(scrape(settings), "appliance_ingest_connected") == 0
        assert metric(scrape(settings), "appliance_ingest_circuit_open") == 1
        assert r.xlen(settings.stream_key) == length
        assert saved_cursor(settings) is not None and saved_cursor(settings) < want.last_us
        assert int(r.info("stats")["evicted_keys"]) == 0
        r.config_set("maxmemory", "1gb")  # memory frees
        wait_done(settings, want)
        assert_none_lost(settings, want)
        assert int(r.info("stats")["evicted_keys"]) == 0
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_circuit_open") == 0
        assert metric(samples, "appliance_ingest_circuit_transitions_total", state="closed") >= 1
        stop_cleanly(proc)
    finally:
        r.close()
        redis_server.stop()


@pytest.mark.slow
def test_a_stall_reconnects_within_the_timeout_without_loss(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=15, events=30_000)
    stall_seconds = 60
    server = serve(jetstream_server, cfg, stall_at=[12000], stall_seconds=stall_seconds)
    settings = replay_settings(tmp_path, server.url, stall_timeout_s=1.0)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    try:
        proc = ingesters.start(settings)
        # done long before the stall would have ended: the stall metric below says why
        wait_done(settings, want, timeout=stall_seconds / 2)
        assert_none_lost(settings, want)
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_stalls_total") >= 1
        assert metric(samples, "appliance_ingest_reconnects_total", cause="stall") >= 1
        stop_cleanly(proc)
    finally:
        server.kill9()  # it would sit out its stall before honouring SIGTERM
        redis_server.stop()
    lines = ingesters.log_lines()
    stall = next(i for i, line in enumerate(lines) if str(line["msg"]).startswith("stall"))
    reconnect = next(line for line in lines[stall:] if line["msg"] == "connected")
    waited = _ts(reconnect) - _ts(lines[stall])
    assert waited <= settings.reconnect_max_backoff_s + 1.0


def _ts(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
def test_dropped_connections_reconnect_with_backoff_without_loss(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=16, events=30_000)
    server = serve(jetstream_server, cfg, drop_at=[5000, 15000, 25000])
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    try:
        proc = ingesters.start(settings)
        wait_done(settings, want)
        assert_none_lost(settings, want)
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_reconnects_total", cause="closed") >= 3
        stop_cleanly(proc)
    finally:
        redis_server.stop()
    drops = [line for line in ingesters.log_lines() if line["msg"] == "disconnected"]
    assert len(drops) >= 3
    assert all(
        0 < float(str(line["retry_in_s"])) <= settings.reconnect_max_backoff_s for line in drops
    )


def test_malformed_and_oversized_frames_are_dead_lettered_and_the_stream_continues(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(
        seed=17,
        events=20_000,
        malformed_fraction=0.01,
        oversized_fraction=0.002,
        oversized_bytes=3 * MAX_EVENT_BYTES,
    )
    server = serve(jetstream_server, cfg)
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    assert want.rejected > 100
    try:
        proc = ingesters.start(settings)
        wait_done(settings, want)
        assert_none_lost(settings, want)
        r = client(settings)
        dead = r.xrange(settings.dead_letter_key)
        reasons = collections.Counter(fields[b"reason"].decode() for _, fields in dead)
        assert sum(reasons.values()) >= want.rejected  # rewinds may repeat some
        assert set(reasons) <= set(events.REJECT_REASONS)
        assert reasons["oversized"] >= 1 and len(reasons) >= 3
        for _, fields in dead:
            assert len(fields[b"data"]) <= buffer.DEAD_LETTER_BYTES
            assert int(fields[b"size"]) >= len(fields[b"data"])
            if fields[b"reason"] == b"oversized":
                assert int(fields[b"size"]) > MAX_EVENT_BYTES
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_dead_letters_total") == len(dead)
        assert (
            metric(samples, "appliance_ingest_dead_letters_total", reason="oversized")
            == (reasons["oversized"])
        )
        r.close()
        stop_cleanly(proc)
    finally:
        redis_server.stop()


def test_wanted_collections_are_honoured(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=18, events=20_000)
    server = serve(jetstream_server, cfg)
    wanted = ("app.bsky.feed.post", "app.bsky.graph.*")
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg, collections=wanted)
    try:
        proc = ingesters.start(settings, "--collections", ",".join(wanted))
        wait_done(settings, want)
        got = assert_none_lost(settings, want)  # every matching event, and no other
        assert {key[1] for key in got} >= {"app.bsky.feed.post", "app.bsky.graph.follow"}
        stop_cleanly(proc)
    finally:
        redis_server.stop()


def test_wanted_dids_are_honoured(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=19, events=20_000)
    dids = tuple(sorted({item.did for item in generate_items(cfg) if item.collection})[:3])
    server = serve(jetstream_server, cfg)
    settings = replay_settings(tmp_path, server.url, wanted_dids=dids)
    redis_server = RedisProcess(settings)
    want = expected(cfg, dids=dids)
    assert want.keys
    try:
        proc = ingesters.start(settings)
        wait_done(settings, want)
        got = assert_none_lost(settings, want)
        assert {key[0] for key in got} <= set(dids)
        stop_cleanly(proc)
    finally:
        redis_server.stop()


def test_a_gap_beyond_the_rewind_is_recorded_not_hidden(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=20, events=5_000)
    server = serve(jetstream_server, cfg)
    settings = replay_settings(tmp_path, server.url, ingest_gap_tolerance_s=10.0)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    # A cursor 120 s before the server's first event: like an outage longer than the replay
    # window, the source skips ahead to the oldest event it still has.
    missed_from = cfg.start_us - 120_000_000
    client(settings).set(settings.cursor_key, str(missed_from))
    try:
        proc = ingesters.start(settings)
        wait_done(settings, want)
        samples = scrape(settings)
        assert metric(samples, "appliance_ingest_gaps_total") == 1
        assert metric(samples, "appliance_ingest_gap_seconds_total") == pytest.approx(120, abs=1)
        stop_cleanly(proc)
    finally:
        redis_server.stop()
    gaps = [line for line in ingesters.log_lines() if str(line["msg"]).startswith("gap")]
    assert len(gaps) == 1
    assert gaps[0]["level"] == "warning"
    assert gaps[0]["gap_from_time_us"] == missed_from
    assert gaps[0]["gap_to_time_us"] == cfg.start_us


def test_sigterm_flushes_and_a_restart_resumes_from_the_cursor_minus_the_rewind(
    tmp_path: Path, jetstream_server: Callable[..., ServerHandle], ingesters: Ingesters
) -> None:
    cfg = FirehoseConfig(seed=21, events=30_000)
    server = serve(jetstream_server, cfg)
    settings = replay_settings(tmp_path, server.url)
    redis_server = RedisProcess(settings)
    want = expected(cfg)
    try:
        proc = ingesters.start(settings)
        wait_until(lambda: (saved_cursor(settings) or 0) > 0, 30, "a first write")
        stop_cleanly(proc)
        stopped = [line for line in ingesters.log_lines() if line["msg"] == "stopped"][-1]
        # everything received was written before exit, and the cursor covers exactly that
        assert stopped["events_received"] == stopped["events_written"]
        assert sum(buffered(settings).values()) == stopped["events_written"]
        cursor = saved_cursor(settings)
        assert cursor == max(events.decode(f).time_us for f in _all_frames(settings))
        assert cursor is not None and cursor < want.last_us
        proc = ingesters.start(settings)
        wait_done(settings, want)
        assert_none_lost(settings, want)
        stop_cleanly(proc)
    finally:
        redis_server.stop()
    connects = [line for line in ingesters.log_lines() if line["msg"] == "connected"]
    assert connects[0]["cursor"] is None  # fresh buffer: from the start of the replay
    assert connects[1]["cursor"] == cursor - int(settings.cursor_rewind_s * 1_000_000)


def _all_frames(settings: Settings) -> Iterator[bytes]:
    r = client(settings)
    for _, fields in r.xrange(settings.stream_key):
        yield from buffer.unpack(fields)
    r.close()
