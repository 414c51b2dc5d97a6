"""Compaction: a day's batch files → few sorted files, deduplicated, deletions applied, swapped
through the manifest so that queries neither fail nor see rows twice or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from appliance.cli import main as cli_main
from appliance.config import Settings, to_environ
from appliance.store import compact, layout
from appliance.store.manifest import read_manifest, update_manifest
from loadtest.firehose import FirehoseConfig, generate
from tests.conftest import REPO_ROOT, RedisProcess, make_settings
from tests.helpers import (
    all_keys,
    assert_all_parquet_files_open,
    commit,
    drain,
    live_files,
    push,
    stored_digests,
    truth_of,
    visible_posts,
)

DAY = "2026-07-01"  # the generator starts at 2026-07-01T00:00:00Z


def visible_keys(data_dir: str | Path, table: str) -> set[tuple[str, str]]:
    """(uri, rev) of the rows visible under the rule: greatest rev per uri, no later delete."""
    files = [str(p) for p in live_files(data_dir, table)]
    deletes = [str(p) for p in live_files(data_dir, "deletes")]
    sql = f"""
        SELECT uri, rev FROM (SELECT {layout.uri_sql(table)} AS uri, rev FROM read_parquet($files))
        QUALIFY rev = max(rev) OVER (PARTITION BY uri)
    """
    rows = set(duckdb.sql(sql, params={"files": files}).fetchall())
    if deletes:
        dels = duckdb.sql(
            f"SELECT {layout.uri_sql('deletes')} AS uri, max(rev) FROM read_parquet($d) "
            "GROUP BY uri",
            params={"d": deletes},
        ).fetchall()
        latest_delete = dict(dels)
        rows = {(u, r) for u, r in rows if not (u in latest_delete and latest_delete[u] > r)}
    return rows


@pytest.fixture
def batched(tmp_path: Path) -> Settings:
    """One day of generated events (20k), batched into several files per table."""
    settings = make_settings(
        tmp_path,
        batch_interval_s=0.2,
        batch_max_events=4_000,
        compact_auto=False,
        compact_grace_s=3600,
    )
    server = RedisProcess(settings)
    try:
        frames = list(generate(FirehoseConfig(seed=31, events=20_000, events_per_day=20_000)))
        push(settings, frames)
        drain(settings)
    finally:
        server.stop()
    return settings


def test_compaction_merges_a_day_into_sorted_files_and_applies_deletions(
    batched: Settings,
) -> None:
    data = batched.data_dir
    before_files = live_files(data)
    assert len(live_files(data, "likes")) >= 5
    expected = {t: visible_keys(data, t) for t in ("posts", "likes", "reposts", "follows")}
    deletes_before = stored_digests(data)["deletes"]
    deleted_posts = {r[0] for r in all_keys(data, "posts")} - {u for u, _ in expected["posts"]}
    assert deleted_posts  # the generator deletes some of the posts it created

    assert cli_main(["compact", "--day", DAY, "--data-dir", data]) == 0

    m = read_manifest(data)
    for table in layout.TABLES:
        files = m.table_files(table, [DAY])
        assert len(files) == 1 and Path(files[0]).name.startswith(layout.COMPACTED_PREFIX), table
    for table, keys in expected.items():
        # Physically: exactly the visible versions, each once.
        stored = all_keys(data, table)
        assert len(stored) == len(set(stored))
        assert set(stored) == keys, table
    assert {r[0] for r in all_keys(data, "posts")}.isdisjoint(deleted_posts)
    assert stored_digests(data)["deletes"] == deletes_before  # delete rows are facts: kept
    # Sorted by time_us, DIDs dictionary-encoded.
    posts = live_files(data, "posts")[0]
    times = pq.read_table(posts, columns=["time_us"])["time_us"].to_pylist()
    assert times == sorted(times)
    did = layout.SCHEMAS["posts"].get_field_index("did")
    encodings = pq.ParquetFile(posts).metadata.row_group(0).column(did).encodings
    assert "RLE_DICTIONARY" in encodings or "PLAIN_DICTIONARY" in encodings
    # The replaced files stay for queries still reading them, then go.
    assert sorted(data_dir / p for p, _ in m.retired for data_dir in [Path(data)]) == sorted(
        before_files
    )
    assert all(p.exists() for p in before_files)
    assert compact.remove_expired(batched, now=time.time() + batched.compact_grace_s + 1) == len(
        before_files
    )
    assert not any(p.exists() for p in before_files)
    assert not read_manifest(data).retired
    # Nothing left to do: a second run changes nothing.
    version = read_manifest(data).version
    assert compact.compact_partition(batched, "posts", DAY) is None
    assert read_manifest(data).version == version


def test_queries_during_a_compaction_see_every_visible_post_exactly_once(
    batched: Settings,
) -> None:
    data = batched.data_dir
    expected = visible_posts(data)
    results: list[set[str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def query_loop() -> None:
        while not done.is_set():
            try:
                results.append(visible_posts(data))
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        for table in ("deletes", "posts"):
            assert compact.compact_partition(batched, table, DAY) is not None
    finally:
        done.set()
        thread.join()
    assert not errors
    assert len(results) >= 2
    assert all(r == expected for r in results)
    assert visible_posts(data) == expected


def test_an_update_replaces_the_earlier_version(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, batch_interval_s=0.2, compact_auto=False)
    server = RedisProcess(settings)
    try:
        push(settings, [commit({"text": "v1"}, rkey="3aaaaaaaaaaa2", rev="3mptbypcq372f")])
        drain(settings)
        push(
            settings,
            [commit({"text": "v2"}, rkey="3aaaaaaaaaaa2", rev="3mptbypcq37af", operation="update")],
        )
        drain(settings)
    finally:
        server.stop()
    day = "2026-07-04"
    assert len(live_files(settings.data_dir, "posts")) == 2
    assert compact.compact_partition(settings, "posts", day) is not None
    rows = pq.read_table(live_files(settings.data_dir, "posts")[0]).to_pylist()
    assert [(r["text"], r["operation"]) for r in rows] == [("v2", "update")]


def run_compact(settings: Settings, crash_at: str = "") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **to_environ(settings), "APPLIANCE_BATCH_CRASH_AT": crash_at}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "compact", "--day", DAY, "--table", "likes"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", ["compact_mid", "compact_after_swap"])
def test_kill9_during_compaction_loses_nothing(point: str, batched: Settings) -> None:
    data = Path(batched.data_dir)
    expected = visible_keys(data, "likes")
    inputs = read_manifest(data).table_files("likes", [DAY])

    crashed = run_compact(batched, crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout.decode()[-2000:]
    assert_all_parquet_files_open(data)
    after_crash = read_manifest(data).table_files("likes", [DAY])
    if point == "compact_mid":
        assert after_crash == inputs  # not swapped: the old files are still the live ones
        assert list((data / "likes" / f"date={DAY}").glob(f"{layout.COMPACTED_PREFIX}*.parquet"))
    else:
        assert len(after_crash) == 1 and after_crash != inputs
    assert set(all_keys(data, "likes")) >= expected

    again = run_compact(batched)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert set(all_keys(data, "likes")) == expected
    assert len(all_keys(data, "likes")) == len(expected)
    assert_all_parquet_files_open(data)
    # No orphan: every compacted file on disk is live.
    on_disk = set((data / "likes" / f"date={DAY}").glob(f"{layout.COMPACTED_PREFIX}*.parquet"))
    assert on_disk == set(live_files(data, "likes"))


def test_the_batcher_compacts_a_day_once_it_is_closed(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        batch_interval_s=0.2,
        batch_max_events=2_000,
        compact_auto=True,
        compact_after_s=0,
    )
    server = RedisProcess(settings)
    try:
        # 6k events over 1.2 days: the first day closes once second-day events are batched.
        frames = list(generate(FirehoseConfig(seed=32, events=6_000, events_per_day=5_000)))
        push(settings, frames)
        drain(settings)
        drain(settings)  # one more cycle: compaction runs after the batch that closes the day
    finally:
        server.stop()
    m = read_manifest(settings.data_dir)
    first = m.table_files("likes", [DAY])
    assert len(first) == 1 and Path(first[0]).name.startswith(layout.COMPACTED_PREFIX)
    second = m.table_files("likes", ["2026-07-02"])
    assert second and not any(Path(p).name.startswith(layout.COMPACTED_PREFIX) for p in second)
    truth = truth_of(frames)
    assert (
        stored_digests(settings.data_dir)["likes"]["2026-07-02"]
        == truth.tables["likes"]["2026-07-02"]
    )


def test_compact_rejects_a_malformed_day(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["compact", "--day", "2026-13-01"])
    assert exc.value.code == 2
    assert "not a date YYYY-MM-DD" in capsys.readouterr().err


def test_a_retired_file_written_again_is_not_deleted(batched: Settings) -> None:
    """A batch redone under the name of a file compaction retired makes that file live again."""
    data = Path(batched.data_dir)
    inputs = read_manifest(data).table_files("blocks", [DAY])
    assert compact.compact_partition(batched, "blocks", DAY) is not None
    retired = read_manifest(data).retired[0][0]
    with update_manifest(data) as m:  # what write_batch does for a redone batch
        m.files["blocks"].append(retired)
    removed = compact.remove_expired(batched, now=time.time() + batched.compact_grace_s + 1)
    assert (data / retired).exists()
    assert retired not in {p for p, _ in read_manifest(data).retired}
    assert removed == len(inputs) - 1
