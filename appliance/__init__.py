"""Bluesky post explorer appliance: Jetstream → Redis Stream → Parquet → DuckDB → REST API."""

__version__ = "0.1.0"
