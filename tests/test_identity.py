"""DIDs to verified handles and handles to DIDs, against loopback fakes of the PLC directory,
the handles' HTTPS hosts and a DNS server (tests/identity_fakes.py), with the real worker
process (`appliance identity`), the real identity store and the query engine over real files."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sanic_testing.reusable import ReusableClient

from appliance.api.app import create_app
from appliance.config import Settings, to_environ
from appliance.identity.resolver import (
    INVALID_HANDLE,
    RateLimited,
    Resolution,
    Resolver,
    Unavailable,
    dns_txt_lookup,
    retry_after,
)
from appliance.identity.store import Store
from appliance.identity.worker import _scan_posts
from appliance.query.engine import QueryEngine
from appliance.query.model import Filters
from appliance.store import layout
from loadtest.identity_fakes import DnsServer, IdentityWeb, plc_document
from tests.conftest import T0_US, ParquetData, free_port, make_settings, stop_process
from tests.helpers import http_get, wait_until

SEC = 1_000_000
ALICE = "did:plc:" + "a" * 24
BOB = "did:plc:" + "b" * 24
MALLORY = "did:plc:" + "m" * 24
GONE = "did:plc:" + "g" * 24
ZED = "did:plc:" + "z" * 24


@pytest.fixture
def web() -> Iterator[IdentityWeb]:
    server = IdentityWeb()
    yield server
    server.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def id_settings(tmp_path: Path, web: IdentityWeb, dns_server: DnsServer) -> Settings:
    return make_settings(
        tmp_path,
        plc_url=web.url,
        identity_web_origin=web.url,
        identity_dns=(dns_server.address,),
        identity_rate=50.0,
        identity_timeout_s=2.0,
    )


def resolve(settings: Settings, did: str) -> Resolution:
    async def go() -> Resolution:
        txt = dns_txt_lookup(settings.identity_dns, 1.0)
        async with Resolver(
            plc_url=settings.plc_url,
            timeout_s=1.0,
            txt=txt,
            web_origin=settings.identity_web_origin,
        ) as resolver:
            return await resolver.resolve_did(did)

    return asyncio.run(go())


# --- the resolver -------------------------------------------------------------------------------


def test_a_did_gets_the_handle_its_dns_record_or_https_host_confirms(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer
) -> None:
    web.add(ALICE, "alice.test")
    dns_server.txt("_atproto.alice.test", f"did={ALICE}")
    web.add(BOB, "Bob.Example.test", atproto_did=BOB + "\n")
    assert resolve(id_settings, ALICE) == Resolution(ALICE, "ok", "alice.test", "alice.test")
    assert resolve(id_settings, BOB).handle == "bob.example.test"  # no TXT record: HTTPS
    assert "_atproto.bob.example.test" in dns_server.queries
    assert ("bob.example.test", "/.well-known/atproto-did") in web.state.web_requests


def test_a_handle_that_does_not_resolve_back_is_handle_invalid(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer
) -> None:
    web.add(MALLORY, "alice.test")  # claims alice's handle
    dns_server.txt("_atproto.alice.test", f"did={ALICE}")
    assert resolve(id_settings, MALLORY) == Resolution(
        MALLORY, "invalid", INVALID_HANDLE, "alice.test"
    )
    web.add(BOB, "bob.test", atproto_did=ALICE)  # the HTTPS host names another DID
    assert resolve(id_settings, BOB).handle == INVALID_HANDLE
    web.add(ZED, None)  # no handle at all
    assert resolve(id_settings, ZED).outcome == "invalid"
    assert resolve(id_settings, GONE) == Resolution(GONE, "not_found", None)


def test_did_web_documents_come_from_the_host(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer
) -> None:
    did = "did:web:carol.test"
    web.state.did_web["carol.test"] = plc_document(did, "carol.test")
    dns_server.txt("_atproto.carol.test", f"did={did}")
    assert resolve(id_settings, did).handle == "carol.test"
    web.state.did_web["dave.test"] = plc_document("did:web:other.test", "dave.test")
    assert resolve(id_settings, "did:web:dave.test").outcome == "not_found"  # id mismatch


def test_no_answer_is_not_a_verdict(
    tmp_path: Path, id_settings: Settings, web: IdentityWeb
) -> None:
    """A DNS server that does not answer, a PLC that is down or rate-limits: exceptions the
    worker retries on, never a handle.invalid."""
    web.add(ALICE, "alice.test")  # HTTPS host answers 404, DNS does not answer at all
    deaf = make_settings(
        tmp_path, plc_url=web.url, identity_web_origin=web.url, identity_dns=("127.0.0.1:9",)
    )
    with pytest.raises(Unavailable):
        resolve(deaf, ALICE)
    web.state.rate_limited, web.state.retry_after = 1, "7"
    with pytest.raises(RateLimited) as limited:
        resolve(id_settings, ALICE)
    assert limited.value.retry_after_s == 7
    web.state.down = True
    with pytest.raises(Unavailable) as down:
        resolve(id_settings, ALICE)
    assert down.value.plc


def test_a_host_without_a_dns_server_gets_unavailable_not_a_crash(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("# no nameserver line\n")
    lookup = dns_txt_lookup((), 1.0, resolv_conf=str(resolv_conf))
    with pytest.raises(Unavailable, match="no DNS server"):
        asyncio.run(lookup("_atproto.alice.test"))


def test_retry_after_takes_seconds_or_a_date() -> None:
    assert retry_after("30") == 30
    assert retry_after("Wed, 02 Dec 2026 15:00:30 GMT", now=1_796_223_600.0) == 30
    assert retry_after(None) == retry_after("soon") == 60


# --- the worker, the store and searches -----------------------------------------------------------


class Worker:
    """`python -m appliance identity` as a real child process."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        env = {**os.environ, **to_environ(settings), "APPLIANCE_LOG_FORMAT": "json"}
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "identity"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = http_get(self.settings.identity_port, "/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def outcome(self, outcome: str) -> float:
        return self.metrics()[("appliance_identity_resolutions_total", (("outcome", outcome),))]

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Any]:
    started: list[Worker] = []

    def start(settings: Settings) -> Worker:
        w = Worker(settings, tmp_path / "identity.log")
        started.append(w)
        wait_until(
            lambda: http_get(settings.identity_port, "/health")[0] == 200,
            30,
            "the identity worker's /health",
            errors=(OSError,),
        )
        return w

    yield start
    for w in started:
        w.stop()


def handles(engine: QueryEngine) -> dict[str, str | None]:
    return {p.did: p.handle for p in engine.search(Filters(), limit=100).posts}


def test_the_worker_backfills_handles_and_searches_show_them(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer, worker: Any
) -> None:
    data = ParquetData(Path(id_settings.data_dir))
    web.add(ALICE, "alice.test")
    dns_server.txt("_atproto.alice.test", f"did={ALICE}")
    web.add(MALLORY, "alice.test")
    web.add(BOB, "bob.test", atproto_did=BOB)
    for i, did in enumerate((ALICE, MALLORY, GONE)):
        data.post(f"post {i}", t=T0_US + i * SEC, did=did, mentions=[BOB])
    data.flush()
    engine = QueryEngine(id_settings)
    try:
        assert set(handles(engine).values()) == {None}  # nothing resolved yet
        w = worker(id_settings)
        wait_until(
            lambda: (
                w.outcome("not_found") == 1
                and handles(engine)[ALICE] == "alice.test"
                and handles(engine)[MALLORY] == INVALID_HANDLE
            ),
            30,
            "the backfill",
        )
        assert handles(engine) == {ALICE: "alice.test", MALLORY: INVALID_HANDLE, GONE: None}
        assert [p.did for p in engine.search(Filters(author="alice.test"), limit=10).posts] == [
            ALICE
        ]
        # the mentioned account was resolved too, so mention= by handle finds the posts
        wait_until(lambda: w.outcome("ok") == 2, 30, "the mentioned DID's resolution")
        assert len(engine.search(Filters(mention="bob.test"), limit=10).posts) == 3
        identity = engine.stats()["identity"]
        assert identity["dids"] == 4 and identity["verified"] == 2 and identity["invalid"] == 1
        assert identity["posts_counted"] == 3 and identity["posts_with_verified_handle"] == 1 / 3
        wait_until(
            lambda: w.metrics()[("appliance_identity_posts_with_handle_ratio", ())] > 0.6,
            30,  # the store's gauges are updated every 10 s
            "the gauges after the resolutions",
        )
        m = w.metrics()
        assert m[("appliance_identity_queue_length", ())] == 0
        assert m[("appliance_identity_posts_with_handle_ratio", ())] == pytest.approx(2 / 3)
        # stored durably: a restarted worker resolves nothing again
        requests = len(web.plc_requests())
        w.stop()
        w = worker(id_settings)
        verified = ("appliance_identity_dids", (("status", "verified"),))
        wait_until(lambda: w.metrics().get(verified) == 2, 30, "the store's gauges")
        assert w.metrics()[("appliance_identity_queue_length", ())] == 0
        assert len(web.plc_requests()) == requests
    finally:
        engine.close()


def test_a_handle_change_from_the_firehose_wins_at_once(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer, worker: Any
) -> None:
    data = ParquetData(Path(id_settings.data_dir))
    web.add(ALICE, "alice.test")
    dns_server.txt("_atproto.alice.test", f"did={ALICE}")
    data.post("hello", t=T0_US, did=ALICE)
    data.flush()
    engine = QueryEngine(id_settings)
    try:
        worker(id_settings)
        wait_until(lambda: handles(engine)[ALICE] == "alice.test", 30, "the resolution")
        # the account renames itself; the PLC fake still serves the old document
        data.identity(ALICE, "alice-renamed.test", t=int(time.time() * SEC))
        data.flush()
        assert handles(engine)[ALICE] == "alice-renamed.test"  # the moment it is batched
        assert len(engine.search(Filters(author="alice-renamed.test"), limit=5).posts) == 1
        store = Store(id_settings.data_dir)
        try:
            wait_until(
                lambda: (
                    store._read("SELECT handle, source FROM dids WHERE did = ?", (ALICE,))
                    == [("alice-renamed.test", "firehose")]
                ),
                30,
                "the worker applying the event",
            )
        finally:
            store.close()
        assert handles(engine)[ALICE] == "alice-renamed.test"
        # an identity event older than the resolution does not undo it
        data.identity(ALICE, "ancient.test", t=T0_US)
        data.flush()
        assert handles(engine)[ALICE] == "alice-renamed.test"
    finally:
        engine.close()


def test_author_by_a_handle_never_seen_is_resolved_at_query_time(
    id_settings: Settings, web: IdentityWeb, dns_server: DnsServer
) -> None:
    data = ParquetData(Path(id_settings.data_dir))
    for i in range(3):
        data.post(f"zed {i}", t=T0_US + i * SEC, did=ZED)
    data.post("someone else", t=T0_US, did=ALICE)
    data.flush()
    web.add(ZED, "zed.test")
    dns_server.txt("_atproto.zed.test", f"did={ZED}")
    web.add(ALICE, "impostor.test", atproto_did=ZED)  # names ZED, whose document disagrees
    client = ReusableClient(create_app(id_settings), port=free_port())
    client.run()
    try:
        _, response = client.get("/v1/search", params={"author": "zed.test"})
        assert response.status_code == 200
        assert [p["text"] for p in response.json["posts"]] == ["zed 2", "zed 1", "zed 0"]
        _, response = client.get("/v1/search", params={"author": "impostor.test"})
        assert response.json["posts"] == []
        web.state.down = True  # remembered: the second search needs no resolver
        _, response = client.get("/v1/search", params={"author": "zed.test", "limit": 1})
        assert [p["text"] for p in response.json["posts"]] == ["zed 2"]
        _, metrics_response = client.get("/metrics")
        assert 'appliance_api_identity_lookups_total{kind="did_of",result="live"} 2.0' in (
            metrics_response.text
        )
    finally:
        client.stop()


def test_a_resolver_outage_never_fails_a_search(tmp_path: Path) -> None:
    """Nothing answers (the conftest settings point at a closed port): searches by handle
    find nothing, quickly, and searches by DID work as ever."""
    settings = make_settings(tmp_path, identity_query_timeout_s=1.0)
    data = ParquetData(Path(settings.data_dir))
    data.post("zed", t=T0_US, did=ZED)
    data.flush()
    engine = QueryEngine(settings)
    try:
        assert engine.search(Filters(author="zed.test"), limit=5).posts == []
        assert [p.did for p in engine.search(Filters(author=ZED), limit=5).posts] == [ZED]
        assert engine.lookup_handle("zed.test").source == "unavailable"
        assert engine.stats()["identity"] is None  # no worker has run: no store
    finally:
        engine.close()


def _many(data: ParquetData, n: int, web: IdentityWeb) -> list[str]:
    dids = ["did:plc:" + "".join("abcdefghij"[int(c)] for c in f"{i:024d}") for i in range(n)]
    for i, did in enumerate(dids):
        web.add(did, f"user{i}.test", atproto_did=did)
        data.post(f"post {i}", t=T0_US + i, did=did)
    data.flush()
    return dids


def test_a_429_pauses_the_backfill_for_its_retry_after(
    id_settings: Settings, web: IdentityWeb, worker: Any
) -> None:
    data = ParquetData(Path(id_settings.data_dir))
    dids = _many(data, 12, web)
    web.state.rate_limited, web.state.retry_after = 2, "2"
    engine = QueryEngine(id_settings)
    try:
        w = worker(id_settings)
        wait_until(lambda: w.outcome("rate_limited") >= 1, 30, "a 429")
        # searches answer while the backfill waits
        assert len(engine.search(Filters(), limit=100).posts) == 12
        wait_until(lambda: w.outcome("ok") == len(dids), 60, "every DID resolved")
        requests = web.plc_requests()
        last_429 = max(t for t, _, status in requests if status == 429)
        # Retry-After: 2 was waited out (requests in flight when the 429 came aside: 0.5 s)
        assert not [t for t, _, _ in requests if last_429 + 0.5 < t < last_429 + 1.9]
        assert max(t for t, _, _ in requests) > last_429 + 1.9
        assert set(handles(engine).values()) == {f"user{i}.test" for i in range(12)}
    finally:
        engine.close()


def test_a_plc_outage_slows_the_backfill_and_it_resumes(
    id_settings: Settings, web: IdentityWeb, worker: Any
) -> None:
    data = ParquetData(Path(id_settings.data_dir))
    dids = _many(data, 5, web)
    web.state.down = True
    engine = QueryEngine(id_settings)
    try:
        w = worker(id_settings)
        wait_until(lambda: w.outcome("unavailable") >= 3, 30, "failed attempts")
        wait_until(lambda: w.metrics()[("appliance_identity_paused", ())] == 1, 10, "a pause")
        failed = len(web.plc_requests())
        assert set(handles(engine).values()) == {None}  # searches answer, without handles
        web.state.down = False
        wait_until(lambda: w.outcome("ok") == len(dids), 60, "the backfill resuming")
        # an outage backs off (1, 2, 4 s ...) instead of hammering the directory
        assert failed <= 8
    finally:
        engine.close()


def test_the_backfill_keeps_to_its_rate(
    tmp_path: Path, web: IdentityWeb, dns_server: DnsServer, worker: Any
) -> None:
    settings = make_settings(
        tmp_path,
        plc_url=web.url,
        identity_web_origin=web.url,
        identity_dns=(dns_server.address,),
        identity_rate=10.0,
    )
    data = ParquetData(Path(settings.data_dir))
    dids = _many(data, 30, web)
    w = worker(settings)
    wait_until(lambda: w.outcome("ok") == len(dids), 60, "every DID resolved")
    times = sorted(t for t, _, _ in web.plc_requests())
    # a bucket of 10 tokens refilled at 10/s: 30 requests take about 2 s at least
    assert times[-1] - times[0] >= 1.5


def test_a_scan_counts_authors_posts_once_and_adds_mentioned_dids(tmp_path: Path) -> None:
    """Batch files count their authors' posts; a compaction output (whose rows were counted in
    the batch files it replaced) only adds DIDs."""
    data = ParquetData(tmp_path / "data")
    data.post("a", t=T0_US, did=ALICE, mentions=[BOB, "not-a-did"])
    data.post("b", t=T0_US + 1, did=ALICE)
    data.post("c", t=T0_US + 2, did=MALLORY, mentions=None)
    (rel,) = data.flush()
    batch_file = tmp_path / "data" / rel
    compacted = batch_file.with_name(layout.COMPACTED_PREFIX + "copy.parquet")
    shutil.copy(batch_file, compacted)
    store = Store(tmp_path / "data")
    try:
        _scan_posts(store, batch_file, rel)
        _scan_posts(store, compacted, "compacted")
        rows = store._read("SELECT did, posts FROM dids ORDER BY did")
        assert rows == sorted([(ALICE, 2), (BOB, 0), (MALLORY, 1)])
        assert store.is_scanned(rel) and store.is_scanned("compacted")
        # new DIDs are due at once, the most prolific first
        assert store.claim_due(time.time(), 10, 60) == [ALICE, MALLORY, BOB]
    finally:
        store.close()
