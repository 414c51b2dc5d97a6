"""One way to say each thing: timestamps in one format, numbers parsed one way, undecodable bytes
and over-long values refused with the documented 400, HEAD wherever GET works."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from appliance.api.models import Q_MAX
from tests.helpers import wait_until
from tests.test_api import Api, api, corpus  # noqa: F401 - fixtures

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_every_timestamp_has_microseconds_and_z_so_string_order_is_time_order(
    api: Callable[..., Api],  # noqa: F811
    corpus: Any,  # noqa: F811
) -> None:
    a = api()
    posts = a.search(limit=100)["posts"]
    stamps = [p["indexed_at"] for p in posts] + [p["created_at"] for p in posts]
    assert stamps and all(STAMP.fullmatch(s) for s in stamps), stamps
    indexed = [p["indexed_at"] for p in posts]
    assert indexed == sorted(indexed, reverse=True)  # newest first, compared as strings
    stats = a.get("/v1/stats").json
    assert STAMP.fullmatch(stats["newest_event_at"])
    exported = a.get("/v1/export", {"format": "csv"}).text.splitlines()[1:-1]
    assert all(STAMP.search(line) for line in exported)
    jsonl = a.get("/v1/export", {"format": "jsonl"}).text
    assert jsonl.count('"indexed_at":"') == len(posts)
    assert all(STAMP.fullmatch(s) for s in re.findall(r'"indexed_at":"([^"]+)"', jsonl))


def test_numbers_are_decimal_digits_only(api: Callable[..., Api], corpus: Any) -> None:  # noqa: F811
    a = api()
    assert a.search(limit="05")["limit"] == 5
    assert len(a.search(limit="05")["posts"]) == 5
    assert a.search(page="02", limit="3")["page"] == 2
    for bad in ("1e2", "5.0", "+5", " 5", "0x10", "１０", "-1"):
        body = a.error("/v1/search", {"limit": bad})
        assert body["parameter"] == "limit", bad
    assert a.error("/v1/export", {"limit": "1e2"})["parameter"] == "limit"


def test_bytes_that_are_not_utf8_are_a_400_not_an_empty_result(
    api: Callable[..., Api],  # noqa: F811
    corpus: Any,  # noqa: F811
) -> None:
    a = api()
    for path in ("/v1/search?q=caf%E9", "/v1/export?q=%FF%FE"):
        _, response = a.client.get(path)
        assert response.status_code == 400, response.text
        assert response.json["parameter"] == "q"
        assert "UTF-8" in response.json["detail"]
    _, response = a.client.get("/v1/search?%C3%28=1")
    assert response.status_code == 400 and "UTF-8" in response.json["detail"]
    assert a.search(q="café")["posts"]  # valid UTF-8, percent-encoded, still finds


def test_an_over_long_q_gets_the_documented_400_and_names_are_not_echoed_whole(
    api: Callable[..., Api],  # noqa: F811
) -> None:
    a = api()
    body = a.error("/v1/search", {"q": "x" * 10_000})
    assert body["parameter"] == "q" and str(Q_MAX) in body["detail"]
    name = "n" * 5_000
    body = a.error("/v1/search", {name: "1"})
    assert body["error"].startswith("invalid parameter: nnn") and len(body["error"]) < 120
    assert len(body["parameter"]) <= 65
    # Past the request-line limit (16 KiB) the answer is 413, as JSON like every error.
    _, response = a.client.get("/v1/search", params={"q": "x" * 20_000})
    assert response.status_code == 413
    assert response.json["error"] and response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "path",
    ["/v1/search?q=cat", "/v1/export?q=cat", "/v1/stats", "/health", "/ready", "/metrics",
     "/openapi.json", "/docs", "/docs/assets/swagger-ui.css"],
)  # fmt: skip
def test_head_works_where_get_does(api: Callable[..., Api], corpus: Any, path: str) -> None:  # noqa: F811
    a = api()
    wait_until(lambda: a.get("/ready").status_code == 200, 20, "/ready")
    _, get = a.client.get(path)
    _, head = a.client.head(path)
    assert get.status_code == 200
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
