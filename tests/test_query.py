"""The query engine on hand-made Parquet files: plans, visibility, cursors, cache, lock-down."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from appliance.config import Settings
from appliance.query import planner
from appliance.query.engine import FIRST_WINDOW_ROWS, WINDOW_GROWTH, QueryEngine
from appliance.query.model import Filters, InvalidQuery, Position, QueryTimeout, parse_q
from appliance.query.snapshot import Segment
from tests.conftest import T0_US, ParquetData, make_settings, tid

SEC = 1_000_000
TUNING = {"first_rows": FIRST_WINDOW_ROWS, "growth": WINDOW_GROWTH}  # the engine's
DAY = 86_400 * SEC


def uris(engine: QueryEngine, filters: Filters, limit: int = 100) -> list[str]:
    return [p.uri for p in engine.search(filters, limit=limit).posts]


@pytest.fixture
def engine(settings: Settings) -> Iterator[QueryEngine]:
    eng = QueryEngine(settings)
    yield eng
    eng.close()


# --- q ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "include", "exclude"),
    [
        ("", (), ()),
        ("cat dog", ("cat", "dog"), ()),
        ('"good morning" sun', ("good morning", "sun"), ()),
        ("cat -dog", ("cat",), ("dog",)),
        ('-"bad news" ok', ("ok",), ("bad news",)),
        ('"unterminated phrase', ("unterminated phrase",), ()),
        ("a - b", ("a", "-", "b"), ()),
        ("100% a_b c\\d", ("100%", "a_b", "c\\d"), ()),
        ("cat cat", ("cat",), ()),
        ('""  ', (), ()),
    ],
)
def test_parse_q(q: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    assert parse_q(q) == (include, exclude)


def test_parse_q_refuses_too_many_terms() -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_q(" ".join(f"w{i}" for i in range(17)))
    assert info.value.param == "q"


# --- time windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("latest", [True, False])
def test_windows_cover_every_time_once_in_walk_order(latest: bool) -> None:
    rng = random.Random(5)
    segments = []
    for i in range(60):
        lo = rng.randrange(0, 10_000)
        segments.append(
            Segment(f"f{i % 7}", lo, lo + rng.randrange(0, 500), rng.randrange(1, 90_000))
        )
    windows = list(planner.windows(segments, latest, None, None, **TUNING))
    edges = [(lo, hi) for lo, hi, _ in windows]
    assert all(lo < hi for lo, hi in edges)
    ordered = edges if not latest else edges[::-1]
    assert ordered[0][0] == min(s.min_t for s in segments)
    assert ordered[-1][1] == max(s.max_t for s in segments) + 1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ordered))  # contiguous
    for lo, hi, files in windows:  # every file with rows in the window is read
        wanted = {s.path for s in segments if s.max_t >= lo and s.min_t < hi}
        assert set(files) == wanted


def test_windows_start_small_inside_a_row_group_and_grow_fourfold() -> None:
    # 40 row groups of 65,536 rows, each over 100 µs: 655.36 rows per µs
    segments = [Segment(f"f{i // 4}", i * 100, i * 100 + 99, 65_536) for i in range(40)]
    windows = list(planner.windows(segments, True, None, None, **TUNING))
    spans = [hi - lo for lo, hi, _ in windows]
    # 16k and 64k rows inside the newest row group; from 256k rows on, windows end on row-group
    # boundaries (multiples of 100) so that no row group is read by two windows
    assert spans[:4] == [25, 100, 375, 1600]
    assert all(lo % 100 == 0 for lo, _, _ in windows[2:])
    assert windows[0][1] == 4000 and windows[0][2] == ["f9"]
    oldest = list(planner.windows(segments, False, 1000, None, **TUNING))
    assert [(lo, hi) for lo, hi, _ in oldest[:2]] == [(1000, 1025), (1025, 1125)]


def test_the_next_window_follows_the_hit_rate_once_there_is_one() -> None:
    assert (
        planner.next_target(16_384, 50, 16_384, 0, **TUNING) == 65_536
    )  # nothing seen yet: grow fourfold
    # 40 of 51 rows found in 1.36M rows: the last 11 need ~370k rows, plus half again
    assert planner.next_target(1_048_576, 11, 1_363_968, 40, **TUNING) == pytest.approx(
        562_696, rel=1e-3
    )
    assert (
        planner.next_target(16_384, 50, 16_384, 1, **TUNING) == 65_536
    )  # never more than fourfold


def test_windows_over_single_instant_segments() -> None:
    segments = [Segment("a", 50, 50, 3), Segment("b", 50, 50, 2), Segment("c", 10, 90, 1)]
    windows = list(planner.windows(segments, True, None, None, **TUNING))
    assert windows[0][1] == 91 and windows[-1][0] == 10
    covered = [t for lo, hi, _ in windows for t in range(lo, hi)]
    assert sorted(covered) == list(range(10, 91))


def test_a_cursor_moves_the_walk_bounds_and_keeps_its_own_instant() -> None:
    at = Position(5_000, "at://x")
    assert planner.walk_bounds(None, None, None, True) == (None, None)
    assert planner.walk_bounds(100, 9_000, at, True) == (100, 5_001)  # newest first: below it
    assert planner.walk_bounds(100, 4_000, at, True) == (100, 4_000)  # the filter is tighter
    assert planner.walk_bounds(100, 9_000, at, False) == (5_000, 9_000)  # oldest first: above
    assert planner.walk_bounds(6_000, None, at, False) == (6_000, None)


def test_the_token_indexes_are_consulted_only_when_the_page_is_far_away() -> None:
    assert planner.worth_narrowing(50, 16_384, 0, narrow_rows=1_000_000)  # no hit yet
    # 50 more rows at 10 hits per 16k rows: 82k rows to go, not worth a lookup at 1M
    assert not planner.worth_narrowing(50, 16_384, 10, narrow_rows=1_000_000)
    assert planner.worth_narrowing(50, 16_384, 10, narrow_rows=50_000)
    assert not planner.worth_narrowing(0, 16_384, 0, narrow_rows=1_000_000)  # page is full


def test_narrowing_keeps_candidate_groups_merges_adjacent_ones_and_counts_files() -> None:
    a = [Segment("a", i * 100, i * 100 + 99, 10) for i in range(10)]
    b = [Segment("b", i * 100, i * 100 + 99, 10) for i in range(4)]
    c = [Segment("c", 0, 99, 10)]
    walked = {"a": a[:8], "b": b, "c": c}  # the walk's range ends before a's last two groups
    kept, restrict, outcome = planner.narrow_segments(
        walked,
        {"a": a, "b": b, "c": c},
        {"a": {1, 2, 4, 9}, "b": {0, 1, 2}},  # c has no index; b's index is not selective
        max_fraction=0.5,
    )
    assert restrict == {"a": [(100, 299), (400, 499)]}  # group 9 is outside the walk
    assert kept == [a[1], a[2], a[4], *b, *c]
    assert outcome == {"narrowed": 1, "not_selective": 1}


def test_the_rest_of_a_walk_is_planned_from_where_it_stands() -> None:
    segments = [Segment(f"f{i}", i * 100, i * 100 + 99, 65_536) for i in range(10)]
    for latest in (True, False):
        walk = planner.WindowPlanner(segments, latest, None, None)
        first = walk.next(FIRST_WINDOW_ROWS)
        assert first is not None
        rest = walk.rest(segments[2:8])
        windows = []
        while (window := rest.next(1e9)) is not None:
            windows.append(window[:2])
        # one window over what is left of the walk's range, none of it walked before
        assert windows == ([(0, first[0])] if latest else [(first[1], 1000)])


# --- search semantics on the engine ----------------------------------------------------------


def test_newest_first_across_days_and_files(engine: QueryEngine, parquet_data: ParquetData) -> None:
    rows = [parquet_data.post(f"post {i}", t=T0_US + i * DAY // 3) for i in range(12)]
    parquet_data.flush()
    more = [parquet_data.post(f"post {i}", t=T0_US + i * DAY // 3 + SEC) for i in range(12, 14)]
    parquet_data.flush()
    everything = rows + more
    newest_first = [r["uri"] for r in sorted(everything, key=lambda r: -r["time_us"])]
    assert uris(engine, Filters()) == newest_first
    assert uris(engine, Filters(sort="oldest")) == newest_first[::-1]


def test_updates_show_only_the_newest_version(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    first = parquet_data.post("original words", t=T0_US, rkey="3kpost")
    parquet_data.flush()
    parquet_data.post("edited words", t=T0_US + 2 * DAY, rkey="3kpost", operation="update")
    parquet_data.flush()
    found = engine.search(Filters(include=("words",)), limit=10).posts
    assert [(p.uri, p.text) for p in found] == [(first["uri"], "edited words")]
    assert engine.search(Filters(include=("original",)), limit=10).posts == []


def test_a_delete_in_a_later_file_hides_the_post_and_a_recreate_shows(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    post = parquet_data.post("soon gone", t=T0_US, rkey="3kgone")
    keep = parquet_data.post("stays", t=T0_US + SEC)
    parquet_data.flush()
    assert uris(engine, Filters()) == [keep["uri"], post["uri"]]
    parquet_data.delete(post["uri"], t=T0_US + DAY)  # a later day, a later file
    parquet_data.flush()
    assert uris(engine, Filters()) == [keep["uri"]]
    again = parquet_data.post("back again", t=T0_US + 2 * DAY, rkey="3kgone")
    parquet_data.flush()
    found = engine.search(Filters(), limit=10).posts
    assert [(p.uri, p.text) for p in found] == [
        (again["uri"], "back again"),
        (keep["uri"], "stays"),
    ]


def test_a_delete_with_an_older_rev_hides_nothing(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    post = parquet_data.post("still here", t=T0_US + DAY)
    parquet_data.delete(post["uri"], t=T0_US + 2 * DAY, rev=tid(T0_US))  # rev before the post
    parquet_data.delete(post["uri"].replace("post", "like"), t=T0_US + 2 * DAY)  # other collection
    parquet_data.flush()
    assert uris(engine, Filters()) == [post["uri"]]


def test_hidden_rows_are_replaced_by_further_candidates(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    posts = [parquet_data.post(f"n {i}", t=T0_US + i * SEC) for i in range(40)]
    parquet_data.flush()
    for post in posts[10:]:  # the 30 newest are deleted
        parquet_data.delete(post["uri"], t=T0_US + DAY)
    parquet_data.flush()
    result = engine.search(Filters(), limit=5)
    assert [p.uri for p in result.posts] == [p["uri"] for p in posts[9:4:-1]]
    assert result.has_more


def test_handles_resolve_to_the_current_holder(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    a = parquet_data.post("by a", t=T0_US, did="did:plc:aaa")
    b = parquet_data.post("by b", t=T0_US + SEC, did="did:plc:bbb")
    parquet_data.identity("did:plc:aaa", "shared.example.com", t=T0_US)
    parquet_data.identity("did:plc:aaa", "a-new.example.com", t=T0_US + 10 * SEC)
    parquet_data.identity("did:plc:bbb", "Shared.example.com", t=T0_US + 20 * SEC)
    parquet_data.flush()
    assert uris(engine, Filters(author="shared.example.com")) == [b["uri"]]
    assert uris(engine, Filters(author="a-new.example.com")) == [a["uri"]]
    assert uris(engine, Filters(author="nobody.example.com")) == []
    handles = {p.did: p.handle for p in engine.search(Filters(), limit=10).posts}
    assert handles == {"did:plc:aaa": "a-new.example.com", "did:plc:bbb": "Shared.example.com"}


# --- cursors ---------------------------------------------------------------------------------


def test_a_cursor_is_pinned_to_its_query_and_refuses_tampering(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    for i in range(5):
        parquet_data.post(f"cat {i}", t=T0_US + i * SEC)
    parquet_data.flush()
    cats = Filters(include=("cat",))
    token = engine.search(cats, limit=2).cursor
    assert token is not None
    assert len(engine.search(cats, limit=2, cursor=token).posts) == 2
    with pytest.raises(InvalidQuery, match="different query"):
        engine.search(Filters(include=("dog",)), limit=2, cursor=token)
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for bad in (flipped, token[:-2], "x", "!!!!", token + "AAAA"):
        with pytest.raises(InvalidQuery) as info:
            engine.search(cats, limit=2, cursor=bad)
        assert info.value.param == "cursor"
    other_key = QueryEngine(engine.settings, cursor_secret=b"another key")
    with pytest.raises(InvalidQuery):
        other_key.search(cats, limit=2, cursor=token)
    other_key.close()


# --- the cache -------------------------------------------------------------------------------


def test_the_cache_never_serves_rows_a_newer_batch_changed(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    old = parquet_data.post("hello world", t=T0_US)
    parquet_data.flush()
    hello = Filters(include=("hello",))
    assert uris(engine, hello) == [old["uri"]]
    assert uris(engine, hello) == [old["uri"]]  # from the cache
    new = parquet_data.post("hello again", t=T0_US + SEC)
    parquet_data.flush()
    assert uris(engine, hello) == [new["uri"], old["uri"]]
    parquet_data.delete(new["uri"], t=T0_US + 2 * SEC)
    parquet_data.flush()
    assert uris(engine, hello) == [old["uri"]]


# --- lock-down and timeout -------------------------------------------------------------------


def test_duckdb_cannot_read_outside_the_data_root(engine: QueryEngine, tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(duckdb.PermissionException):
        engine.run(
            lambda cur: cur.execute("SELECT * FROM read_csv($p)", {"p": str(outside)}).fetchall()
        )
    with pytest.raises(duckdb.Error):
        engine.run(lambda cur: cur.execute("SET enable_external_access = true").fetchall())


def test_a_query_past_the_timeout_is_interrupted(tmp_path: Path) -> None:
    engine = QueryEngine(make_settings(tmp_path, query_timeout_s=0.3))
    # minutes of work without the interrupt
    endless = "SELECT count(*) FROM range(1000000000000) a WHERE a.range % 7 = 3"
    with pytest.raises(QueryTimeout):
        engine.run(lambda cur: cur.execute(endless).fetchall())
    assert engine.run(lambda cur: cur.execute("SELECT 42").fetchone()) == (42,)
    engine.close()


# --- stats -----------------------------------------------------------------------------------


def test_stats_count_rows_per_day_table_and_collection(
    engine: QueryEngine, parquet_data: ParquetData
) -> None:
    a = parquet_data.post("one", t=T0_US)
    parquet_data.post("two", t=T0_US + DAY)
    parquet_data.delete(a["uri"], t=T0_US + DAY + SEC)
    parquet_data.delete("at://did:plc:x/app.bsky.feed.like/3k", t=T0_US + DAY)
    parquet_data.identity("did:plc:alice", "alice.example.com", t=T0_US + DAY + 5 * SEC)
    parquet_data.flush()
    stats = engine.stats()
    assert stats["events"] == 5 and stats["posts"] == 2
    assert [(d["date"], d["events"], d["posts"]) for d in stats["days"]] == [
        ("2026-06-01", 1, 1),
        ("2026-06-02", 4, 1),
    ]
    assert stats["collections"] == {"app.bsky.feed.post": 2}
    assert stats["deletes_by_collection"] == {"app.bsky.feed.like": 1, "app.bsky.feed.post": 1}
    assert stats["newest_event_at"].isoformat() == "2026-06-02T00:00:05+00:00"
    assert stats["last_batch_at"] is not None and stats["ingest_lag_s"] > 0


def test_a_cursor_past_the_limit_from_before_the_flag_was_on_returns_nothing(
    parquet_data: ParquetData, tmp_path: Path
) -> None:
    for i in range(5):
        parquet_data.post(f"p {i}", t=T0_US + i * SEC)
    parquet_data.flush()
    engine = QueryEngine(make_settings(tmp_path, result_limit_max=3), cursor_secret=b"k")
    token = engine.codec.encode(Filters(), Position(T0_US + 2 * SEC, "at://x"), delivered=3)
    result = engine.search(Filters(), limit=2, cursor=token)
    assert result.posts == [] and result.capped and not result.has_more
    engine.close()
