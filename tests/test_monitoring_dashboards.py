"""The Grafana dashboards checked offline (Grafana itself is not installable here): built from
monitoring/build_dashboards.py and equal to the committed JSON, unique panel ids, a layout that
fits, datasources defined by the provisioning, and every metric a query names known: in the
catalogue (appliance/metrics.py), a recording rule, or an exporter's known set. The live test
(test_monitoring_live.py) runs each query against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from appliance import metrics
from tests.helpers import MONITORING

DASHBOARDS = MONITORING / "dashboards"
PROVISIONING = MONITORING / "grafana" / "provisioning"

# Series of the exporters and of Prometheus/Alertmanager that dashboards and alerts use. The live
# test scrapes the real exporters, so a name that is wrong here fails there.
EXPORTER_METRICS = {
    "up",
    "scrape_duration_seconds",
    "ALERTS",
    "node_cpu_seconds_total",
    "node_load1",
    "node_load5",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_disk_read_bytes_total",
    "node_disk_written_bytes_total",
    "node_network_receive_bytes_total",
    "node_network_transmit_bytes_total",
    "redis_up",
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_commands_processed_total",
    "redis_connected_clients",
    "redis_db_keys",
    "prometheus_tsdb_head_samples_appended_total",
    "alertmanager_notifications_total",
    "alertmanager_notifications_failed_total",
}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "by", "without", "on", "ignoring",
    "group_left", "group_right", "and", "or", "unless", "rate", "increase", "irate", "deriv",
    "delta", "predict_linear", "histogram_quantile", "clamp_min", "clamp_max", "time", "vector",
    "min_over_time", "max_over_time", "label_values", "le", "offset", "bool", "inf", "nan",
}  # fmt: skip


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", MONITORING / "build_dashboards.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def boards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for top in board["panels"] for p in [top, *top.get("panels", [])]]


def catalogue() -> set[str]:
    """Every series name the services expose, with the suffixes Prometheus adds."""
    names = set()
    for registry in (metrics.INGEST, metrics.BATCH, metrics.API):
        for family in registry.collect():
            for sample in family.samples:
                names.add(sample.name)
            names.add(family.name + ("_total" if family.type == "counter" else ""))
            if family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
    return names


def recorded() -> set[str]:
    doc = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"]}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series (not functions, labels, keywords)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # matchers
    expr = re.sub(r"\(\s*[a-z_]+(?:\s*,\s*[a-z_]+)*\s*\)", "()", expr)  # by (...) lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range windows
    expr = re.sub(r"(?<![\w.])\d+(\.\d+)?(e[-+]?\d+)?", "0", expr)  # numbers (1e-9)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdw]?|e\d+", n)}


def test_the_committed_dashboards_are_what_the_builder_writes() -> None:
    builder = load_builder()
    built = {name: builder.render(board) for name, board in builder.DASHBOARDS.items()}
    on_disk = {p.stem: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert built == on_disk, "run: python monitoring/build_dashboards.py"
    assert set(on_disk) >= {"pipeline", "storage", "api", "host"}


def test_dashboards_are_valid_with_unique_ids_and_a_layout_that_fits() -> None:
    uids = set()
    for name, board in boards().items():
        assert board["uid"] not in uids and board["title"]
        uids.add(board["uid"])
        panels = all_panels(board)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels:
            box = p["gridPos"]
            assert box["x"] >= 0 and box["x"] + box["w"] <= 24, (name, p["title"])
            if p["type"] != "row":
                assert p["title"] and p["targets"], (name, p)
                assert all(t["expr"].strip() for t in p["targets"])
        # No two panels overlap.
        cells: set[tuple[int, int]] = set()
        for p in panels:
            box = p["gridPos"]
            mine = {
                (x, y)
                for x in range(box["x"], box["x"] + box["w"])
                for y in range(box["y"], box["y"] + box["h"])
            }
            assert not cells & mine, f"{name}: {p['title']} overlaps another panel"
            cells |= mine


def test_every_datasource_a_dashboard_uses_is_provisioned() -> None:
    provisioned = {
        ds["uid"]
        for path in (PROVISIONING / "datasources").glob("*.yml")
        for ds in yaml.safe_load(path.read_text())["datasources"]
    }
    assert provisioned == {"appliance-prometheus"}
    for name, board in boards().items():
        used = {p["datasource"]["uid"] for p in all_panels(board) if "datasource" in p}
        used |= {t["datasource"]["uid"] for p in all_panels(board) for t in p.get("targets", [])}
        used |= {v["datasource"]["uid"] for v in board["templating"]["list"]}
        assert used and used <= provisioned, name


def test_the_dashboard_provider_reads_the_directory_the_docs_name() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "appliance.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (
        "/var/lib/grafana/dashboards" in (MONITORING.parent / "docs" / "monitoring.md").read_text()
    )


def test_every_metric_a_query_names_exists() -> None:
    known = catalogue() | recorded() | EXPORTER_METRICS
    rules = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [
        t["expr"]
        for board in boards().values()
        for p in all_panels(board)
        for t in p.get("targets", [])
    ]
    unknown = {(n, e) for e in exprs for n in metric_names(e) if n not in known}
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (kind) (rate(appliance_ingest_events_total{instance=~"$instance"}[5m]))', {"appliance_ingest_events_total"}),
        ("1 - a_free / clamp_min(b_size, 1e-9) > 0.8", {"a_free", "b_size"}),
        ("histogram_quantile(0.95, sum by (le) (rate(x_bucket[1m]))) or on() vector(0)", {"x_bucket"}),
    ],
)  # fmt: skip
def test_metric_names_are_found_in_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_catalogue_check_would_catch_a_misspelt_metric() -> None:
    assert "appliance_ingest_events_total" in catalogue()
    assert "appliance_ingest_event_total" not in catalogue() | recorded() | EXPORTER_METRICS


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool missing")
def test_every_panel_query_parses(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as the expression of a rule."""
    from tests.test_monitoring_live import panel_queries

    queries = panel_queries()
    rules = [{"record": f"panel:{n}", "expr": expr} for n, (_, _, expr) in enumerate(queries)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout
