"""The store's own pieces, directly: the atomic writer (commit and abort), the manifest (versions,
concurrent updates, retiring files after the grace period) and the layout's keys."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from appliance import events
from appliance.store import compact, layout
from appliance.store.manifest import Manifest, read_manifest, update_manifest
from appliance.store.writer import AtomicParquetWriter, write_atomic, writer_options
from tests.conftest import make_settings
from tests.helpers import commit

SCHEMA = pa.schema([("did", pa.string()), ("time_us", pa.int64())])


def rows(n: int) -> pa.Table:
    return pa.table({"did": [f"did:plc:{i}" for i in range(n)], "time_us": list(range(n))})


def test_the_writer_shows_the_file_only_once_it_is_complete(tmp_path: Path) -> None:
    writer = AtomicParquetWriter(tmp_path, "batch", SCHEMA)
    writer.write(rows(10))
    writer.flush()
    # while writing: only the temporary file, a name no reader's glob matches
    assert [p.name for p in tmp_path.iterdir()] == [".batch.tmp"]
    assert not list(tmp_path.glob("*.parquet"))
    final = writer.close()
    assert final == tmp_path / "batch.parquet"
    assert [p.name for p in tmp_path.iterdir()] == ["batch.parquet"]
    assert pq.read_table(final).equals(rows(10))


def test_an_aborted_write_leaves_nothing_and_keeps_the_previous_file(tmp_path: Path) -> None:
    write_atomic(rows(3), tmp_path, "batch")
    with (
        pytest.raises(RuntimeError, match="disk on fire"),
        AtomicParquetWriter(tmp_path, "batch", SCHEMA) as writer,
    ):
        writer.write(rows(10))
        raise RuntimeError("disk on fire")
    assert [p.name for p in tmp_path.iterdir()] == ["batch.parquet"]
    assert pq.read_table(tmp_path / "batch.parquet").num_rows == 3  # the old one, untouched
    # a write that fails inside the writer (wrong schema) is aborted the same way
    with (
        pytest.raises(ValueError, match="schema"),
        AtomicParquetWriter(tmp_path, "other", SCHEMA) as w,
    ):
        w.write(pa.table({"x": [1]}))
    assert [p.name for p in tmp_path.iterdir()] == ["batch.parquet"]


def test_every_data_file_uses_the_same_writer_options(tmp_path: Path) -> None:
    schema = layout.SCHEMAS["deletes"]
    options = writer_options(schema, 3)
    assert options["compression"] == "zstd" and options["compression_level"] == 3
    assert set(options["use_dictionary"]) == {"did", "collection"}
    path = write_atomic(pa.Table.from_pylist([], schema=schema), tmp_path, "empty")
    assert pq.read_table(path).schema.equals(schema)


def test_the_manifest_counts_versions_and_serialises_concurrent_updates(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == Manifest()  # before the first batch

    def add(i: int) -> None:
        with update_manifest(tmp_path) as m:
            m.files.setdefault("posts", []).append(f"posts/date=2026-07-0{i % 3 + 1}/f{i}.parquet")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = read_manifest(tmp_path)
    assert m.version == 12  # one per update, none lost
    assert len(m.files["posts"]) == 12 and m.files["posts"] == sorted(m.files["posts"])
    assert len(m.table_files("posts", ["2026-07-01"])) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_retired_files_are_deleted_only_after_the_grace_period(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, compact_grace_s=60.0)
    data = Path(settings.data_dir)
    old = write_atomic(rows(1), data / "posts" / "date=2026-07-01", "old")
    again = write_atomic(rows(1), data / "posts" / "date=2026-07-01", "again")
    rel_old, rel_again = (p.relative_to(data).as_posix() for p in (old, again))
    with update_manifest(data) as m:
        m.files["posts"] = [rel_again]  # written again under a retired name: live, kept
        m.retired = [(rel_old, 1000.0), (rel_again, 1000.0)]
    assert compact.remove_expired(settings, now=1059.0) == 0  # within the grace period
    assert old.exists()
    assert compact.remove_expired(settings, now=1060.0) == 1
    assert not old.exists() and again.exists()
    m = read_manifest(data)
    assert m.retired == [] and m.files["posts"] == [rel_again]


def test_stored_keys_match_the_natural_key_of_the_event_each_row_came_from() -> None:
    from appliance.batch.tables import TableBuilder

    frames = [
        commit({"text": "a", "createdAt": "2026-07-04T14:00:00Z"}, rkey="3aaaaaaaaaa01"),
        commit(None, rkey="3aaaaaaaaaa01", rev="3mptbypcq3aaf", operation="delete"),
        commit({"x": 1}, collection="fm.teal.alpha.play", rkey="self"),
    ]
    builder = TableBuilder()
    decoded = [events.decode(f) for f in frames]
    for event in decoded:
        builder.add(event)
    stored = set()
    for table, data in builder.tables().items():
        cols = data.select(list(layout.KEY_COLUMNS[table])).to_pydict()
        stored |= set(layout.stored_keys(table, cols))
    assert stored == {layout.natural_key(e) for e in decoded}
    assert [layout.table_for(e) for e in decoded] == ["posts", "deletes", "records"]


def test_the_engine_sees_complete_files_only_while_a_batch_is_being_written(
    tmp_path: Path,
) -> None:
    # Invariant 3 (docs/architecture.md) through the real engine: a file being written (under its
    # temporary name, in the partition the engine reads) changes nothing a query returns.
    from appliance.query.engine import QueryEngine
    from appliance.query.model import Filters
    from tests.conftest import T0_US, ParquetData

    settings = make_settings(tmp_path)
    data = ParquetData(Path(settings.data_dir))
    data.post("lighthouse one", t=T0_US)
    data.flush()
    directory = layout.partition_dir(settings.data_dir, "posts", layout.day_of(T0_US))
    torn = AtomicParquetWriter(directory, "1-1_2-2", layout.SCHEMAS["posts"])
    try:
        torn.write(pa.Table.from_pylist([], schema=layout.SCHEMAS["posts"]))
        torn.flush()
        (directory / ".garbage.tmp").write_bytes(b"not parquet")
        engine = QueryEngine(settings)
        try:
            result = engine.search(Filters(include=("lighthouse",)), limit=10)
            assert [p.text for p in result.posts] == ["lighthouse one"]
            assert engine.stats()["posts"] == 1
        finally:
            engine.close()
    finally:
        torn.abort()
