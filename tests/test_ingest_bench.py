"""`loadtest bench ingest` runs end to end and reports its figures (never asserted as speeds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import appliance


@pytest.mark.slow
def test_bench_ingest_prints_its_figures_as_the_last_json_line() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "bench",
            "ingest",
            "--events",
            "5000",
            "--repeats",
            "1",
            "--entry-events",
            "100,1",
        ],
        capture_output=True,
        timeout=240,
        check=True,
    )
    figures = json.loads(out.stdout.decode().strip().splitlines()[-1])
    for key in (
        "ingest_events_per_s",
        "bare_receive_events_per_s",
        "ratio",
        "peak_rss_mb",
        "ingest_events_per_s_entry1",
        "ratio_entry1",
    ):
        assert figures[key] > 0, key
    assert figures["events"] == 5000


@pytest.mark.slow
def test_bench_ingest_runs_a_baseline_source_tree_alternately(tmp_path: Path) -> None:
    """--baseline DIR runs the ingester of the appliance package in DIR (here a copy of this one)
    in the same session; its figures join the JSON line. A DIR without one is refused."""
    shutil.copytree(
        Path(appliance.__file__).parent,
        tmp_path / "appliance",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    cmd = [sys.executable, "-m", "loadtest", "bench", "ingest", "--events", "5000"]
    cmd += ["--repeats", "1", "--entry-events", "100", "--baseline", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, timeout=240, check=True)
    figures = json.loads(out.stdout.decode().strip().splitlines()[-1])
    for key in ("baseline_events_per_s", "baseline_ratio", "baseline_peak_rss_mb"):
        assert figures[key] > 0, key
    assert "baseline ingester, 100 events/entry" in out.stdout.decode()

    refused = subprocess.run(
        [*cmd[:-1], str(tmp_path / "nothing")], capture_output=True, timeout=60
    )
    assert refused.returncode != 0
    assert b"no appliance/__main__.py" in refused.stderr
