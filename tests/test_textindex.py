"""The token index of compacted posts files: it narrows scans and never changes an answer.

Real Parquet files written by the real compactor (with tiny row groups so that a few thousand
posts span many of them), real DuckDB; every search is run by an engine with the index and one
without, and the rows must be identical.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from appliance import metrics
from appliance.config import Settings
from appliance.query import engine, postings
from appliance.query.engine import QueryEngine
from appliance.query.model import Filters, parse_q
from appliance.store import compact, layout, textindex
from appliance.store.manifest import read_manifest
from loadtest.firehose import ABSENT_WORD, COMMON_WORD, RARE_WORD, _bank
from tests.conftest import T0_US, ParquetData, make_settings

SEC = 1_000_000
DAY = 86_400 * SEC
AUTHORS = [f"did:plc:author{i:02d}" for i in range(40)]
RARE_AUTHOR = "did:plc:seldom"
DAY1, DAY2 = "2026-06-01", "2026-06-02"

TRICKY = [
    "the lighthouse-keeper's log",
    "LIGHTHOUSE KEEPER on duty",
    "a lighthouse keeper",
    "lighthousekeeper as one word",
    "light house keeper, apart",
    "50% off a_b today",
    "100%_off and 100 % off",
    "back\\slash and per%cent",
    "café naïve Ünïcode straße",
    "CAFÉ in capitals",
    "日本語のテキストです",
    "今日は天気がいい",
    "🦋lighthouse🦋 between emoji",
    "🦋 only a butterfly",
    "İstanbul and ISTANBUL",
    "ΟΔΟΣ and οδος",
    "xylo phonist split apart",
    "xylophonist!",
    "XYLOPHONIST in capitals",
    "emoji😂inside a word",
    "",
]

QUERIES = [
    COMMON_WORD,
    RARE_WORD,
    ABSENT_WORD,
    f'"{COMMON_WORD} keeper"',
    "house",
    "ghthou",
    "keeper light",
    "house keeper",
    "50%",
    "a_b",
    "100%_off",
    "%",
    "_",
    "\\",
    "per%cent",
    "café",
    "CAFÉ",
    "ünïcode",
    "日本",
    "本語のテ",
    "天気",
    "🦋",
    f"🦋{COMMON_WORD}",
    "😂inside",
    "istanbul",
    "İstanbul",
    "ΟΔΟΣ",
    "σ",
    f"{RARE_WORD} -{COMMON_WORD}",
    f"-{COMMON_WORD} {RARE_WORD[:5]}",
    f"{COMMON_WORD} {RARE_WORD}",
    '"xylo phonist"',
    "e",
]


def _texts(rng: random.Random, n: int) -> list[str | None]:
    sentences = [s for by_lang in _bank().sentences.values() for s, _, _ in by_lang]
    out: list[str | None] = []
    for i in range(n):
        if i % 97 == 0:
            out.append(None)
            continue
        parts = [rng.choice(sentences) for _ in range(rng.randint(1, 3))]
        roll = rng.random()
        if roll < 0.03:
            parts.insert(rng.randint(0, len(parts)), rng.choice([COMMON_WORD, "Lighthouse"]))
        elif roll < 0.035:
            parts.insert(rng.randint(0, len(parts)), RARE_WORD)
        elif roll < 0.06:
            parts.append(rng.choice(TRICKY))
        out.append(" ".join(parts))
    return out


RARE_MENTION = "did:plc:mentionedonce"
# Filter values, common and rare, with the cases that trip a naive key: case, region subtags,
# a trailing '-', user info and ports in URLs, look-alike hosts, non-URLs, non-ASCII tags.
LANGS = [None, [], ["en"], ["en-US"], ["EN"], ["pt-BR"], ["pt"], ["ja"], ["en", "es"],
         ["zh-Hant-TW"], ["de-"], ["x-klingon"]]  # fmt: skip
TAGS = [None, [], ["Art"], ["ART", "news"], ["news"], ["İstanbul"], ["café"], ["CAFÉ"]]
LINKS = [None, [], ["https://m.youtube.com/watch?v=1"], ["http://user@Sub.Example.org:8080/p"],
         ["not a url"], ["https://example.org.evil.com/x"], ["https://notexample.org/"],
         ["HTTPS://GITHUB.COM/a", "https://youtube.com/b"]]  # fmt: skip


def _features(rng: random.Random, i: int) -> dict[str, object]:
    """Language, hashtags, links and mentions of a post; a few rare values at fixed rows."""
    rare = i in (333, 1777)
    return {
        "langs": ["uk"] if rare else rng.choice(LANGS),
        "tags": ["Rare_Tag"] if rare else rng.choice(TAGS),
        "links": ["https://rare.example.net/x"] if rare else rng.choice(LINKS),
        "external_uri": rng.choice([None, None, "https://www.YouTube.com/v", "mailto:x@y.org"]),
        "mentions": [RARE_MENTION] if rare else rng.choice([None, [], [AUTHORS[0]]]),
    }


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Two compacted days of 2,500 posts each, in row groups of 64 rows, with token indexes."""
    monkeypatch.setattr(compact, "POSTS_ROW_GROUP_ROWS", 64)
    # walk in small windows, so that the index is consulted after the first one
    monkeypatch.setattr(engine, "FIRST_WINDOW_ROWS", 64)
    monkeypatch.setattr(engine, "NARROW_ROWS", 0)  # consult the index whatever the hit rate
    settings = make_settings(tmp_path, compact_grace_s=60.0)
    data = ParquetData(Path(settings.data_dir))
    rng = random.Random(5)
    for day in range(2):
        texts = _texts(rng, 2500)
        for i, text in enumerate(texts):
            t = T0_US + day * DAY + i * 30 * SEC
            did = RARE_AUTHOR if i in (700, 701, 2100) else rng.choice(AUTHORS)
            data.post(text, t=t, did=did, **_features(rng, i))
        for i, text in enumerate(TRICKY):  # the tricky texts once more, in their own groups
            data.post(text, t=T0_US + day * DAY + 80_000 * SEC + i, did=rng.choice(AUTHORS))
    data.flush()
    for day in (DAY1, DAY2):
        assert compact.compact_partition(settings, "posts", day) is not None
    return settings


def _engine(settings: Settings, indexed: bool) -> QueryEngine:
    return QueryEngine(settings.__class__(**{**_fields(settings), "query_text_index": indexed}))


def _fields(settings: Settings) -> dict[str, object]:
    return {f: getattr(settings, f) for f in settings.__struct_fields__}


@pytest.fixture
def engines(store: Settings) -> Iterator[tuple[QueryEngine, QueryEngine]]:
    with_index, without = _engine(store, True), _engine(store, False)
    yield with_index, without
    with_index.close()
    without.close()


def _all_rows(
    engine: QueryEngine, filters: Filters, limit: int = 100, pages: int | None = None
) -> list[tuple[str, str]]:
    """Every result of a search (or its first `pages` pages), page after page by cursor:
    (uri, text)."""
    out: list[tuple[str, str]] = []
    cursor = None
    while pages is None or pages > 0:
        result = engine.search(filters, limit=limit, cursor=cursor)
        out.extend((p.uri, p.text or "") for p in result.posts)
        if not result.has_more or result.cursor is None:
            break
        cursor = result.cursor
        pages = None if pages is None else pages - 1
    return out


_DUCK = duckdb.connect()


def _lower(text: str) -> str:
    row = _DUCK.execute("SELECT lower($t)", {"t": text}).fetchone()
    assert row is not None
    return str(row[0])


def _narrowed() -> float:
    return metrics.api_text_index.labels("narrowed")._value.get()


def _rows_read() -> float:
    return metrics.api_rows_read._value.get()


def test_the_tokenizer_splits_query_terms_as_the_index_splits_text() -> None:
    con = duckdb.connect()
    assert textindex.pieces(con, "Lighthouse-Keeper's") == ["lighthouse", "keeper", "s"]
    assert textindex.pieces(con, "50%_off") == ["50", "off"]
    # scripts without spaces: one token per character, so the vocabulary stays small
    assert textindex.pieces(con, "日本語のテキスト") == list("日本語のテキスト")
    assert textindex.pieces(con, "abc東京def") == ["abc", "東", "京", "def"]
    assert textindex.pieces(con, "🦋lighthouse🦋") == ["lighthouse"]
    assert textindex.pieces(con, "🦋 % _") == []
    assert textindex.pieces(con, "CAFÉ naïve ΟΔΟΣ") == ["café", "naïve", "οδοσ"]


def test_compaction_writes_an_index_beside_each_posts_file(store: Settings) -> None:
    data_dir = Path(store.data_dir)
    files = read_manifest(data_dir).table_files("posts")
    assert files and all(Path(p).name.startswith(layout.COMPACTED_PREFIX) for p in files)
    for rel in files:
        sidecar = textindex.sidecar_path(data_dir / rel)
        assert sidecar.exists() and not sidecar.name.endswith(".parquet")
        con = duckdb.connect()
        rows = con.execute(
            "SELECT key, groups FROM read_parquet($f) WHERE field = 0 AND key = $k",
            {"f": str(sidecar), "k": RARE_WORD},
        ).fetchall()
        assert rows, "the rare word is indexed"
        # the index names exactly the row groups whose text holds the word
        truth = con.execute(
            "SELECT DISTINCT file_row_number // 64 FROM read_parquet($f, file_row_number = true) "
            "WHERE contains(lower(text), $k) ORDER BY 1",
            {"f": str(data_dir / rel), "k": RARE_WORD},
        ).fetchall()
        assert sorted(rows[0][1]) == [g for (g,) in truth]
    # no *.parquet glob sees an index
    con = duckdb.connect()
    globbed = con.execute(
        "SELECT DISTINCT filename FROM read_parquet($g, filename = true)",
        {"g": layout.table_glob(data_dir, "posts")},
    ).fetchall()
    assert globbed and all(name.endswith(".parquet") for (name,) in globbed)


@pytest.mark.parametrize("sort", ["latest", "oldest"])
def test_the_index_never_changes_results(
    engines: tuple[QueryEngine, QueryEngine], sort: str
) -> None:
    with_index, without = engines
    before, read = _narrowed(), _rows_read()
    for q in QUERIES:
        include, exclude = parse_q(q)
        for exact in (False, True):
            filters = Filters(
                include=include,
                exclude=exclude,
                exact=exact,
                sort="latest" if sort == "latest" else "oldest",
            )
            expected = _all_rows(without, filters)
            assert _all_rows(with_index, filters) == expected, (q, exact)
            # and the rows are what a plain substring test over the texts says
            for _, text in expected:
                for term in include:
                    wanted = term if exact else _lower(term)
                    assert wanted in (text if exact else _lower(text))
    assert _narrowed() > before, "the index was used"
    assert _rows_read() > read, "candidate rows were read one by one"


def test_the_index_never_changes_results_with_other_filters(
    engines: tuple[QueryEngine, QueryEngine],
) -> None:
    with_index, without = engines
    day2 = T0_US + DAY
    cases = [
        Filters(include=(RARE_WORD,), author=RARE_AUTHOR),
        Filters(include=(COMMON_WORD,), author=RARE_AUTHOR),
        Filters(author=RARE_AUTHOR),
        Filters(author=RARE_AUTHOR, sort="oldest"),
        Filters(include=(RARE_WORD,), since_us=day2, until_us=day2 + DAY // 2),
        Filters(include=(ABSENT_WORD,), since_us=T0_US + 3600 * SEC),
        Filters(include=(RARE_WORD,), until_us=day2 + 3600 * SEC, sort="oldest"),
        Filters(include=("keeper",), exclude=("log",)),
    ]
    for filters in cases:
        assert _all_rows(with_index, filters) == _all_rows(without, filters), filters
        assert _all_rows(with_index, filters, limit=7) == _all_rows(without, filters, limit=7)
    # pages by number too
    filters = Filters(include=(RARE_WORD,))
    for page in (1, 2, 3):
        a = with_index.search(filters, limit=5, page=page)
        b = without.search(filters, limit=5, page=page)
        assert [p.uri for p in a.posts] == [p.uri for p in b.posts]
        assert a.has_more == b.has_more


def test_filter_keys_narrow_and_never_change_results(
    engines: tuple[QueryEngine, QueryEngine],
) -> None:
    """lang, tag, domain and mention prune row groups through the index's filter keys; every
    answer equals the scan's, for common, rare, absent and look-alike values."""
    with_index, without = engines
    day2 = T0_US + DAY
    cases = [
        Filters(lang="uk"),
        Filters(lang="uk", sort="oldest"),
        Filters(lang="en"),
        Filters(lang="en-us"),
        Filters(lang="pt", include=(COMMON_WORD,)),
        Filters(lang="zh-hant"),
        Filters(lang="zh"),
        Filters(lang="de"),
        Filters(lang="x"),
        Filters(lang="es", include=(RARE_WORD,)),
        Filters(lang="fr"),
        Filters(tags=("rare_tag",)),
        Filters(tags=("art",)),
        Filters(tags=("istanbul",)),
        Filters(tags=("İstanbul".lower(),)),
        Filters(tags=("café",)),
        Filters(domain="rare.example.net"),
        Filters(domain="example.net"),
        Filters(domain="example.org"),
        Filters(domain="youtube.com", include=(COMMON_WORD,)),
        Filters(domain="github.com"),
        Filters(domain="evil.com"),
        Filters(domain="org"),
        Filters(domain="y.org"),
        Filters(domain="absent.example"),
        Filters(mention=RARE_MENTION),
        Filters(mention=AUTHORS[0], include=(RARE_WORD,)),
        Filters(mention="did:plc:nobody"),
        Filters(lang="uk", tags=("rare_tag",), domain="example.net", mention=RARE_MENTION),
        Filters(lang="uk", tags=("art",)),
        Filters(tags=("rare_tag", "art")),  # every tag must match
        Filters(include=(ABSENT_WORD,), lang="en"),
        Filters(lang="uk", since_us=day2, until_us=day2 + DAY),
        Filters(tags=("rare_tag",), author=RARE_AUTHOR),
    ]
    before, read = _narrowed(), _rows_read()
    for filters in cases:
        # the first pages (common values fill them from the first windows), and small pages
        # past them (the walk moves on to later windows and to the narrowed row groups)
        expected = _all_rows(without, filters, pages=3)
        assert _all_rows(with_index, filters, pages=3) == expected, filters
        small = _all_rows(without, filters, limit=7, pages=6)
        assert _all_rows(with_index, filters, limit=7, pages=6) == small, filters
    assert _narrowed() > before, "the filter keys were used"
    assert _rows_read() > read, "candidate rows were read one by one"
    # the rare values are found (the index must not lose them), exactly the posts holding them
    assert len(_all_rows(with_index, Filters(lang="uk"))) == 4
    assert len(_all_rows(with_index, Filters(mention=RARE_MENTION))) == 4
    assert len(_all_rows(with_index, Filters(domain="example.net"))) == 4


def test_filter_keys_narrow_a_walk_to_the_rows_that_hold_the_value(store: Settings) -> None:
    """A rare language reads only its own rows: the candidate rows the walk gets."""
    engine = _engine(store, True)
    try:
        snap = engine.snapshot()
        engine.warm()
        segments = [
            seg
            for day, paths in snap.days["posts"].items()
            for path in paths
            for seg in engine._segments(path, day)
        ]
        cur = engine._cursor()
        try:
            narrowed = engine._narrow(cur, segments, Filters(lang="uk"), None, None)
        finally:
            cur.close()
        assert narrowed is not None
        kept, restrict, exact = narrowed
        assert len(kept) == 4 and len(segments) == 80  # rows 333 and 1777 of each day
        assert restrict == {}  # nothing is scanned
        assert sorted(r for rows in exact.values() for r in rows.tolist()) == [333, 333, 1777, 1777]
    finally:
        engine.close()


def test_an_index_of_format_2_narrows_by_text_only(store: Settings) -> None:
    """Indexes written before the filter keys stay valid: they narrow by text and author, and
    a filter alone reads the files as before (never trusting keys such an index cannot hold)."""
    data_dir = Path(store.data_dir)
    for rel in read_manifest(data_dir).table_files("posts"):
        sidecar = textindex.sidecar_path(data_dir / rel)
        table = pq.read_table(sidecar)
        meta = dict(table.schema.metadata or {})
        meta[b"textindex"] = b"2"
        pq.write_table(table.replace_schema_metadata(meta), sidecar)
    old, scan = _engine(store, True), _engine(store, False)
    try:
        segments = [
            seg
            for day, paths in old.snapshot().days["posts"].items()
            for path in paths
            for seg in old._segments(path, day)
        ]
        cur = old._cursor()
        try:
            assert old._narrow(cur, segments, Filters(lang="uk"), None, None) is None
            narrowed = old._narrow(cur, segments, Filters(include=(RARE_WORD,)), None, None)
            assert narrowed is not None and len(narrowed[0]) < len(segments)
        finally:
            cur.close()
        for filters in (Filters(lang="uk"), Filters(include=(RARE_WORD,), tags=("art",))):
            assert _all_rows(old, filters) == _all_rows(scan, filters)
    finally:
        old.close()
        scan.close()


def test_an_index_of_format_3_narrows_row_groups_by_every_filter(store: Settings) -> None:
    """Indexes written before the row postings stay valid: every filter narrows to row groups,
    which are scanned, and the answers are the same."""
    data_dir = Path(store.data_dir)
    for rel in read_manifest(data_dir).table_files("posts"):
        sidecar = textindex.sidecar_path(data_dir / rel)
        table = pq.read_table(sidecar).drop_columns(["n", "rows"])
        meta = dict(table.schema.metadata or {})
        meta[b"textindex"] = b"3"
        pq.write_table(table.replace_schema_metadata(meta), sidecar)
    old, scan = _engine(store, True), _engine(store, False)
    try:
        before, read = _narrowed(), _rows_read()
        for filters in (
            Filters(lang="uk"),
            Filters(include=(RARE_WORD,), tags=("art",)),
            Filters(mention=RARE_MENTION),
            Filters(include=(RARE_WORD,), author=AUTHORS[3]),
        ):
            assert _all_rows(old, filters) == _all_rows(scan, filters), filters
        assert _narrowed() > before and _rows_read() == read
    finally:
        old.close()
        scan.close()


def test_rows_read_one_by_one_merge_with_files_not_indexed(store: Settings) -> None:
    """Batch files of a compacted day (no index yet, scanned) whose posts interleave in time
    with the compacted file's rows (read by row number): one answer, in order, page by page."""
    data = ParquetData(Path(store.data_dir))
    rng = random.Random(11)
    for day in range(2):
        for i in range(0, 2500, 9):  # between the compacted posts, 30 s apart
            text = rng.choice([RARE_WORD, f"{COMMON_WORD} {RARE_WORD}", "plain words"])
            feats = _features(rng, i)
            data.post(text, t=T0_US + day * DAY + i * 30 * SEC + 7 * SEC, **feats)
            if i % 27 == 0:  # the same instant as a compacted post: ordered by uri
                data.post(RARE_WORD, t=T0_US + day * DAY + i * 30 * SEC, langs=["uk"])
    data.flush()
    with_index, without = _engine(store, True), _engine(store, False)
    try:
        read = _rows_read()
        for filters in (
            Filters(include=(RARE_WORD,)),
            Filters(include=(RARE_WORD,), sort="oldest"),
            Filters(lang="uk"),
            Filters(include=(RARE_WORD,), lang="uk", since_us=T0_US + DAY // 3),
            Filters(mention=RARE_MENTION),
        ):
            for limit in (7, 100):
                expected = _all_rows(without, filters, limit=limit)
                assert _all_rows(with_index, filters, limit=limit) == expected, filters
        assert _rows_read() > read
    finally:
        with_index.close()
        without.close()


def test_deleted_posts_stay_hidden_with_the_index(store: Settings) -> None:
    engine = _engine(store, True)
    try:
        first = engine.search(Filters(include=(RARE_WORD,)), limit=100).posts
        assert first
        victim = first[len(first) // 2]
        data = ParquetData(Path(store.data_dir))
        data.flushes = 100
        data.delete(victim.uri, t=T0_US + 2 * DAY + SEC)
        data.flush()
        after = [p.uri for p in engine.search(Filters(include=(RARE_WORD,)), limit=100).posts]
        assert victim.uri not in after
        assert len(after) == len(first) - 1
    finally:
        engine.close()


def test_a_missing_or_corrupt_index_falls_back_to_scanning(store: Settings) -> None:
    data_dir = Path(store.data_dir)
    files = [data_dir / p for p in read_manifest(data_dir).table_files("posts")]
    plain = _engine(store, False)
    expected = {
        q: _all_rows(plain, Filters(include=parse_q(q)[0])) for q in (RARE_WORD, "house", "日本")
    }
    plain.close()
    textindex.sidecar_path(files[0]).unlink()
    textindex.sidecar_path(files[1]).write_bytes(b"PAR1 not an index at all PAR1")
    missing = metrics.api_text_index.labels("missing")._value.get()
    invalid = metrics.api_text_index.labels("invalid")._value.get()
    engine = _engine(store, True)
    try:
        for q, rows in expected.items():
            assert _all_rows(engine, Filters(include=parse_q(q)[0])) == rows
    finally:
        engine.close()
    assert metrics.api_text_index.labels("missing")._value.get() == missing + 1
    assert metrics.api_text_index.labels("invalid")._value.get() == invalid + 1


def test_an_index_of_another_file_is_refused(store: Settings) -> None:
    data_dir = Path(store.data_dir)
    first, second = [data_dir / p for p in read_manifest(data_dir).table_files("posts")]
    textindex.sidecar_path(second).write_bytes(textindex.sidecar_path(first).read_bytes())
    plain = _engine(store, False)
    expected = _all_rows(plain, Filters(include=(RARE_WORD,)))
    plain.close()
    engine = _engine(store, True)
    try:
        assert _all_rows(engine, Filters(include=(RARE_WORD,))) == expected
    finally:
        engine.close()


def test_a_recompaction_retires_the_index_with_its_file(store: Settings) -> None:
    data_dir = Path(store.data_dir)
    day = DAY1
    old = read_manifest(data_dir).table_files("posts", [day])
    data = ParquetData(data_dir)
    data.flushes = 200
    data.post(f"a late {RARE_WORD}", t=T0_US + 5 * SEC)
    data.flush()
    assert compact.compact_partition(store, "posts", day) is not None
    new = read_manifest(data_dir).table_files("posts", [day])
    assert set(new).isdisjoint(old)
    for rel in new + old:  # the old index stays for the grace period, like its file
        assert textindex.sidecar_path(data_dir / rel).exists()
    # an orphaned index (its data file gone) is swept by the next compaction
    orphan = data_dir / "posts" / f"date={day}" / "c-0000000000000000-000.tidx"
    orphan.write_bytes(b"x")
    engine = _engine(store, True)
    try:
        rows = [p.text for p in engine.search(Filters(include=(RARE_WORD,)), limit=100).posts]
        assert f"a late {RARE_WORD}" in rows
    finally:
        engine.close()
    assert compact.remove_expired(store, now=10**12) >= len(old)
    for rel in old:
        assert not (data_dir / rel).exists()
        assert not textindex.sidecar_path(data_dir / rel).exists()
    for rel in new:
        assert textindex.sidecar_path(data_dir / rel).exists()
    assert compact.compact_partition(store, "posts", day, force=True) is not None
    assert not orphan.exists()


def test_an_index_that_cannot_be_written_leaves_the_file_scannable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    data = ParquetData(Path(settings.data_dir))
    data.post(f"the {RARE_WORD}", t=T0_US)
    data.flush()
    failures = metrics.compact_index_failures._value.get()

    def broken(con: duckdb.DuckDBPyConnection, path: Path) -> textindex.Built:
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(textindex, "build", broken)
    assert compact.compact_partition(settings, "posts", DAY1) is not None
    assert metrics.compact_index_failures._value.get() == failures + 1
    engine = QueryEngine(settings)
    try:
        assert len(engine.search(Filters(include=(RARE_WORD,)), limit=10).posts) == 1
    finally:
        engine.close()


def test_pieces_in_many_vocabulary_entries_are_not_looked_up(
    engines: tuple[QueryEngine, QueryEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(textindex, "MAX_ENTRIES_PER_FILE", 3)  # row-group lookups (format < 4)
    monkeypatch.setattr(postings, "MAX_KEY_ROWS", 2000)  # row postings: "e" lists more
    with_index, without = engines
    skipped = metrics.api_text_index.labels("not_selective")._value.get()
    for filters in (
        Filters(include=("e",)),
        Filters(include=("e", RARE_WORD)),
        Filters(include=("e",), author=RARE_AUTHOR),
        Filters(include=(f"{RARE_WORD} e",)),
    ):
        assert _all_rows(with_index, filters) == _all_rows(without, filters), filters
    assert metrics.api_text_index.labels("not_selective")._value.get() > skipped
    con = duckdb.connect()
    sidecars = [str(textindex.sidecar_path(Path(p))) for p in with_index.snapshot().files("posts")]
    assert textindex.candidate_groups(con, sidecars, ["e"], None) is None
    narrowed = textindex.candidate_groups(con, sidecars, ["e", RARE_WORD], None)
    assert narrowed == textindex.candidate_groups(con, sidecars, [RARE_WORD], None)
