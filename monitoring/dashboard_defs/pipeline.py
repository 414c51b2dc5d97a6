"""The pipeline dashboard: is data flowing from Jetstream to Parquet, how far behind, what failed."""

from __future__ import annotations

from dashboard_defs.layout import I, R, Row, dashboard, stat, ts

BOARD = dashboard(
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
