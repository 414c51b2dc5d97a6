"""The visibility rule's two renderings agree: the SQL compaction applies and the in-memory index
the query engine checks (appliance/store/visibility.py), on the tricky cases of versions,
updates, deletes and re-creates, over Parquet files built and written as the batcher does."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from appliance import events
from appliance.batch.tables import TableBuilder
from appliance.store import layout, visibility
from appliance.store.writer import write_atomic
from tests.helpers import commit

# Revs are TIDs: they sort in commit order. R[1] < R[2] < ... < R[7].
R = {n: f"3mptbypcq3aa{c}" for n, c in enumerate("abcdefgh")}
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
OTHER = "fm.teal.alpha.play"  # no typed table: stored in `records`
OTHER2 = "sh.tangled.repo"


def create(rkey: str, rev: int, collection: str = POST, op: str = "create") -> bytes:
    record = {"text": rkey, "createdAt": "2026-07-04T14:00:00Z"}
    if collection == LIKE:
        record = {"subject": {"uri": "at://x/y/z", "cid": "c"}, "createdAt": "2026-07-04T14:00:00Z"}
    return commit(record, collection=collection, rkey=rkey, rev=R[rev], operation=op)


def update(rkey: str, rev: int, collection: str = POST) -> bytes:
    return create(rkey, rev, collection, op="update")


def delete(rkey: str, rev: int, collection: str = POST) -> bytes:
    return commit(None, collection=collection, rkey=rkey, rev=R[rev], operation="delete")


# (frames, {(table, rkey): visible revs})
CASES = [
    ([create("k1", 1)], {("posts", "k1"): {1}}),
    ([create("k2", 1), update("k2", 2)], {("posts", "k2"): {2}}),
    ([create("k3", 1), delete("k3", 2)], {("posts", "k3"): set()}),
    ([create("k4", 1), delete("k4", 2), create("k4", 3)], {("posts", "k4"): {3}}),
    # a delete older than the create (arrived late, or an older incarnation)
    ([delete("k5", 1), create("k5", 2)], {("posts", "k5"): {2}}),
    # updates out of order
    ([create("k6", 1), update("k6", 3), update("k6", 2)], {("posts", "k6"): {3}}),
    # only a greater rev hides
    ([create("k7", 2), delete("k7", 2)], {("posts", "k7"): {2}}),
    # a delete of another collection with the same did and rkey hides nothing here
    ([create("k8", 1), delete("k8", 5, LIKE)], {("posts", "k8"): {1}}),
    (
        [create("k9", 1), update("k9", 2), delete("k9", 3), create("k9", 4), update("k9", 5)],
        {("posts", "k9"): {5}},
    ),
    # the create lives in an older partition: an update alone, after an older delete
    ([delete("ka", 1), update("ka", 2)], {("posts", "ka"): {2}}),
    # the same version twice (a redelivery) is one version
    ([create("kb", 1), create("kb", 1)], {("posts", "kb"): {1}}),
    # typed tables other than posts, and records (any other collection)
    ([create("kc", 1, LIKE), delete("kc", 2, LIKE)], {("likes", "kc"): set()}),
    ([create("kd", 1, LIKE), delete("kd", 2)], {("likes", "kd"): {1}}),
    (
        [create("ke", 1, OTHER), delete("ke", 2, OTHER), create("ke", 1, OTHER2)],
        {("records", "ke"): {(OTHER2, 1)}},
    ),
    ([create("kf", 1, OTHER), delete("kf", 2)], {("records", "kf"): {(OTHER, 1)}}),
    ([create("kg", 1, OTHER), update("kg", 3, OTHER)], {("records", "kg"): {(OTHER, 3)}}),
]
REV_NUMBER = {rev: n for n, rev in R.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every case's rows, built by the batcher's TableBuilder, one file per table."""
    builder = TableBuilder()
    for frames, _ in CASES:
        for frame in frames:
            builder.add(events.decode(frame))
    # TableBuilder drops repeated natural keys like the batcher does; keep the repeat (case kb)
    # by adding its frame to a second builder written as a second file.
    again = TableBuilder()
    again.add(events.decode(create("kb", 1)))
    directory = Path(tmp_path_factory.mktemp("visibility"))
    out: dict[str, list[str]] = {}
    for n, b in enumerate((builder, again)):
        for table, data in b.tables().items():
            path = write_atomic(data, directory / table, f"part-{n}")
            out.setdefault(table, []).append(str(path))
    return out


def version(table: str, row: tuple[str, ...]) -> tuple[str, object]:
    """(rkey, rev number) of a typed table's row; (rkey, (collection, rev number)) of records."""
    if table == "records":
        _did, collection, rkey, rev = row
        return rkey, (collection, REV_NUMBER[rev])
    _did, rkey, rev = row
    return rkey, REV_NUMBER[rev]


def by_sql(files: dict[str, list[str]], table: str) -> set[tuple[str, object]]:
    record = ", ".join((*layout.RECORD_COLUMNS[table], "rev"))
    source = "(SELECT * FROM read_parquet($files, hive_partitioning = false))"
    sql, params = visibility.visible_sql(table, source, with_deletes=True)
    params = {**params, "files": files[table], "deletes": files["deletes"]}
    rows = duckdb.sql(f"SELECT {record} FROM ({sql})", params=params).fetchall()
    assert len(rows) == len(set(rows)), "each version once"
    return {version(table, r) for r in rows}


def by_index(files: dict[str, list[str]], table: str) -> set[tuple[str, object]]:
    con = duckdb.connect()
    parts = [
        visibility.load_hiding(con, table, source, path)
        for source in visibility.hiders(table)
        for path in files[source]
    ]
    index = visibility.HidingIndex.from_tables(parts)
    record = ", ".join((*layout.RECORD_COLUMNS[table], "rev"))
    rows = con.sql(
        f"SELECT hash({layout.uri_sql(table)}), {record} FROM read_parquet($f)",
        params={"f": files[table]},
    ).fetchall()
    keep = index.visible([r[0] for r in rows], [r[-1] for r in rows])
    return {version(table, r[1:]) for r, ok in zip(rows, keep, strict=True) if ok}


@pytest.mark.parametrize("table", ["posts", "likes", "records"])
def test_the_sql_and_the_index_agree_with_the_rule_on_every_case(
    files: dict[str, list[str]], table: str
) -> None:
    expected = {
        (rkey, rev)
        for _, visible in CASES
        for (t, rkey), revs in visible.items()
        if t == table
        for rev in revs
    }
    assert by_sql(files, table) == expected
    assert by_index(files, table) == expected


def test_the_rule_names_deletes_and_updates_as_what_hides() -> None:
    assert visibility.hiders("posts") == {
        "deletes": ("collection", POST),
        "posts": ("operation", "update"),
    }
    assert visibility.hiders("records")["deletes"] == ("collection", None)
