"""monitoring/ against the real thing: Prometheus and Alertmanager on free loopback ports, with
the node and Redis exporters, scraping the services of an `appliance up --replay` run.

Checks every target up, every dashboard panel's query answered with data, the stall alert
going pending -> firing in Prometheus and reaching a local webhook through Alertmanager when the
source goes silent, TargetDown reaching it when the ingester stops, and inhibition.

The test-only override (`override_copy`): monitoring/ is copied to a temporary directory and there
the scrape and evaluation interval become 1 s, every `for:` 3 s and every range window of the
rules [5s]; target files point at this run's ports; Alertmanager's template is rendered with a
webhook receiver and group_wait/group_interval of 1 s. The shipped files are not changed.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import Settings, to_environ
from loadtest.firehose import COMMON_WORD
from tests.conftest import free_port, make_settings, stop_process
from tests.helpers import MONITORING, children_of, render_alertmanager, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(
            shutil.which(t)
            for t in (
                "prometheus",
                "prometheus-alertmanager",
                "prometheus-node-exporter",
                "prometheus-redis-exporter",
            )
        ),
        reason="Prometheus, Alertmanager or an exporter is missing (make system-deps)",
    ),
]

DASHBOARDS = MONITORING / "dashboards"
# What Grafana would put in for its built-in variables when a panel is shown.
BUILTINS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${__range}": "5m",
}


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Webhook:
    """A local HTTP receiver that keeps every Alertmanager notification it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [
            a
            for note in list(self.received)
            for a in note["alerts"]
            if a["labels"]["alertname"] == name and a["status"] == status
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def override_copy(dest: Path, ports: dict[str, int]) -> Path:
    """monitoring/ with the test-only override (see the module docstring); returns the config."""
    shutil.copytree(MONITORING, dest)
    config = dest / "prometheus.yml"
    text = config.read_text()
    text = re.sub(r"(scrape_interval|evaluation_interval): \S+", r"\1: 1s", text)
    config.write_text(re.sub(r"scrape_timeout: \S+", "scrape_timeout: 1s", text))
    for rules in (dest / "rules").glob("*.yml"):
        text = re.sub(r"for: \S+", "for: 3s", rules.read_text())
        rules.write_text(re.sub(r"\[\d+[smhd]\]", "[5s]", text))
    for job, port in ports.items():
        (dest / "targets" / f"{job}.yml").write_text(
            yaml.safe_dump([{"targets": [f"127.0.0.1:{port}"], "labels": {"instance": "local"}}])
        )
    return config


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # Own session: Sanic kills its process group on a second signal; never pytest's.
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`appliance up --replay` (paced: a steady trickle of events), the exporters, Alertmanager
    with a webhook receiver, and Prometheus scraping all of them. Everything stopped by PID."""
    settings: Settings = make_settings(tmp_path)
    ports = {
        "ingester": settings.ingest_port,
        "batcher": settings.batch_port,
        "api": settings.api_port,
        "identity": settings.identity_port,
        "redis": free_port(),
        "node": free_port(),
        "prometheus": free_port(),
        "alertmanager": free_port(),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    webhook = Webhook()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopped: list[int] = []
    env = {**os.environ, **to_environ(settings)}
    try:
        procs["appliance"] = start(
            [
                *(sys.executable, "-m", "appliance", "up", "--replay"),
                *("--replay-speed", "1", "--replay-events", "500000", "--batch-interval", "2"),
            ],
            logs / "appliance.log",
            env,
        )
        procs.update(start_exporters(settings, ports, logs))
        procs["alertmanager"] = start_alertmanager(tmp_path, ports, webhook, logs)
        procs["prometheus"] = start_prometheus(tmp_path, ports, logs)
        yield {
            "settings": settings,
            "ports": ports,
            "procs": procs,
            "webhook": webhook,
            "prom": f"http://127.0.0.1:{ports['prometheus']}",
            "am": f"http://127.0.0.1:{ports['alertmanager']}",
            "logs": logs,
            "stopped": stopped,
        }
    finally:
        for pid in stopped:  # processes the test paused, so that they can stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for proc in reversed(procs.values()):
            stop_process(proc, timeout=60)
        webhook.close()


def start_exporters(
    settings: Settings, ports: dict[str, int], logs: Path
) -> dict[str, subprocess.Popen[bytes]]:
    """The node exporter (a few collectors) and the Redis exporter, on loopback."""
    node = start(
        [
            "prometheus-node-exporter",
            f"--web.listen-address=127.0.0.1:{ports['node']}",
            "--collector.disable-defaults",
            *(f"--collector.{c}" for c in ("cpu", "meminfo", "loadavg", "filesystem")),
            *("--collector.diskstats", "--collector.netdev", "--collector.uname"),
        ],
        logs / "node.log",
    )
    redis_exporter = start(
        [
            "prometheus-redis-exporter",
            f"-redis.addr=redis://127.0.0.1:{settings.redis_port}",
            f"-web.listen-address=127.0.0.1:{ports['redis']}",
        ],
        logs / "redis-exporter.log",
        # The password by environment, never on a command line.
        {"PATH": os.environ["PATH"], "REDIS_PASSWORD": settings.redis_password},
    )
    return {"node": node, "redis": redis_exporter}


def start_alertmanager(
    tmp_path: Path, ports: dict[str, int], webhook: Webhook, logs: Path
) -> subprocess.Popen[bytes]:
    """Alertmanager with the shipped template rendered for the local webhook, grouping in 1 s."""
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(
        render_alertmanager(
            alert_receiver="webhook",
            alert_webhook_url=webhook.url,
            alert_group_wait="1s",
            alert_group_interval="1s",
            alert_repeat_interval="1h",
        )
    )
    return start(
        [
            "prometheus-alertmanager",
            f"--config.file={am_config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address=",
        ],
        logs / "alertmanager.log",
    )


def start_prometheus(tmp_path: Path, ports: dict[str, int], logs: Path) -> subprocess.Popen[bytes]:
    """Prometheus over the overridden copy of monitoring/ (see the module docstring)."""
    config = override_copy(tmp_path / "monitoring", ports)
    return start(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            "--storage.tsdb.retention.time=1d",
        ],
        logs / "prometheus.log",
    )


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = get_json(url)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with the variables substituted) of every panel target."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in BUILTINS.items():
                    expr = expr.replace(name, value)
                expr = re.sub(r"\$\{?(job|instance)\}?", ".*", expr)
                out.append((path.stem, panel["title"], expr))
    return out


def poll(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """`wait_until` for the HTTP checks here: a refused or half-started server is "not yet"."""
    return wait_until(check, timeout, what, interval=every, errors=(OSError, ValueError, KeyError))


def test_prometheus_scrapes_everything_runs_every_panel_and_alerts_through_alertmanager(
    stack: dict[str, Any],
) -> None:
    try:
        every_target_is_up(stack)
        api_traffic(f"http://127.0.0.1:{stack['settings'].api_port}")
        every_panel_has_data(stack["prom"])
        a_silent_source_fires_ingest_stalled(stack)
        a_stopped_ingester_fires_target_down(stack)
        target_down_inhibits_the_same_targets_alerts(stack["am"])
    except AssertionError:
        for log in sorted(stack["logs"].iterdir()):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise


def every_target_is_up(stack: dict[str, Any]) -> None:
    """1. Every target up, each with its friendly instance name."""
    prom = stack["prom"]

    def all_up() -> list[dict[str, Any]] | None:
        targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
        healthy = [t for t in targets if t["health"] == "up"]
        return targets if len(targets) == len(stack["ports"]) == len(healthy) else None

    targets = poll("every target up", all_up, 90, every=0.5)
    assert {t["labels"]["job"] for t in targets} == set(stack["ports"])
    assert {t["labels"]["instance"] for t in targets} == {"local"}
    assert get_json(f"{prom}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]


def api_traffic(api: str) -> None:
    """2. Traffic for the API panels: searches (one repeated: a cache hit), an export, a 400."""
    poll("posts searchable", lambda: get_json(f"{api}/v1/search?q={COMMON_WORD}")["posts"], 90)
    for url in (
        f"{api}/v1/search?q={COMMON_WORD}",
        f"{api}/v1/search?q=lighthouse",
        f"{api}/v1/export?q={COMMON_WORD}&format=jsonl&limit=10",
        f"{api}/v1/stats",
    ):
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{api}/v1/search?limit=oops", timeout=10)


def every_panel_has_data(prom: str) -> None:
    """3. Every panel's query parses and returns data."""
    queries = panel_queries()
    assert len({d for d, _, _ in queries}) >= 4 and len(queries) >= 30
    for board, title, expr in queries:
        poll(f"data for {board} / {title}: {expr}", lambda e=expr: query(prom, e), 60)


def a_silent_source_fires_ingest_stalled(stack: dict[str, Any]) -> None:
    """4. The source goes silent: IngestStalled pending, then firing, then at the webhook."""
    prom, webhook = stack["prom"], stack["webhook"]
    replay = children_of(stack["procs"]["appliance"].pid)["replay"]
    os.kill(replay, signal.SIGSTOP)
    stack["stopped"].append(replay)
    seen: list[str] = []

    def stall_state() -> bool:
        alerts = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
        for a in alerts:
            if a["labels"]["alertname"] == "IngestStalled":
                assert a["labels"]["instance"] == "local"
                if not seen or seen[-1] != a["state"]:
                    seen.append(a["state"])
        return "firing" in seen

    poll("IngestStalled firing", stall_state, 60, every=0.2)
    assert seen[:2] == ["pending", "firing"], seen
    notes = poll(
        "IngestStalled at the webhook", lambda: webhook.alerts("IngestStalled", "firing"), 30
    )
    assert notes[0]["labels"]["job"] == "ingester"
    assert notes[0]["annotations"]["runbook_url"] == "docs/monitoring.md#ingeststalled"
    os.kill(replay, signal.SIGCONT)


def a_stopped_ingester_fires_target_down(stack: dict[str, Any]) -> None:
    """5. The ingester process stops (SIGSTOP: the supervisor does not restart it): its target
    goes down and TargetDown reaches the webhook."""
    webhook = stack["webhook"]
    ingester = children_of(stack["procs"]["appliance"].pid)["ingest"]
    os.kill(ingester, signal.SIGSTOP)
    stack["stopped"].append(ingester)
    down = poll(
        "TargetDown at the webhook",
        lambda: [
            a for a in webhook.alerts("TargetDown", "firing") if a["labels"]["job"] == "ingester"
        ],
        60,
    )
    assert down[0]["labels"]["instance"] == "local"
    os.kill(ingester, signal.SIGCONT)


def target_down_inhibits_the_same_targets_alerts(am: str) -> None:
    """6. Inhibition in Alertmanager: a TargetDown silences the same target's other alerts."""
    labels = {"job": "ingester", "instance": "inhibit-check", "severity": "critical"}
    posted = [{"labels": {**labels, "alertname": name}} for name in ("TargetDown", "IngestLagHigh")]
    req = urllib.request.Request(
        f"{am}/api/v2/alerts",
        data=json.dumps(posted).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()

    def suppressed() -> dict[str, str] | None:
        got = get_json(f"{am}/api/v2/alerts?filter=instance%3D%22inhibit-check%22")
        states = {a["labels"]["alertname"]: a["status"]["state"] for a in got}
        return states if states.get("IngestLagHigh") == "suppressed" else None

    states = poll("IngestLagHigh inhibited", suppressed, 20)
    assert states["TargetDown"] == "active"
