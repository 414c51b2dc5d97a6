"""The metrics monitoring/ needs from the batcher: data root space, store files and bytes,
compaction outcome (alerts DataVolumeFull/FillingUp, CompactionFailing; the storage dashboard)."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import pytest

from appliance import buffer, metrics
from appliance.batch import batcher as batch_mod
from appliance.config import Settings
from appliance.store import compact
from appliance.store.manifest import read_manifest
from loadtest.firehose import FirehoseConfig, generate
from tests.conftest import RedisProcess, make_settings
from tests.helpers import drain, push, sample


def test_data_root_gauges_report_the_filesystem_and_nan_when_it_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    metrics.watch_data_root(str(root))
    usage = shutil.disk_usage(root)
    assert sample("appliance_data_root_size_bytes") == usage.total
    # Free space moves with other writers on this machine: within 1 GiB of a fresh reading.
    assert abs(sample("appliance_data_root_free_bytes") - usage.free) < 2**30
    root.rmdir()
    assert math.isnan(metrics.BATCH.get_sample_value("appliance_data_root_free_bytes") or 0.0)


def test_batching_and_compaction_update_store_gauges_and_the_last_compaction(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, batch_interval_s=0.2, compact_auto=True, compact_after_s=0)
    server = RedisProcess(settings)
    try:
        push(settings, list(generate(FirehoseConfig(seed=5, events=3_000, events_per_day=2_500))))
        drain(settings)
        drain(settings)  # compaction runs after the batch that closes the first day
    finally:
        server.stop()
    m = read_manifest(settings.data_dir)
    for table in ("likes", "posts"):
        paths = m.table_files(table)
        assert paths and sample("appliance_store_files", table=table) == len(paths)
        size = sum((Path(settings.data_dir) / p).stat().st_size for p in paths)
        assert sample("appliance_store_bytes", table=table) == size
    assert sample("appliance_compact_last_success_timestamp_seconds") > 0


def test_a_failed_compaction_counts_as_a_compaction_failure_not_a_batch_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: Settings = make_settings(tmp_path, compact_auto=True)

    def broken(settings: Settings, cutoff_us: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(compact, "compact_closed", broken)
    batcher = batch_mod.Batcher(settings, buffer.connect(settings))
    batcher.watermark_us = 1_800_000_000_000_000
    failures = sample("appliance_compact_failures_total")
    batch_io = sample("appliance_batch_failures_total", cause="io")
    last = sample("appliance_compact_last_success_timestamp_seconds")
    asyncio.run(batcher.compact_closed_days())
    assert sample("appliance_compact_failures_total") == failures + 1
    assert sample("appliance_batch_failures_total", cause="io") == batch_io
    assert sample("appliance_compact_last_success_timestamp_seconds") == last
