"""`loadtest bench ingest` runs end to end and reports its figures (never asserted as speeds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
