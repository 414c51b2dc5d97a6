"""kill -9 of the batcher process at each step of a batch: after a restart nothing is lost,
nothing is stored twice, and every *.parquet file opens.

The kill is deterministic: APPLIANCE_BATCH_CRASH_AT names the point where the batcher sends
itself SIGKILL (appliance/store/crash.py CRASH_POINTS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import msgspec
import pytest

from appliance.config import Settings
from appliance.store.manifest import read_manifest
from loadtest.firehose import FirehoseConfig, generate
from tests.conftest import RedisProcess, make_settings, stop_process
from tests.helpers import (
    assert_all_parquet_files_open,
    assert_stored_equals,
    group_state,
    live_files,
    push,
    start_batcher,
    truth_of,
    wait_until,
)


def wait_drained(settings: Settings, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    def drained() -> bool:
        assert proc.poll() is None, f"batcher exited with {proc.returncode}"
        return group_state(settings) == (0, 0)

    wait_until(drained, timeout, "the batcher to drain the stream", interval=0.1)


@pytest.fixture
def crash_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, batch_interval_s=0.3, batch_max_events=1_000, compact_auto=False)


@pytest.fixture
def crash_redis(crash_settings: Settings) -> RedisProcess:
    server = RedisProcess(crash_settings)
    yield server  # type: ignore[misc]
    server.stop()


@pytest.mark.parametrize("point", ["before_write", "mid_write", "after_rename", "after_manifest"])
def test_kill9_during_a_batch_loses_nothing_and_duplicates_nothing(
    point: str, crash_settings: Settings, crash_redis: RedisProcess, tmp_path: Path
) -> None:
    settings = crash_settings
    frames = list(generate(FirehoseConfig(seed=21, events=3_000)))
    push(settings, frames)
    log = tmp_path / "batcher.log"

    crashed = start_batcher(settings, log, crash_at=point)
    assert crashed.wait(60) == -signal.SIGKILL, log.read_text()[-2000:]
    pending, _ = group_state(settings)
    assert pending == 10  # the first batch (1000 events = 10 entries) was read, not acknowledged
    data = Path(settings.data_dir)
    on_disk = list(data.rglob("*.parquet"))
    if point == "before_write":
        assert not on_disk
    elif point == "mid_write":
        assert on_disk and list(data.rglob(".*.tmp"))  # a torn temporary file is left behind
        assert not live_files(data)
    elif point == "after_rename":
        assert on_disk and not live_files(data)
    else:
        assert sorted(on_disk) == sorted(live_files(data))

    restarted = start_batcher(settings, log)
    try:
        wait_drained(settings, restarted)
    finally:
        stop_process(restarted)
    assert restarted.returncode == 0

    assert_stored_equals(data, truth_of(frames))
    assert_all_parquet_files_open(data)
    # The redo wrote the same names: no orphan file beside the live ones, no temp file left.
    assert sorted(data.rglob("*.parquet")) == sorted(live_files(data))
    assert not list(data.rglob(".*.tmp"))


def test_the_service_serves_probes_and_exits_cleanly_on_sigterm(
    crash_settings: Settings, crash_redis: RedisProcess, tmp_path: Path
) -> None:
    settings = crash_settings
    frames = list(generate(FirehoseConfig(seed=22, events=500)))
    push(settings, frames)
    log = tmp_path / "batcher.log"
    proc = start_batcher(settings, log)
    try:
        wait_drained(settings, proc)
        base = f"http://127.0.0.1:{settings.batch_port}"

        def get_ready() -> dict[str, object]:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as resp:
                return dict(json.loads(resp.read()))

        ready = wait_until(get_ready, 10, "the batcher's /ready", errors=(OSError,))
        assert ready["ready"] is True and ready["redis"] == "ok"
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        posts = truth_of(frames).count("posts")
        assert f'appliance_batch_rows_total{{table="posts"}} {float(posts)}' in text
        assert "appliance_batch_pending_entries 0.0" in text
        assert "appliance_ingest_" not in text  # the batcher's registry only
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    written = [line for line in lines if line["msg"] == "batch written"]
    assert sum(line["events"] for line in written) == len(frames)
    assert sum(line["rows"].get("posts", 0) for line in written) == posts
    assert read_manifest(settings.data_dir).last_batch["events"] > 0


def processes_with_env(marker: str) -> list[int]:
    """Pids of processes whose environment holds `marker` (a batcher and what it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def wait_gone(marker: str, timeout: float = 20) -> None:
    wait_until(lambda: not processes_with_env(marker), timeout, f"no process left with {marker}")


def test_with_worker_processes_a_kill9_leaves_no_worker_behind_and_the_redo_is_exact(
    crash_settings: Settings, crash_redis: RedisProcess, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(crash_settings, batch_workers=1)
    frames = list(generate(FirehoseConfig(seed=23, events=3_000)))
    push(settings, frames)
    log = tmp_path / "batcher.log"
    marker = f"APPLIANCE_DATA_DIR={settings.data_dir}"

    crashed = start_batcher(settings, log, crash_at="before_write")
    assert crashed.wait(60) == -signal.SIGKILL, log.read_text()[-2000:]
    wait_gone(marker)  # the worker notices and exits by itself

    restarted = start_batcher(settings, log)
    try:
        wait_drained(settings, restarted)
        assert len(processes_with_env(marker)) >= 2  # the batcher and its worker
    finally:
        stop_process(restarted)
    assert restarted.returncode == 0
    wait_gone(marker)  # a clean stop takes the workers along
    assert_stored_equals(Path(settings.data_dir), truth_of(frames))
    assert_all_parquet_files_open(Path(settings.data_dir))
