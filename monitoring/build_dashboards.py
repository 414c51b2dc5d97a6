"""Build the Grafana dashboards in monitoring/dashboards/ from the short definitions below.

Run `python monitoring/build_dashboards.py` after changing a panel and commit the JSON it writes;
a test keeps the committed files equal to this output. Every panel reads the provisioned
datasource (uid appliance-prometheus); `$instance` selects the host.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "appliance-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"
I = 'instance=~"$instance"'  # noqa: E741 - the selector every query carries


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 8
    height: int = 8
    thresholds: list[tuple[float, str]] = field(default_factory=list)
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel]


def ts(title: str, *exprs: tuple[str, str], unit: str = "short", **kw: Any) -> Panel:
    return Panel(title, list(exprs), unit=unit, **kw)


def stat(title: str, expr: str, unit: str = "short", **kw: Any) -> Panel:
    kw.setdefault("width", 4)
    kw.setdefault("height", 4)
    return Panel(title, [(expr, "")], unit=unit, kind="stat", **kw)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": "green", "value": None}] + [
        {"color": color, "value": value} for value, color in p.thresholds
    ]
    defaults: dict[str, Any] = {
        "unit": p.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "lineWidth": 1,
            "showPoints": "never",
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if p.thresholds else "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend or "__auto",
                "range": True,
            }
            for n, (expr, legend) in enumerate(p.exprs)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def dashboard(uid: str, title: str, description: str, rows: list[Row]) -> dict[str, Any]:
    """A dashboard: rows laid out top to bottom, panels left to right, wrapping at 24 columns."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, tallest = pid + 1, y + 1, 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, tallest = 0, y + tallest, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, tallest = pid + 1, x + p.width, max(tallest, p.height)
        y += tallest
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["appliance"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "links": [
            {
                "type": "dashboards",
                "tags": ["appliance"],
                "asDropdown": True,
                "title": "Appliance",
            }
        ],
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": "host",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(up, instance)", "refId": "instance"},
                    "definition": "label_values(up, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


R = "$__rate_interval"

PIPELINE = dashboard(
    "appliance-pipeline",
    "Appliance: pipeline",
    "Is data flowing from Jetstream to Parquet, how far behind is it, and what went wrong.",
    [
        Row(
            "At a glance",
            [
                stat(
                    "Events in /s",
                    f"sum(instance:appliance_ingest_events:rate1m{{{I}}})",
                    "ops",
                    description="Events appended to the buffer per second (0 means stalled).",
                ),
                stat(
                    "Ingest lag",
                    f"max(appliance_ingest_lag_seconds{{{I}}})",
                    "s",
                    thresholds=[(60, "yellow"), (120, "red")],
                    description="Now minus the time of the newest event received.",
                ),
                stat(
                    "Connected",
                    f"min(appliance_ingest_connected{{{I}}})",
                    thresholds=[],
                    description="1 while the websocket to Jetstream is open.",
                ),
                stat(
                    "Buffered entries",
                    f"sum(appliance_buffer_entries{{{I}}})",
                    description="Entries in the Redis Stream (each holds up to 100 events).",
                ),
                stat(
                    "Oldest unacknowledged",
                    f"max(appliance_batch_oldest_unacked_age_seconds{{{I}}})",
                    "s",
                    description="Age of the oldest buffered entry not yet in Parquet.",
                ),
                stat(
                    "Last batch",
                    f"time() - max(appliance_batch_last_success_timestamp_seconds{{{I}}} > 0)",
                    "s",
                    description="Seconds since the last batch was written and acknowledged.",
                ),
            ],
        ),
        Row(
            "Ingest",
            [
                ts(
                    "Events in by kind",
                    (
                        f"sum by (kind) (instance_kind:appliance_ingest_events:rate1m{{{I}}})",
                        "{{kind}}",
                    ),
                    unit="ops",
                    stack=True,
                ),
                ts(
                    "Commits in by collection (top 10)",
                    (
                        f'topk(10, sum by (collection) (rate(appliance_ingest_events_total{{{I}, kind="commit"}}[{R}])))',
                        "{{collection}}",
                    ),
                    unit="ops",
                ),
                ts(
                    "Ingest lag",
                    (f"appliance_ingest_lag_seconds{{{I}}}", "{{instance}}"),
                    unit="s",
                ),
                ts(
                    "Bytes received",
                    (
                        f"sum by (instance) (rate(appliance_ingest_bytes_total{{{I}}}[{R}]))",
                        "{{instance}}",
                    ),
                    unit="Bps",
                ),
                ts(
                    "Reconnects by cause",
                    (
                        f"sum by (cause) (increase(appliance_ingest_reconnects_total{{{I}}}[1h])) or on() vector(0)",
                        "{{cause}}",
                    ),
                    description="Reconnects in the last hour (0 when none happened yet).",
                ),
                ts(
                    "Connection and circuit",
                    (f"appliance_ingest_connected{{{I}}}", "connected {{instance}}"),
                    (f"appliance_ingest_circuit_open{{{I}}}", "circuit open {{instance}}"),
                ),
            ],
        ),
        Row(
            "Buffer and batches",
            [
                ts(
                    "Stream entries, pending, held",
                    (f"appliance_buffer_entries{{{I}}}", "stream entries"),
                    (f"appliance_batch_pending_entries{{{I}}}", "pending (delivered, not acked)"),
                    (f"appliance_ingest_held_events{{{I}}}", "events held by the ingester"),
                ),
                ts(
                    "Rows written by table",
                    (f"sum by (table) (rate(appliance_batch_rows_total{{{I}}}[{R}]))", "{{table}}"),
                    unit="ops",
                    stack=True,
                ),
                ts(
                    "Batch duration",
                    (
                        f"histogram_quantile(0.5, sum by (le) (rate(appliance_batch_duration_seconds_bucket{{{I}}}[{R}])))",
                        "p50",
                    ),
                    (
                        f"histogram_quantile(0.95, sum by (le) (rate(appliance_batch_duration_seconds_bucket{{{I}}}[{R}])))",
                        "p95",
                    ),
                    unit="s",
                ),
                ts(
                    "Oldest unacknowledged entry",
                    (f"appliance_batch_oldest_unacked_age_seconds{{{I}}}", "{{instance}}"),
                    unit="s",
                ),
                ts(
                    "Batches per minute",
                    (
                        f"sum by (instance) (rate(appliance_batch_batches_total{{{I}}}[{R}])) * 60",
                        "{{instance}}",
                    ),
                ),
                ts(
                    "Duplicates dropped",
                    (
                        f"sum by (scope) (rate(appliance_batch_duplicates_total{{{I}}}[{R}]))",
                        "{{scope}}",
                    ),
                    unit="ops",
                    description="Re-delivered events dropped by natural key: normal after a reconnect's rewind.",
                ),
            ],
        ),
        Row(
            "Integrity signals (expect zero)",
            [
                ts(
                    "Dead letters by reason",
                    (
                        f"sum by (reason) (increase(appliance_ingest_dead_letters_total{{{I}}}[1h]))",
                        "ingest {{reason}}",
                    ),
                    (
                        f"sum by (reason) (increase(appliance_batch_dead_letters_total{{{I}}}[1h]))",
                        "batch {{reason}}",
                    ),
                    description="Frames moved to the dead-letter stream in the last hour.",
                    width=12,
                ),
                ts(
                    "Gaps, stalls, Redis errors",
                    (f"sum(increase(appliance_ingest_gaps_total{{{I}}}[1h]))", "gaps"),
                    (
                        f"sum(increase(appliance_ingest_gap_seconds_total{{{I}}}[1h]))",
                        "seconds missed",
                    ),
                    (f"sum(increase(appliance_ingest_stalls_total{{{I}}}[1h]))", "stalls"),
                    (
                        f"sum(increase(appliance_ingest_redis_errors_total{{{I}}}[1h])) or on() vector(0)",
                        "Redis write errors",
                    ),
                    description="Counts in the last hour; any gap means missing data.",
                    width=12,
                ),
                ts(
                    "Batch failures by cause",
                    (
                        f"sum by (cause) (increase(appliance_batch_failures_total{{{I}}}[1h]))",
                        "{{cause}}",
                    ),
                    width=12,
                ),
                ts(
                    "Compaction and index failures, unparsable times",
                    (
                        f"sum(increase(appliance_compact_failures_total{{{I}}}[1h]))",
                        "compaction failures",
                    ),
                    (
                        f"sum(increase(appliance_compact_index_failures_total{{{I}}}[1h]))",
                        "index failures",
                    ),
                    (
                        f"sum(increase(appliance_batch_bad_created_at_total{{{I}}}[1h]))",
                        "unparsable createdAt",
                    ),
                    width=12,
                ),
            ],
        ),
    ],
)

STORAGE = dashboard(
    "appliance-storage",
    "Appliance: storage",
    "What the Parquet datasets hold, how well they compress, compaction, and the data volume.",
    [
        Row(
            "Data volume",
            [
                stat(
                    "Volume used",
                    f"max(instance:appliance_data_root_used:ratio{{{I}}})",
                    "percentunit",
                    thresholds=[(0.7, "yellow"), (0.8, "red")],
                ),
                stat("Free", f"min(appliance_data_root_free_bytes{{{I}}})", "bytes"),
                stat(
                    "Days until full",
                    f"min(appliance_data_root_free_bytes{{{I}}} / clamp_min(-deriv(appliance_data_root_free_bytes{{{I}}}[1d]), 1e-9)) / 86400",
                    "d",
                    thresholds=[],
                    description="At the rate of the last day (very large when it is not filling).",
                ),
                stat("Stored", f"sum(appliance_store_bytes{{{I}}})", "bytes"),
                stat("Live files", f"sum(appliance_store_files{{{I}}})"),
                stat(
                    "Since last compaction pass",
                    f"time() - max(appliance_compact_last_success_timestamp_seconds{{{I}}} > 0)",
                    "s",
                ),
                ts(
                    "Free space and forecast",
                    (f"appliance_data_root_free_bytes{{{I}}}", "free {{instance}}"),
                    (
                        f"predict_linear(appliance_data_root_free_bytes{{{I}}}[1d], 7 * 86400)",
                        "free in 7 days (trend) {{instance}}",
                    ),
                    unit="bytes",
                    width=24,
                ),
            ],
        ),
        Row(
            "Datasets",
            [
                ts(
                    "Bytes written per day by table",
                    (
                        f"sum by (table) (increase(appliance_batch_bytes_written_total{{{I}}}[1d]))",
                        "{{table}}",
                    ),
                    unit="bytes",
                    stack=True,
                ),
                ts(
                    "Stored bytes by table",
                    (f"sum by (table) (appliance_store_bytes{{{I}}})", "{{table}}"),
                    unit="bytes",
                    stack=True,
                ),
                ts(
                    "Live files by table",
                    (f"sum by (table) (appliance_store_files{{{I}}})", "{{table}}"),
                    stack=True,
                ),
                ts(
                    "Compression ratio (raw JSON / Parquet)",
                    (
                        f"sum(rate(appliance_batch_raw_bytes_total{{{I}}}[1h])) / sum(rate(appliance_batch_bytes_written_total{{{I}}}[1h]))",
                        "last hour",
                    ),
                    (f"max(appliance_batch_compression_ratio{{{I}}})", "last batch"),
                ),
                ts(
                    "Rows per day by table",
                    (
                        f"sum by (table) (increase(appliance_batch_rows_total{{{I}}}[1d]))",
                        "{{table}}",
                    ),
                    stack=True,
                ),
                ts(
                    "Bytes per row by table",
                    (
                        f"sum by (table) (rate(appliance_batch_bytes_written_total{{{I}}}[1h])) / sum by (table) (rate(appliance_batch_rows_total{{{I}}}[1h]))",
                        "{{table}}",
                    ),
                    unit="bytes",
                ),
            ],
        ),
        Row(
            "Compaction",
            [
                ts(
                    "Partitions compacted per day",
                    (
                        f"sum by (table) (increase(appliance_compact_runs_total{{{I}}}[1d])) or on() vector(0)",
                        "{{table}}",
                    ),
                    description="0 until the first day closes.",
                ),
                ts(
                    "Compaction duration",
                    (
                        f"histogram_quantile(0.95, sum by (le) (rate(appliance_compact_duration_seconds_bucket{{{I}}}[1d])))",
                        "p95 partition",
                    ),
                    (
                        f"histogram_quantile(0.95, sum by (le) (rate(appliance_compact_index_seconds_bucket{{{I}}}[1d])))",
                        "p95 token index",
                    ),
                    unit="s",
                ),
                ts(
                    "Rows dropped by compaction, files removed",
                    (
                        f"sum(increase(appliance_compact_rows_dropped_total{{{I}}}[1d])) or on() vector(0)",
                        "rows dropped (duplicates, superseded, deleted)",
                    ),
                    (
                        f"sum(increase(appliance_compact_files_removed_total{{{I}}}[1d]))",
                        "files removed",
                    ),
                ),
            ],
        ),
    ],
)

API = dashboard(
    "appliance-api",
    "Appliance: API",
    "Requests, latency, errors, cache and exports of the REST API (summed over its workers).",
    [
        Row(
            "At a glance",
            [
                stat("Requests /s", f"sum(instance:appliance_api_requests:rate5m{{{I}}})", "reqps"),
                stat(
                    "5xx ratio",
                    f"max(instance:appliance_api_errors:ratio_rate5m{{{I}}}) or on() vector(0)",
                    "percentunit",
                    thresholds=[(0.01, "yellow"), (0.05, "red")],
                ),
                stat(
                    "p95 latency",
                    f"max(instance:appliance_api_request_duration_seconds:p95_5m{{{I}}})",
                    "s",
                    thresholds=[(2, "yellow"), (5, "red")],
                ),
                stat(
                    "Cache hit ratio",
                    f'sum(rate(appliance_api_cache_lookups_total{{{I}, result="hit"}}[1h])) / sum(rate(appliance_api_cache_lookups_total{{{I}}}[1h]))',
                    "percentunit",
                ),
                stat(
                    "Query timeouts (1h)",
                    f"sum(increase(appliance_api_query_timeouts_total{{{I}}}[1h]))",
                    thresholds=[(1, "red")],
                ),
                stat(
                    "Exported rows (1h)",
                    f"sum(increase(appliance_api_export_rows_total{{{I}}}[1h]))",
                ),
            ],
        ),
        Row(
            "Traffic and latency",
            [
                ts(
                    "Requests by route",
                    (
                        f"sum by (route) (rate(appliance_api_requests_total{{{I}}}[{R}]))",
                        "{{route}}",
                    ),
                    unit="reqps",
                    stack=True,
                ),
                ts(
                    "Latency (exports left out)",
                    *[
                        (
                            f'histogram_quantile({q}, sum by (le) (rate(appliance_api_request_duration_seconds_bucket{{{I}, route!~"/v1/export.*"}}[{R}])))',
                            f"p{round(q * 100)}",
                        )
                        for q in (0.5, 0.95, 0.99)
                    ],
                    unit="s",
                ),
                ts(
                    "Errors by status",
                    (
                        f'sum by (status) (rate(appliance_api_requests_total{{{I}, status=~"[45].."}}[{R}]))',
                        "{{status}}",
                    ),
                    unit="reqps",
                ),
                ts(
                    "Query time by kind (p95)",
                    (
                        f"histogram_quantile(0.95, sum by (le, kind) (rate(appliance_api_query_duration_seconds_bucket{{{I}}}[{R}])))",
                        "{{kind}}",
                    ),
                    unit="s",
                ),
                ts(
                    "Cache lookups",
                    (
                        f"sum by (result) (rate(appliance_api_cache_lookups_total{{{I}}}[{R}]))",
                        "{{result}}",
                    ),
                    unit="ops",
                ),
                ts(
                    "Exported rows by format",
                    (
                        f"sum by (format) (rate(appliance_api_export_rows_total{{{I}}}[{R}]))",
                        "{{format}}",
                    ),
                    unit="ops",
                ),
            ],
        ),
        Row(
            "Search internals",
            [
                ts(
                    "Token index lookups by outcome",
                    (
                        f"sum by (outcome) (rate(appliance_api_text_index_total{{{I}}}[{R}]))",
                        "{{outcome}}",
                    ),
                    unit="ops",
                    description="missing, invalid and error mean a compacted file was scanned in full.",
                    width=12,
                ),
                ts(
                    "Rows hidden by newer versions or deletes",
                    (f"sum(rate(appliance_api_hidden_rows_total{{{I}}}[{R}]))", "hidden rows"),
                    unit="ops",
                    width=12,
                ),
            ],
        ),
    ],
)

HOST = dashboard(
    "appliance-host",
    "Appliance: host and Redis",
    "The machine (node exporter), Redis (Redis exporter) and the monitoring stack itself.",
    [
        Row(
            "Host",
            [
                stat("Targets up", f"sum(up{{{I}}})", description="Scrape targets answering."),
                stat(
                    "Targets down",
                    f"count(up{{{I}}} == 0) or on() vector(0)",
                    thresholds=[(1, "red")],
                ),
                stat("Load (1m)", f"max(node_load1{{{I}}})"),
                stat(
                    "Memory available",
                    f"min(node_memory_MemAvailable_bytes{{{I}}} / node_memory_MemTotal_bytes{{{I}}})",
                    "percentunit",
                ),
                stat("Redis up", f"min(redis_up{{{I}}})", thresholds=[]),
                stat(
                    "Firing alerts",
                    'count(ALERTS{alertstate="firing"}) or on() vector(0)',
                    thresholds=[(1, "red")],
                ),
                ts(
                    "CPU by mode",
                    (
                        f'sum by (mode) (rate(node_cpu_seconds_total{{{I}, mode!="idle"}}[{R}]))',
                        "{{mode}}",
                    ),
                    unit="short",
                    stack=True,
                    description="Cores busy, by mode.",
                ),
                ts(
                    "Memory",
                    (
                        f"node_memory_MemTotal_bytes{{{I}}} - node_memory_MemAvailable_bytes{{{I}}}",
                        "used",
                    ),
                    (f"node_memory_MemAvailable_bytes{{{I}}}", "available"),
                    unit="bytes",
                    stack=True,
                ),
                ts(
                    "Filesystems used",
                    (
                        f'1 - node_filesystem_avail_bytes{{{I}, fstype!~"tmpfs|overlay|squashfs"}} / node_filesystem_size_bytes{{{I}, fstype!~"tmpfs|overlay|squashfs"}}',
                        "{{mountpoint}}",
                    ),
                    unit="percentunit",
                ),
                ts(
                    "Disk I/O",
                    (
                        f"sum by (device) (rate(node_disk_read_bytes_total{{{I}}}[{R}]))",
                        "read {{device}}",
                    ),
                    (
                        f"sum by (device) (rate(node_disk_written_bytes_total{{{I}}}[{R}]))",
                        "write {{device}}",
                    ),
                    unit="Bps",
                ),
                ts(
                    "Network",
                    (
                        f'sum by (device) (rate(node_network_receive_bytes_total{{{I}, device!="lo"}}[{R}]))',
                        "in {{device}}",
                    ),
                    (
                        f'sum by (device) (rate(node_network_transmit_bytes_total{{{I}, device!="lo"}}[{R}]))',
                        "out {{device}}",
                    ),
                    unit="Bps",
                ),
                ts(
                    "Load",
                    (f"node_load1{{{I}}}", "1m"),
                    (f"node_load5{{{I}}}", "5m"),
                ),
            ],
        ),
        Row(
            "Redis",
            [
                ts(
                    "Memory used and maxmemory",
                    (f"redis_memory_used_bytes{{{I}}}", "used"),
                    (f"redis_memory_max_bytes{{{I}}}", "maxmemory"),
                    unit="bytes",
                ),
                ts(
                    "Commands per second",
                    (f"sum(rate(redis_commands_processed_total{{{I}}}[{R}]))", "commands"),
                    unit="ops",
                ),
                ts(
                    "Clients and keys",
                    (f"redis_connected_clients{{{I}}}", "clients"),
                    (f"sum(redis_db_keys{{{I}}})", "keys"),
                ),
            ],
        ),
        Row(
            "Monitoring",
            [
                ts(
                    "Scrape duration by job",
                    (f"scrape_duration_seconds{{{I}}}", "{{job}}"),
                    unit="s",
                ),
                ts(
                    "Prometheus samples appended",
                    (
                        "sum(rate(prometheus_tsdb_head_samples_appended_total[$__rate_interval]))",
                        "samples",
                    ),
                    unit="ops",
                ),
                ts(
                    "Alertmanager notifications",
                    (
                        "sum by (integration) (rate(alertmanager_notifications_total[$__rate_interval]))",
                        "sent {{integration}}",
                    ),
                    (
                        "sum by (integration) (rate(alertmanager_notifications_failed_total[$__rate_interval]))",
                        "failed {{integration}}",
                    ),
                    unit="ops",
                ),
            ],
        ),
    ],
)

DASHBOARDS = {"pipeline": PIPELINE, "storage": STORAGE, "api": API, "host": HOST}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, board in DASHBOARDS.items():
        (OUT / f"{name}.json").write_text(render(board))
    print(f"wrote {len(DASHBOARDS)} dashboards to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
