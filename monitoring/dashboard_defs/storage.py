"""The storage dashboard: the batcher's files, compaction and the data volume."""

from __future__ import annotations

from dashboard_defs.layout import I, Row, dashboard, stat, ts

BOARD = dashboard(
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
