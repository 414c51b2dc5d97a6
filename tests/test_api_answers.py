"""What the API's answers say beyond the rows: whether an export was cut at its limit (in the
headers and inside the saved file), and an author the appliance has never seen versus one with
no matching posts. Real Sanic server over hand-made Parquet files (the fixtures of test_api)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
import pytest

from appliance.api import routes
from tests.test_api import ALICE, CAROL, Api, api, corpus, found, many  # noqa: F401 - fixtures


def _summary(fmt: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """(posts in the file, the summary at its end) for an export body."""
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
        *posts, last = rows[1:]
        assert len(last) == 1 and last[0].startswith("# export complete: ")
        fields = dict(
            item.split("=") for item in last[0].removeprefix("# export complete: ").split()
        )
        return len(posts), {
            "rows": int(fields["rows"]),
            "limit": int(fields["limit"]),
            "result_limit_reached": fields["result_limit_reached"] == "true",
        }
    if fmt == "jsonl":
        *posts, last = body.decode().splitlines()
        assert all("uri" in json.loads(p) for p in posts)
        summary = json.loads(last)["export"]
        assert summary.pop("complete") is True
        return len(posts), summary
    table = pq.read_table(io.BytesIO(body))
    summary = json.loads(pq.ParquetFile(io.BytesIO(body)).metadata.metadata[b"appliance.export"])
    assert summary.pop("complete") is True
    return table.num_rows, summary


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_export_cut_at_the_result_limit_says_so_in_headers_and_file(
    api: Callable[..., Api],  # noqa: F811
    many: list[str],  # noqa: F811
    fmt: str,
) -> None:
    a = api()
    cut = a.get("/v1/export", {"format": fmt})  # 1100 posts match, the limit is 1000
    assert cut.status_code == 200
    assert cut.headers["x-result-limit"] == "1000"
    assert cut.headers["x-result-count"] == "1000"
    assert cut.headers["x-result-limit-reached"] == "true"
    assert _summary(fmt, cut.content) == (
        1000,
        {"rows": 1000, "limit": 1000, "result_limit_reached": True},
    )
    whole = a.get("/v1/export", {"format": fmt, "q": '"item 10"'})  # item 10, 100..109, 1000..1099
    assert whole.headers["x-result-count"] == "111"
    assert whole.headers["x-result-limit-reached"] == "false"
    assert _summary(fmt, whole.content) == (
        111,
        {"rows": 111, "limit": 1000, "result_limit_reached": False},
    )
    asked = a.get("/v1/export", {"format": fmt, "q": '"item 10"', "limit": "111"})
    assert asked.headers["x-result-limit-reached"] == "false"  # exactly all of them
    fewer = a.get("/v1/export", {"format": fmt, "q": '"item 10"', "limit": "5"})
    assert fewer.headers["x-result-limit-reached"] == "true"
    assert _summary(fmt, fewer.content)[1]["result_limit_reached"] is True


def test_an_export_too_large_to_gather_first_says_it_at_its_end(
    api: Callable[..., Api],  # noqa: F811
    many: list[str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routes, "PREFETCH_ROWS", 10)
    a = api(result_limit=False, export_hard_cap=1050)
    response = a.get("/v1/export", {"format": "jsonl"})
    assert response.headers["x-result-limit"] == "1050"
    assert "x-result-count" not in response.headers  # not known before the rows stream
    assert _summary("jsonl", response.content) == (
        1050,
        {"rows": 1050, "limit": 1050, "result_limit_reached": True},
    )
    small = a.get("/v1/export", {"format": "csv", "q": '"item 10"'})
    assert _summary("csv", small.content) == (
        111,
        {"rows": 111, "limit": 1050, "result_limit_reached": False},
    )


def test_an_author_never_seen_is_told_apart_from_one_without_matching_posts(
    api: Callable[..., Api],  # noqa: F811
    corpus: Any,  # noqa: F811
) -> None:
    a = api()
    unknown = a.search(author="nosuchuser.bsky.social")
    assert unknown["posts"] == [] and unknown["author_known"] is False
    assert a.search(author="did:plc:nosuchaccount")["author_known"] is False
    # Known accounts without matching posts: by handle, and a DID seen only through its posts.
    none_found = a.search(author="alice.example.com", q="zebra")
    assert none_found["posts"] == [] and none_found["author_known"] is True
    assert a.search(author=CAROL, q="zebra")["author_known"] is True
    assert found(a, corpus, author=ALICE) == ["cafe", "caps", "cat"]
    assert a.search(author=ALICE)["author_known"] is True
    assert a.search(q="cat")["author_known"] is None  # not asked
    assert a.search(mention="nosuchuser.bsky.social")["mention_known"] is False
    assert a.search(mention="bob.example.com", q="zebra")["mention_known"] is True
    export = a.get("/v1/export", {"author": "nosuchuser.bsky.social", "format": "jsonl"})
    assert export.status_code == 200 and export.headers["x-author-known"] == "false"
    assert a.get("/v1/export", {"author": ALICE}).headers["x-author-known"] == "true"
