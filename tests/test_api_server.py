"""`appliance serve` as a real process: several Sanic workers, summed metrics, clean stop, fuzzing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import Settings, to_environ
from tests.conftest import T0_US, ParquetData, free_port, make_settings, stop_process
from tests.helpers import metric_values, wait_until

SEC = 1_000_000


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def get(self, path: str, **params: str) -> tuple[int, bytes]:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


def start_server(settings: Settings, tmp_path: Path, workers: int) -> Server:
    """`python -m appliance serve` on a free port; returns once /ready answers 200."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, **to_environ(settings), "APPLIANCE_LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port),
           "--workers", str(workers), "--data-dir", settings.data_dir]  # fmt: skip
    with open(log, "wb") as out:
        # Its own session: Sanic answers a second SIGTERM by killing its whole process group,
        # which would otherwise be pytest's (seen twice in full runs on a loaded machine).
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"appliance serve exited: {log.read_text()[-3000:]}")
        return server.get("/ready")[0] == 200

    try:
        wait_until(ready, 60, "appliance serve's /ready", interval=0.2, errors=(OSError,))
    except AssertionError:
        stop_process(proc)
        raise AssertionError(f"appliance serve not ready: {log.read_text()[-3000:]}") from None
    return server


@pytest.fixture
def dataset(parquet_data: ParquetData) -> ParquetData:
    for i in range(300):
        post = parquet_data.post(
            f"post {i} {'hello' if i % 3 == 0 else 'world'}",
            t=T0_US + i * 600 * SEC,
            did=f"did:plc:user{i % 7}",
            langs=["en"],
            tags=["tag"] if i % 5 == 0 else None,
            links=["https://example.com/x"] if i % 4 == 0 else None,
        )
        if i % 10 == 0:
            parquet_data.delete(post["uri"], t=post["time_us"] + SEC)
    for u in range(7):
        parquet_data.identity(f"did:plc:user{u}", f"user{u}.example.com", t=T0_US)
    parquet_data.flush()
    return parquet_data


@pytest.fixture
def server(tmp_path: Path, dataset: ParquetData) -> Iterator[Server]:
    settings = make_settings(tmp_path, cache_entries=0)
    srv = start_server(settings, tmp_path, workers=2)
    yield srv
    stop_process(srv.proc)


def test_metrics_are_summed_over_two_workers_and_sigterm_stops_cleanly(server: Server) -> None:
    sent = 0
    workers: set[object] = set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(10):  # until both workers have answered (the kernel picks one per accept)
            statuses = list(
                pool.map(lambda i: server.get("/v1/search", q=f"post {i}")[0], range(20))
            )
            assert statuses == [200] * 20
            sent += 20
            workers = {
                line["worker"] for line in server.log_lines() if line.get("route") == "/v1/search"
            }
            if len(workers) >= 2:
                break
    assert len(workers) == 2, "both workers should have answered"
    assert server.get("/v1/search", bogus="1")[0] == 400
    for _ in range(4):  # whichever worker answers the scrape, it reports every worker's requests
        values = metric_values(server.get("/metrics")[1].decode())
        assert (
            values['appliance_api_requests_total{method="GET",route="/v1/search",status="200"}']
            == sent
        )
        assert (
            values['appliance_api_requests_total{method="GET",route="/v1/search",status="400"}']
            == 1
        )
        assert (
            values['appliance_api_request_duration_seconds_count{route="/v1/search",status="200"}']
            == sent
        )
        assert not any(name.startswith("appliance_ingest") for name in values)
    metrics_dir = next(line["metrics_dir"] for line in server.log_lines() if "metrics_dir" in line)
    assert Path(str(metrics_dir)).is_dir()
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not Path(str(metrics_dir)).exists()


def test_a_search_through_the_real_server(server: Server) -> None:
    status, body = server.get("/v1/search", q="hello", author="user3.example.com", limit="5")
    assert status == 200
    posts = json.loads(body)["posts"]
    # i % 3 == 0 and i % 7 == 3, not deleted (i % 10 != 0): newest first
    expected = [i for i in range(299, -1, -1) if i % 3 == 0 and i % 7 == 3 and i % 10 != 0][:5]
    assert [p["text"] for p in posts] == [f"post {i} hello" for i in expected]
    assert {p["handle"] for p in posts} == {"user3.example.com"}
    status, body = server.get("/v1/export", q="hello", format="csv", limit="3")
    assert status == 200 and body.count(b"\r\n") == 5  # header, 3 rows, the summary row
    assert body.endswith(b"# export complete: rows=3 limit=3 result_limit_reached=true\r\n")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    """Property-based requests from /openapi.json (valid and invalid): never a 5xx."""
    before = metric_values(server.get("/metrics")[1].decode())
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st),
            "run",
            server.base + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "1000",
            "--seed",
            "7",
            "--workers",
            "2",
            "--generation-database",
            "none",
            "--exclude-path",
            "/metrics",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    after = metric_values(server.get("/metrics")[1].decode())
    requests = {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k.startswith("appliance_api_requests_total")
    }
    assert sum(requests.values()) >= 1000, (requests, result.stdout[-3000:])
    assert not any('status="5' in k and v > 0 for k, v in requests.items()), requests
