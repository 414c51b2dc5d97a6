"""Query stage: searches over the live Parquet files with DuckDB (`engine.QueryEngine`).

Reads the store through its manifest; knows nothing about HTTP (that is `appliance.api`). The
planner (`planner`) is pure: the engine passes it the row-group statistics and its tuning values.
"""
