"""Query stage: searches over the live Parquet files with DuckDB (`engine.QueryEngine`).

Reads the store through its manifest; knows nothing about HTTP (that is `appliance.api`).
"""
