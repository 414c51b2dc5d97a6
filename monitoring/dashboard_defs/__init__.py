"""The Grafana dashboards as short definitions: one module per dashboard (`pipeline`, `storage`,
`api`, `host`, each a `BOARD`), and the panel layout they share (`layout`).
`monitoring/build_dashboards.py` renders them to monitoring/dashboards/*.json."""
