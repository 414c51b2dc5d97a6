"""GET /xrpc/app.bsky.feed.searchPosts and /xrpc/_health through a real Sanic server, driven by
the real `atproto` Python SDK (and by `@atproto/api` in Node where node and npm exist).

The data is a generated firehose written by the batcher's own code path (frames → stream
entries → Arrow → Parquet → manifest), so posts carry real-shaped records and CIDs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from atproto import Client, models  # type: ignore[import-untyped]
from atproto_client.exceptions import BadRequestError  # type: ignore[import-untyped]

from appliance.api.xrpc import INVALID_HANDLE, NSID, split_operators
from appliance.batch import files, transform
from appliance.batch.tables import TableBuilder
from appliance.buffer import pack
from appliance.config import Settings
from loadtest.firehose import COMMON_WORD, DEFAULT_START_US, FirehoseConfig, generate
from tests.conftest import REPO_ROOT, make_settings, stop_process
from tests.helpers import commit
from tests.test_admission import Served, _hold, held  # noqa: F401 (a fixture)
from tests.test_api_server import start_server

EVENTS = 20_000
KNOWN_DID = "did:plc:xrpcknownauthoraaaaaaaaa"
KNOWN_HANDLE = "known.example.com"
NODE_DIR = Path(__file__).parent / "xrpc_node"
MENTIONED = "did:plc:xrpcmentionedaaaaaaaaaa"
TAG = "app.bsky.richtext.facet#tag"
KNOWN_POSTS = 4


def write_firehose(settings: Settings, frames: list[bytes]) -> None:
    """Store frames as the batcher does: entries of 100 events, one batch, files + manifest."""
    entries = [(f"1-{i}", pack(frames[i : i + 100])) for i in range(0, len(frames), 100)]
    batch = transform.Batch("new", TableBuilder(store_cids=settings.store_cids))
    batch.add_entries(entries)
    files.write_batch(settings, batch, files.StoredKeys())


def cid_of(data: bytes) -> str:
    """A well-formed CIDv1 (dag-cbor, sha-256) string, as strict clients parse it."""
    digest = bytes([0x01, 0x71, 0x12, 0x20]) + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(digest).decode().lower().rstrip("=")


def extra_frames() -> list[bytes]:
    """An author with a handle, posting the common word: a reply, a quote, an external link."""
    t = DEFAULT_START_US + 30_000_000
    parent = f"at://{KNOWN_DID}/app.bsky.feed.post/3mptbyoeyc22a"
    records = [
        {"text": f"{COMMON_WORD} from a known author", "langs": ["en"]},
        {
            "text": f"{COMMON_WORD} a reply",
            "reply": {"root": {"uri": parent, "cid": "x"}, "parent": {"uri": parent, "cid": "x"}},
        },
        {
            "text": f"{COMMON_WORD} #alpha #beta @someone",
            "facets": [
                {
                    "index": {"byteStart": 11, "byteEnd": 17},
                    "features": [{"$type": TAG, "tag": "alpha"}],
                },
                {
                    "index": {"byteStart": 18, "byteEnd": 23},
                    "features": [{"$type": TAG, "tag": "beta"}],
                },
                {
                    "index": {"byteStart": 24, "byteEnd": 32},
                    "features": [{"$type": "app.bsky.richtext.facet#mention", "did": MENTIONED}],
                },
            ],
        },
        {
            "text": f"{COMMON_WORD} with a link",
            "embed": {
                "$type": "app.bsky.embed.external",
                "external": {"uri": "https://news.example.org/a", "title": "", "description": ""},
            },
        },
    ]
    frames = []
    for i, record in enumerate(records):
        frame = commit(
            {"$type": "app.bsky.feed.post", "createdAt": "2026-07-01T00:00:30.000Z", **record},
            did=KNOWN_DID,
            rkey=f"3mptbyoeyc2{i + 2}k",
            rev=f"3mptbypcq37{i + 2}f",
            time_us=t + i,
        )
        event = json.loads(frame)
        event["commit"]["cid"] = cid_of(frame)
        frames.append(json.dumps(event).encode())
    identity = {
        "did": KNOWN_DID,
        "time_us": t - 1,
        "kind": "identity",
        "identity": {
            "did": KNOWN_DID,
            "handle": KNOWN_HANDLE,
            "seq": 1,
            "time": "2026-07-01T00:00:29Z",
        },
    }
    return [json.dumps(identity).encode(), *frames]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`appliance serve` over a generated firehose; yields its base URL."""
    tmp = tmp_path_factory.mktemp("xrpc")
    settings = make_settings(tmp)
    cfg = FirehoseConfig(seed=7, events=EVENTS, events_per_day=2_000_000)
    write_firehose(settings, [*generate(cfg), *extra_frames()])
    served = start_server(settings, tmp, workers=1)
    yield served.base
    stop_process(served.proc)
    assert b'"status": 500' not in served.log.read_bytes()


def xrpc(base: str, params: Any) -> httpx.Response:
    return httpx.get(f"{base}/xrpc/{NSID}", params=params, timeout=30)


def all_pages_sdk(sdk: Client, **params: Any) -> list[Any]:
    """Every post of a search, paging with the SDK and its cursor."""
    posts: list[Any] = []
    cursor = None
    while True:
        page = sdk.app.bsky.feed.search_posts({**params, "cursor": cursor})
        assert isinstance(page, models.AppBskyFeedSearchPosts.Response)
        posts.extend(page.posts)
        if page.cursor is None:
            return posts
        assert len(page.posts) == params.get("limit", 25)
        cursor = page.cursor


def test_the_atproto_sdk_pages_through_a_search_and_parses_every_post(server: str) -> None:
    sdk = Client(base_url=server)  # unauthenticated, as a researcher would point it at us
    posts = all_pages_sdk(sdk, q=COMMON_WORD, limit=7)
    assert len(posts) > 20  # several pages
    assert len({p.uri for p in posts}) == len(posts)
    times = [p.indexed_at for p in posts]
    assert times == sorted(times, reverse=True)  # newest first (sort=latest)
    for post in posts:
        assert isinstance(post, models.AppBskyFeedDefs.PostView)
        assert post.uri.startswith(f"at://{post.author.did}/app.bsky.feed.post/")
        assert post.cid.startswith("bafyrei") and len(post.cid) == 59
        text = post.record["text"] if isinstance(post.record, dict) else post.record.text
        assert COMMON_WORD in text.lower()
    plain = [p for p in posts if not p.record["reply"] and not p.record["embed"]]
    assert plain and all(isinstance(p.record, models.AppBskyFeedPost.Record) for p in plain)
    handles = {p.author.did: p.author.handle for p in posts}
    assert handles[KNOWN_DID] == KNOWN_HANDLE
    assert INVALID_HANDLE in handles.values()  # DIDs the archive has no handle for


def test_the_sdk_applies_every_filter(server: str) -> None:
    sdk = Client(base_url=server)
    mine = all_pages_sdk(sdk, q=COMMON_WORD, author=KNOWN_HANDLE, limit=100)
    assert {p.author.did for p in mine} == {KNOWN_DID} and len(mine) == KNOWN_POSTS
    assert [p.uri for p in all_pages_sdk(sdk, q=f"{COMMON_WORD} from:{KNOWN_HANDLE}")] == [
        p.uri for p in mine
    ]
    reply = all_pages_sdk(sdk, q=f'"{COMMON_WORD} a reply"', author=KNOWN_DID)
    assert len(reply) == 1 and reply[0].record["reply"]["parent"]["uri"].endswith("/3mptbyoeyc22a")
    linked = all_pages_sdk(sdk, q=COMMON_WORD, url="https://news.example.org/a")
    assert [p.author.did for p in linked] == [KNOWN_DID]
    assert linked[0].record["embed"]["external"]["uri"] == "https://news.example.org/a"
    assert [p.uri for p in all_pages_sdk(sdk, q=COMMON_WORD, domain="example.org")][:1] == [
        linked[0].uri
    ]
    tagged = all_pages_sdk(sdk, q=COMMON_WORD, tag=["alpha", "#BETA"])
    assert [p.author.did for p in tagged] == [KNOWN_DID]  # every tag must match
    assert all_pages_sdk(sdk, q=COMMON_WORD, tag=["alpha", "gamma"]) == []
    mentioning = all_pages_sdk(sdk, q=COMMON_WORD, mentions=MENTIONED)
    assert [p.uri for p in mentioning] == [tagged[0].uri]
    assert [p.uri for p in all_pages_sdk(sdk, q=f"mentions:{MENTIONED} {COMMON_WORD}")] == [
        tagged[0].uri
    ]
    english = all_pages_sdk(sdk, q=f"{COMMON_WORD} lang:en", limit=100)
    assert english and all(
        any(lang.lower().startswith("en") for lang in p.record["langs"] or []) for p in english
    )
    day = all_pages_sdk(
        sdk, q=COMMON_WORD, since="2026-07-01T00:00:30Z", until="2026-07-01T00:00:31Z"
    )
    assert {p.author.did for p in day} == {KNOWN_DID}


def test_rest_and_xrpc_return_the_same_posts_in_the_same_order(server: str) -> None:
    for rest, xrpc_params in (
        ({"q": COMMON_WORD}, {"q": COMMON_WORD}),
        ({"q": COMMON_WORD, "lang": "en"}, {"q": COMMON_WORD, "lang": "en"}),
        ({"q": f"{COMMON_WORD} -the"}, {"q": f"{COMMON_WORD} -the", "sort": "top"}),
        ({"author": KNOWN_HANDLE}, {"q": f"from:{KNOWN_HANDLE}"}),
    ):
        rest_uris: list[str] = []
        cursor = None
        while True:
            page = httpx.get(
                f"{server}/v1/search",
                params={**rest, "limit": 9, **({"cursor": cursor} if cursor else {})},
            ).json()
            rest_uris += [p["uri"] for p in page["posts"]]
            if not (cursor := page["cursor"]):
                break
        xrpc_uris: list[str] = []
        cursor = None
        while True:
            body = xrpc(
                server, {**xrpc_params, "limit": 13, **({"cursor": cursor} if cursor else {})}
            ).json()
            xrpc_uris += [p["uri"] for p in body["posts"]]
            if not (cursor := body.get("cursor")):
                break
        assert rest_uris and xrpc_uris == rest_uris, rest


@pytest.mark.parametrize(
    ("params", "error", "needle"),
    [
        ({}, "InvalidRequest", '"q"'),
        ({"q": "x", "limit": "0"}, "InvalidRequest", "limit"),
        ({"q": "x", "limit": "101"}, "InvalidRequest", "limit"),
        ({"q": "x", "limit": "ten"}, "InvalidRequest", "limit"),
        ({"q": "x", "cursor": "not-a-cursor"}, "InvalidRequest", "cursor"),
        (
            {"q": "x", "cursor": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
            "InvalidRequest",
            "cursor",
        ),
        ({"q": "x", "since": "yesterday"}, "InvalidRequest", "since"),
        ({"q": "x", "until": "2026-13-45"}, "InvalidRequest", "until"),
        ({"q": "x", "since": "2026-07-02", "until": "2026-07-01"}, "InvalidRequest", "until"),
        ({"q": "since:nope"}, "InvalidRequest", "since"),
        ({"q": "x", "sort": "best"}, "InvalidRequest", "sort"),
        ({"q": "x", "author": "not a handle"}, "InvalidRequest", "author"),
        ({"q": "x", "mentions": "did:x"}, "InvalidRequest", "mentions"),
        ({"q": "x", "lang": "english!"}, "InvalidRequest", "lang"),
        ({"q": "x", "domain": "http://x/y"}, "InvalidRequest", "domain"),
        ({"q": "x", "url": "not a url"}, "InvalidRequest", "url"),
        ({"q": "x", "limit": ["5", "6"]}, "InvalidRequest", "limit"),
        ({"q": "from:me"}, "BadQueryString", "from:me"),
        ({"q": "from:a.example.com", "author": "b.example.com"}, "BadQueryString", "author"),
        ({"q": "x" * 513}, "BadQueryString", "q"),
        ({"q": " ".join(["w"] * 17)}, "BadQueryString", "q"),
        ({"q": "x\x00"}, "InvalidRequest", "q"),
    ],
)
def test_bad_input_gets_an_xrpc_error_body_never_a_500(
    server: str, params: dict[str, Any], error: str, needle: str
) -> None:
    response = xrpc(server, params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == error
    assert needle in body["message"]


def test_the_sdk_raises_the_xrpc_error(server: str) -> None:
    with pytest.raises(BadRequestError) as info:
        Client(base_url=server).app.bsky.feed.search_posts({"q": "x", "limit": 100, "cursor": "zz"})
    assert info.value.response.content.error == "InvalidRequest"


def test_a_cursor_of_another_query_is_refused(server: str) -> None:
    first = xrpc(server, {"q": COMMON_WORD, "limit": 2}).json()
    response = xrpc(server, {"q": "something else", "cursor": first["cursor"]})
    assert response.status_code == 400 and "cursor" in response.json()["message"]


def test_health_other_methods_and_the_openapi_document(server: str) -> None:
    preflight = httpx.options(f"{server}/xrpc/{NSID}", headers={"Origin": "https://x.example"})
    assert preflight.status_code == 204  # CORS preflight (allowed origins: APPLIANCE_CORS_ORIGINS)
    health = httpx.get(f"{server}/xrpc/_health")
    assert health.status_code == 200 and health.json()["version"]
    other = httpx.get(f"{server}/xrpc/app.bsky.feed.getTimeline")
    assert other.status_code == 501 and other.json()["error"] == "MethodNotImplemented"
    document = httpx.get(f"{server}/openapi.json").json()
    operation = document["paths"][f"/xrpc/{NSID}"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"q", "tag", "limit", "cursor", "url"}
    assert "SearchPostsOutput" in document["components"]["schemas"]
    assert "/xrpc/_health" in document["paths"]


def test_q_operators_split_from_the_text() -> None:
    assert split_operators('from:alice.example.com "lang:en stays" cats -domain:x.org lang:pt') == (
        '"lang:en stays" cats -domain:x.org',
        {"author": "alice.example.com", "lang": "pt"},
    )


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH: the @atproto/api client test needs them",
)
def test_the_node_atproto_api_client_pages_and_validates(server: str, tmp_path: Path) -> None:
    """@atproto/api validates every response against the lexicons (XRPCInvalidResponseError)."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    cache = REPO_ROOT / ".cache" / f"xrpc_node-{hashlib.sha256(lock).hexdigest()[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "search.mjs"):
        if (NODE_DIR / name).exists():
            shutil.copy(NODE_DIR / name, cache / name)
    if not (cache / "node_modules" / "@atproto" / "api").is_dir():
        install = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=cache, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.skip(f"npm could not install @atproto/api: {install.stderr[-500:]}")
    run = subprocess.run(
        ["node", "search.mjs", server, COMMON_WORD, KNOWN_HANDLE],
        cwd=cache, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    sdk = Client(base_url=server)
    python_uris = [p.uri for p in all_pages_sdk(sdk, q=COMMON_WORD, limit=7)]
    assert result["uris"] == python_uris
    assert result["known_handle_posts"] == KNOWN_POSTS
    assert result["error"] == "InvalidRequest"


def test_an_overloaded_worker_answers_not_enough_resources(
    held: Callable[..., tuple[Served, threading.Event, threading.Event]],  # noqa: F811
) -> None:
    """The admission control of /v1/search applies to XRPC: 503 NotEnoughResources, Retry-After."""
    client, entered, release = held(api_max_waiting=0)
    thread, _ = _hold(client, entered)
    refused = client.get(f"/xrpc/{NSID}?q=post")
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "NotEnoughResources"
    release.set()
    thread.join(30)
    served = client.get(f"/xrpc/{NSID}?q=post")
    assert served.status_code == 200 and len(served.json()["posts"]) == 20
