"""The REST API through a real Sanic server (sanic-testing's ReusableClient) over hand-made files.

Every dataset is written here, so each assertion names the exact posts a query must return.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sanic_testing.reusable import ReusableClient

from appliance.api.app import create_app
from appliance.config import Settings
from appliance.query.engine import QueryEngine
from appliance.query.model import QueryTimeout
from tests.conftest import T0_US, ParquetData, free_port, make_settings
from tests.helpers import metric_values, wait_until

SEC = 1_000_000
DAY = 86_400 * SEC
ALICE, BOB, CAROL = "did:plc:alice", "did:plc:bob", "did:plc:carol"


class Api:
    """A running app and a client for it."""

    def __init__(self, client: ReusableClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def get(self, path: str, params: Any = None, **kwargs: Any) -> Any:
        _, response = self.client.get(path, params=params, **kwargs)
        return response

    def search(self, **params: Any) -> dict[str, Any]:
        response = self.get("/v1/search", params)
        assert response.status_code == 200, response.text
        return response.json  # type: ignore[no-any-return]

    def texts(self, **params: Any) -> list[str]:
        return [p["text"] for p in self.search(limit=100, **params)["posts"]]

    def error(self, path: str, params: Any, status: int = 400) -> dict[str, Any]:
        response = self.get(path, params)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        body: dict[str, Any] = response.json
        assert set(body) >= {"error", "detail"}
        return body


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Factory: `api(**setting_overrides)` starts the app on a free port over tmp_path/data."""
    clients: list[ReusableClient] = []

    def start(**overrides: Any) -> Api:
        settings = make_settings(tmp_path, **overrides)
        client = ReusableClient(create_app(settings), port=free_port())
        client.run()
        clients.append(client)
        return Api(client, settings)

    yield start
    for client in clients:
        client.stop()


@pytest.fixture
def corpus(parquet_data: ParquetData) -> dict[str, dict[str, Any]]:
    """A small mixed corpus over three days; keys name the posts."""
    d = parquet_data
    t = T0_US
    posts = {
        "cat": d.post(
            "The Cat sat",
            t=t,
            did=ALICE,
            langs=["en"],
            tags=["Cats"],
            links=["https://www.example.com/a"],
            mentions=[BOB],
        ),
        "dog": d.post(
            "a dog barked",
            t=t + 1 * SEC,
            did=BOB,
            langs=["en-US"],
            external_uri="https://sub.example.org/x",
            embed_kind="external",
        ),
        "catdog": d.post("cat and dog", t=t + DAY, did=CAROL, langs=["de"], tags=["pets"]),
        "caps": d.post("CAT IN CAPS", t=t + DAY + SEC, did=ALICE, mentions=[CAROL]),
        "phrase": d.post("good morning world", t=t + DAY + 2 * SEC, did=BOB),
        "reverse": d.post("morning good", t=t + DAY + 3 * SEC, did=BOB),
        "pct": d.post("100% sure", t=t + 2 * DAY, did=CAROL),
        "percent": d.post("100 percent sure", t=t + 2 * DAY + SEC, did=CAROL),
        "under": d.post("a_b c", t=t + 2 * DAY + 2 * SEC, did=CAROL),
        "axb": d.post("aXb c", t=t + 2 * DAY + 3 * SEC, did=CAROL),
        "backslash": d.post("back\\slash", t=t + 2 * DAY + 4 * SEC, did=CAROL),
        "quote": d.post("it's fine", t=t + 2 * DAY + 5 * SEC, did=CAROL),
        "drop": d.post("'; DROP TABLE posts; --", t=t + 2 * DAY + 6 * SEC, did=CAROL),
        "cafe": d.post("Café au lait", t=t + 2 * DAY + 7 * SEC, did=ALICE, langs=["fr"]),
    }
    d.identity(ALICE, "alice.example.com", t=t)
    d.identity(BOB, "bob.example.com", t=t)
    d.flush()
    return posts


def names(corpus: dict[str, dict[str, Any]], posts: list[dict[str, Any]]) -> list[str]:
    by_uri = {row["uri"]: name for name, row in corpus.items()}
    return [by_uri[p["uri"]] for p in posts]


def found(api: Api, corpus: dict[str, dict[str, Any]], **params: Any) -> list[str]:
    return names(corpus, api.search(limit=100, **params)["posts"])


# --- search parameters -----------------------------------------------------------------------


def test_q_matches_case_insensitive_substrings_newest_first(
    api: Callable[..., Api], corpus: Any
) -> None:
    a = api()
    assert found(a, corpus, q="cat") == ["caps", "catdog", "cat"]
    assert found(a, corpus, q="CAT", exact="true") == ["caps"]
    assert found(a, corpus, q="Cat", exact="true") == ["cat"]
    assert found(a, corpus, q="cat dog") == ["catdog"]
    assert found(a, corpus, q="cat -dog") == ["caps", "cat"]
    assert found(a, corpus, q='"good morning"') == ["phrase"]
    assert found(a, corpus, q="good morning") == ["reverse", "phrase"]
    assert found(a, corpus, q='-"good morning" morning') == ["reverse"]
    assert found(a, corpus, q="café") == ["cafe"]
    assert found(a, corpus, q="CAFÉ") == ["cafe"]
    assert len(found(a, corpus, q="-cat")) == len(corpus) - 3
    assert found(a, corpus, q="zebra") == []


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("100%", ["pct"]),
        ("%", ["pct"]),
        ("a_b", ["under"]),
        ("_", ["under"]),
        ("back\\slash", ["backslash"]),
        ("\\", ["backslash"]),
        ("it's", ["quote"]),
        ("'", ["drop", "quote"]),
        ("'; DROP TABLE posts;", ["drop"]),
        ("'; DROP TABLE posts; --", []),  # unquoted, "--" excludes "-", which the post has
        ('"\'; DROP TABLE posts; --"', ["drop"]),
        ("%' OR '1'='1", []),
        ("$1", []),
    ],
)
def test_wildcards_and_injection_match_only_literally(
    api: Callable[..., Api], corpus: Any, q: str, expected: list[str]
) -> None:
    a = api()
    assert found(a, corpus, q=q) == expected
    assert len(found(a, corpus)) == len(corpus)  # nothing was dropped or altered


def test_author_and_mention_by_did_or_handle(api: Callable[..., Api], corpus: Any) -> None:
    a = api()
    assert found(a, corpus, author=ALICE) == ["cafe", "caps", "cat"]
    assert found(a, corpus, author="alice.example.com") == ["cafe", "caps", "cat"]
    assert found(a, corpus, author="@Alice.Example.com") == ["cafe", "caps", "cat"]
    assert found(a, corpus, author="nobody.example.com") == []
    assert found(a, corpus, mention=BOB) == ["cat"]
    assert found(a, corpus, mention="bob.example.com") == ["cat"]
    assert found(a, corpus, mention=CAROL) == ["caps"]
    handles = {p["did"]: p["handle"] for p in a.search(limit=100)["posts"]}
    assert handles == {ALICE: "alice.example.com", BOB: "bob.example.com", CAROL: None}


def test_lang_tag_and_domain(api: Callable[..., Api], corpus: Any) -> None:
    a = api()
    assert found(a, corpus, lang="en") == ["dog", "cat"]
    assert found(a, corpus, lang="EN-us") == ["dog"]
    assert found(a, corpus, lang="de") == ["catdog"]
    assert found(a, corpus, tag="cats") == ["cat"]
    assert found(a, corpus, tag="#CATS") == ["cat"]
    assert found(a, corpus, tag="cat") == []  # a tag matches whole
    assert found(a, corpus, domain="example.com") == ["cat"]
    assert found(a, corpus, domain="www.example.com") == ["cat"]
    assert found(a, corpus, domain="example.org") == ["dog"]
    assert found(a, corpus, domain="ample.com") == []
    assert found(a, corpus, domain="EXAMPLE.COM.") == ["cat"]


def test_since_is_inclusive_and_until_exclusive(api: Callable[..., Api], corpus: Any) -> None:
    a = api()
    assert found(a, corpus, since="2026-06-03") == found(a, corpus)[:8]
    assert found(a, corpus, until="2026-06-02") == ["dog", "cat"]
    assert found(a, corpus, since="2026-06-02", until="2026-06-03") == [
        "reverse",
        "phrase",
        "caps",
        "catdog",
    ]
    assert found(a, corpus, since="2026-06-01T00:00:01Z", until="2026-06-02") == ["dog"]
    assert found(a, corpus, since="2026-06-01T02:00:00+02:00", until="2026-06-01T00:00:01") == [
        "cat"
    ]


def test_sort_oldest_and_combined_filters(api: Callable[..., Api], corpus: Any) -> None:
    a = api()
    assert found(a, corpus, q="cat", sort="oldest") == ["cat", "catdog", "caps"]
    assert found(a, corpus, q="cat", author="alice.example.com", since="2026-06-02") == ["caps"]
    assert found(a, corpus, q="a", lang="en", domain="example.org", sort="oldest") == ["dog"]
    body = a.search(q="cat", limit=2)
    assert names(corpus, body["posts"]) == ["caps", "catdog"]
    assert body["has_more"] is True and body["cursor"] and body["page"] == 1
    post = body["posts"][1]
    assert post["indexed_at"] == "2026-06-02T00:00:00.000000Z"
    assert set(post) >= {"uri", "did", "handle", "text", "created_at", "indexed_at", "langs",
                         "reply_parent", "reply_root", "quote", "embed_kind", "links",
                         "mentions", "tags"}  # fmt: skip


# --- pages and cursors -----------------------------------------------------------------------


@pytest.fixture
def many(parquet_data: ParquetData) -> list[str]:
    """1100 posts over four days (newest first by uri)."""
    rows = [parquet_data.post(f"item {i}", t=T0_US + i * 300 * SEC) for i in range(1100)]
    parquet_data.flush()
    return [r["uri"] for r in reversed(rows)]


def test_pages_reach_the_result_limit_and_no_further(
    api: Callable[..., Api], many: list[str]
) -> None:
    a = api()
    got: list[str] = []
    for page in range(1, 21):
        body = a.search(q="item", page=page)
        assert body["page"] == page and len(body["posts"]) == 50
        got += [p["uri"] for p in body["posts"]]
    assert got == many[:1000] and len(set(got)) == 1000
    assert body["has_more"] is False and body["result_limit_reached"] is True
    error = a.error("/v1/search", {"q": "item", "page": 21})
    assert error["parameter"] == "page"
    assert [p["uri"] for p in a.search(limit=100, page=10)["posts"]] == many[900:1000]
    assert a.error("/v1/search", {"limit": 100, "page": 11})["parameter"] == "page"


def test_without_the_flag_pages_go_past_the_limit(api: Callable[..., Api], many: list[str]) -> None:
    a = api(result_limit=False)
    assert [p["uri"] for p in a.search(q="item", page=21)["posts"]] == many[1000:1050]
    last = a.search(q="item", page=22)
    assert [p["uri"] for p in last["posts"]] == many[1050:1100] and last["has_more"] is False
    assert a.search(q="item", page=23)["posts"] == []


def test_cursor_paging_stops_at_the_result_limit(api: Callable[..., Api], many: list[str]) -> None:
    a = api()
    got, params = [], {"q": "item", "limit": 100}
    while True:
        body = a.search(**params)
        got += [p["uri"] for p in body["posts"]]
        if not body["cursor"]:
            break
        params = {"q": "item", "limit": 100, "cursor": body["cursor"]}
    assert got == many[:1000]
    assert body["result_limit_reached"] is True and body["page"] == 10


@pytest.mark.parametrize("sort", ["latest", "oldest"])
def test_cursor_paging_has_no_gaps_or_repeats_while_batches_land(
    api: Callable[..., Api], parquet_data: ParquetData, sort: str
) -> None:
    first = [parquet_data.post(f"x {i}", t=T0_US + i * 60 * SEC) for i in range(230)]
    parquet_data.flush()
    a = api()
    got, cursor, n = [], None, 230
    while True:
        params = {"q": "x", "limit": 40, "sort": sort, **({"cursor": cursor} if cursor else {})}
        body = a.search(**params)
        got += [p["uri"] for p in body["posts"]]
        cursor = body["cursor"]
        if not cursor:
            break
        # a batch lands between pages: newer posts, in a new file
        for _ in range(7):
            parquet_data.post(f"x {n}", t=T0_US + n * 60 * SEC)
            n += 1
        parquet_data.flush()
    assert len(got) == len(set(got))
    original = [r["uri"] for r in first]
    if sort == "latest":
        assert got == original[::-1]  # the newer posts are above the cursor
    else:
        assert got[:230] == original and len(got) == n  # the newer ones follow at the end


# --- deletions and updates -------------------------------------------------------------------


def test_deleted_and_superseded_posts_never_appear(
    api: Callable[..., Api], parquet_data: ParquetData
) -> None:
    keep = parquet_data.post("word keep", t=T0_US)
    gone = parquet_data.post("word gone", t=T0_US + SEC)
    edit = parquet_data.post("word before", t=T0_US + 2 * SEC, rkey="3kedit")
    parquet_data.flush()
    a = api()
    assert a.texts(q="word") == ["word before", "word gone", "word keep"]
    parquet_data.delete(gone["uri"], t=T0_US + DAY)
    parquet_data.post("word after", t=T0_US + DAY + SEC, rkey="3kedit", operation="update")
    parquet_data.flush()
    assert a.texts(q="word") == ["word after", "word keep"]
    exported = a.get("/v1/export", {"q": "word", "format": "jsonl"}).text.splitlines()[:-1]
    assert [json.loads(line)["uri"] for line in exported] == [edit["uri"], keep["uri"]]


# --- export ----------------------------------------------------------------------------------


def _normalise(post: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in post.items():
        if key in {"created_at", "indexed_at"} and value not in (None, ""):
            value = value if isinstance(value, str) else value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out[key] = "" if value is None else value
    return out


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_export_format_parses_back_to_the_search_results(
    api: Callable[..., Api], parquet_data: ParquetData, corpus: Any, fmt: str
) -> None:
    for i in range(150):
        parquet_data.post(
            f'word {i}, "quoted"\nline two; ü' if i % 3 else f"word {i}",
            t=T0_US + 3 * DAY + i * SEC,
            did=ALICE,
            langs=["en", "de"] if i % 2 else None,
            tags=["t,1"] if i % 5 == 0 else None,
        )
    parquet_data.flush()
    a = api()
    expected = a.search(q="word", limit=100)["posts"]
    expected += a.search(q="word", limit=100, page=2)["posts"]
    response = a.get("/v1/export", {"q": "word", "format": fmt})
    assert response.status_code == 200
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment; filename=") and disposition.endswith(f'.{fmt}"')
    if fmt == "csv":
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8"), newline="")))
        trailer = rows.pop()
        assert trailer["uri"] == "# export complete: rows=150 limit=1000 result_limit_reached=false"
        for row in rows:
            for key in ("langs", "links", "mentions", "tags"):
                row[key] = json.loads(row[key])
        assert b"\r\n" in response.content
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in response.text.splitlines()]
        assert rows.pop() == {
            "export": {"complete": True, "rows": 150, "limit": 1000, "result_limit_reached": False}
        }
    else:
        rows = pq.read_table(io.BytesIO(response.content)).to_pylist()
        kv = pq.ParquetFile(io.BytesIO(response.content)).metadata.metadata
        assert json.loads(kv[b"appliance.export"])["rows"] == 150
    assert len(rows) == 150 + 0  # 150 "word" posts; the corpus has none
    assert [_normalise(r) for r in rows] == [_normalise(p) for p in expected]


def test_export_caps_rows_and_refuses_a_limit_over_the_cap(
    api: Callable[..., Api], many: list[str]
) -> None:
    a = api()
    lines = a.get("/v1/export", {"format": "jsonl"}).text.splitlines()[:-1]
    assert [json.loads(line)["uri"] for line in lines] == many[:1000]
    assert len(a.get("/v1/export", {"format": "jsonl", "limit": 10}).text.splitlines()) == 10 + 1
    body = a.error("/v1/export", {"limit": 1001}, status=413)
    assert body["parameter"] == "limit"
    b = api(result_limit=False, export_hard_cap=1050)
    assert len(b.get("/v1/export", {"format": "jsonl"}).text.splitlines()) == 1050 + 1
    b.error("/v1/export", {"limit": 1051}, status=413)


def test_an_export_cut_short_after_its_headers_ends_as_an_incomplete_download(
    api: Callable[..., Api], many: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = QueryEngine.export

    def times_out_after_one_batch(self: QueryEngine, filters: Any, max_rows: int) -> Any:
        batches = real(self, filters, max_rows)
        yield next(batches)
        raise QueryTimeout("interrupted")

    monkeypatch.setattr(QueryEngine, "export", times_out_after_one_batch)
    # Exports of up to PREFETCH_ROWS rows are gathered before the headers (an error then gets
    # its status, see test_a_query_past_the_timeout_is_504); a larger one streams after its
    # first batch, so an error after that must cut the download.
    a = api(result_limit=False)
    with pytest.raises(ValueError, match="Request and response object expected"):
        # sanic-testing reports no response: its httpx client got "peer closed connection
        # without sending complete message body" rather than a short file that looks whole
        a.get("/v1/export", {"format": "csv"})


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"bogus": "1"}, "bogus"),
        ([("q", "a"), ("q", "b")], "q"),
        ({"q": "a\x00b"}, "q"),
        ({"q": "x" * 513}, "q"),
        ({"q": " ".join(["w"] * 9 + [f"v{i}" for i in range(9)])}, "q"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"page": "0"}, "page"),
        ({"page": "1", "cursor": "abc"}, "cursor"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"sort": "random"}, "sort"),
        ({"exact": "maybe"}, "exact"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-13-01"}, "since"),
        ({"until": "2026-06-01T25:00"}, "until"),
        ({"since": "2026-06-02", "until": "2026-06-01"}, "until"),
        ({"since": "2026-06-02", "until": "2026-06-02"}, "until"),
        ({"since": "0001-01-01"}, "since"),
        ({"author": "not a handle"}, "author"),
        ({"author": "did:nope"}, "author"),
        ({"mention": "https://bsky.app/profile/x"}, "mention"),
        ({"lang": "english!"}, "lang"),
        ({"tag": "two words"}, "tag"),
        ({"domain": "https://example.com/x"}, "domain"),
        ({"domain": "exa mple.com"}, "domain"),
    ],
)
def test_bad_search_parameters_are_400_naming_the_parameter(
    api: Callable[..., Api], params: Any, parameter: str
) -> None:
    body = api().error("/v1/search", params)
    assert body["parameter"] == parameter
    assert parameter in body["error"]


def test_a_tampered_cursor_is_400(api: Callable[..., Api], many: list[str]) -> None:
    a = api()
    cursor = a.search(q="item")["cursor"]
    tampered = cursor[:-3] + ("AAA" if not cursor.endswith("AAA") else "BBB")
    assert a.error("/v1/search", {"q": "item", "cursor": tampered})["parameter"] == "cursor"
    assert a.error("/v1/search", {"q": "other", "cursor": cursor})["parameter"] == "cursor"
    assert a.search(q="item", cursor=cursor)["page"] == 2


def test_export_and_stats_validate_too(api: Callable[..., Api]) -> None:
    a = api()
    assert a.error("/v1/export", {"format": "xlsx"})["parameter"] == "format"
    assert a.error("/v1/export", {"page": "2"})["parameter"] == "page"
    assert a.error("/v1/export", {"limit": "0"})["parameter"] == "limit"
    assert a.error("/v1/stats", {"x": "1"})["parameter"] == "x"


def test_unknown_routes_and_methods_are_json(api: Callable[..., Api]) -> None:
    a = api()
    assert a.error("/v2/search", None, status=404)["error"] == "not found"
    _, response = a.client.post("/v1/search")
    assert response.status_code == 405 and response.json["error"] == "method not allowed"


def test_a_query_past_the_timeout_is_504(
    api: Callable[..., Api], parquet_data: ParquetData
) -> None:
    for i in range(3000):
        parquet_data.post(f"filler {i}", t=T0_US + i * SEC)
    parquet_data.flush()
    a = api(query_timeout_s=0.001)
    body = a.error("/v1/search", {"q": "absent"}, status=504)
    assert body["error"] == "query timeout"
    a.error("/v1/export", {"q": "absent"}, status=504)


# --- the rest of the surface -----------------------------------------------------------------


def test_request_ids_cors_and_preflight(api: Callable[..., Api], corpus: Any) -> None:
    a = api(cors_origins=("https://front.example",))
    response = a.get(
        "/v1/search", None, headers={"X-Request-ID": "abc-123", "Origin": "https://front.example"}
    )
    assert response.headers["x-request-id"] == "abc-123"
    assert response.headers["access-control-allow-origin"] == "https://front.example"
    generated = a.get(
        "/v1/search", None, headers={"X-Request-ID": "bad id", "Origin": "https://evil.example"}
    )
    assert len(generated.headers["x-request-id"]) == 32
    assert "access-control-allow-origin" not in generated.headers
    _, pre = a.client.options(
        "/v1/export",
        headers={"Origin": "https://front.example", "Access-Control-Request-Method": "GET"},
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://front.example"
    assert "GET" in pre.headers["access-control-allow-methods"]


def test_health_ready_stats_metrics_and_docs(api: Callable[..., Api], corpus: Any) -> None:
    a = api()
    assert a.get("/health").json == {"status": "ok"}
    ready = wait_until(lambda: (r := a.get("/ready")).status_code == 200 and r, 20, "/ready")
    assert ready.json["ready"] is True
    stats = a.get("/v1/stats").json
    assert stats["posts"] == len(corpus) and stats["events"] == len(corpus) + 2
    assert [d["date"] for d in stats["days"]] == ["2026-06-01", "2026-06-02", "2026-06-03"]
    before = metric_values(a.get("/metrics").text)
    a.search(q="cat")
    a.search(q="cat")
    after = metric_values(a.get("/metrics").text)
    searches = 'appliance_api_requests_total{method="GET",route="/v1/search",status="200"}'
    assert after[searches] - before.get(searches, 0) == 2
    hits = 'appliance_api_cache_lookups_total{result="hit"}'
    assert after[hits] - before.get(hits, 0) == 1  # the second search came from the cache
    assert after['appliance_api_query_duration_seconds_count{kind="search"}'] >= 1
    spec = a.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    search = spec["paths"]["/v1/search"]["get"]
    assert search["summary"].startswith("Search posts")
    assert {p["name"] for p in search["parameters"]} >= {"q", "author", "limit", "page", "cursor"}
    assert "SearchResponse" in spec["components"]["schemas"]
    assert "swagger-ui" in a.get("/docs").text


def test_ready_is_503_when_the_data_root_is_gone(api: Callable[..., Api], tmp_path: Path) -> None:
    a = api(data_dir=str(tmp_path / "missing"))
    response = a.get("/ready")
    assert response.status_code == 503
    assert response.json["data_dir_readable"] is False
