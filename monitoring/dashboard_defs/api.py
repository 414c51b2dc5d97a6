"""The API dashboard: requests, latency, the query engine and its caches."""

from __future__ import annotations

from dashboard_defs.layout import I, R, Row, dashboard, stat, ts

BOARD = dashboard(
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
