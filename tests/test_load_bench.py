"""`loadtest bench load` runs its seeded workload against a real `appliance serve` and reports
its figures (never asserted as speeds); `bench query --reindex-from` re-indexes a store beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.store import textindex
from appliance.store.manifest import read_manifest
from loadtest.bench.load import workload


def _bench(*args: str) -> dict[str, object]:
    cmd = [sys.executable, "-m", "loadtest", "bench", *args]
    out = subprocess.run(cmd, capture_output=True, timeout=280, check=True)
    figures: dict[str, object] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return figures


def test_the_workload_is_seeded_and_mixed() -> None:
    meta = {"first_day": "2026-06-01", "last_day": "2026-06-30", "posts": 25_000_000}
    one, again, other = workload(meta, 1000, 17), workload(meta, 1000, 17), workload(meta, 1000, 3)
    assert one == again and one != other
    pages = sum(r.pages for r in one)
    assert pages == 1000
    kinds = {r.kind for r in one}
    assert kinds == {"search", "export", "walk"}
    params = [r.params for r in one]
    for name in ("lang", "author", "mention", "tag", "domain", "since", "page", "sort", "q"):
        assert any(name in p for p in params), name


@pytest.mark.slow
def test_bench_load_reports_each_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _bench("query", "--store", str(store), "--posts", "20000", "--days", "2", "--build-only")
    figures = _bench(
        "load", "--store", str(store), "--clients", "2", "--requests", "40", "--cache", "both"
    )
    runs = figures["runs"]
    assert isinstance(runs, dict)
    assert set(runs) == {"cache_off_2", "cache_on_2"}
    for name, run in runs.items():
        assert run["statuses"].get("200", 0) >= 30, (name, run["statuses"])
        assert run["errors_5xx"] == 0, (name, run["worst"])
        assert run["requests_per_s"] > 0 and run["server_cpu_s"] > 0
        assert run["p50_s"] <= run["p95_s"] <= run["p99_s"] <= run["max_s"]
        assert len(run["worst"]) == 5
    assert runs["cache_off_2"]["cache_entries"] == 0 and runs["cache_on_2"]["cache_entries"] > 0

    copy = tmp_path / "reindexed"
    _bench("query", "--store", str(copy), "--reindex-from", str(store), "--build-only")
    for rel in read_manifest(copy).table_files("posts"):
        assert (copy / rel).stat().st_ino == (store / rel).stat().st_ino  # a link, not a copy
        sidecar = textindex.sidecar_path(copy / rel)
        assert textindex.format_for(sidecar, copy / rel) == int(textindex.FORMAT)
