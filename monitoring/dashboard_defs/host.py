"""The host dashboard: CPU, memory, disks, network, Redis and the monitoring itself."""

from __future__ import annotations

from dashboard_defs.layout import I, R, Row, dashboard, stat, ts

BOARD = dashboard(
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
