"""Ingest stage: the Jetstream websocket subscription and the ingester that feeds the buffer.

`ingester` runs `appliance ingest`: it reads Jetstream frames, validates them (`events`) and
hands them to the Redis Stream through `buffer`. Nothing here knows about Parquet or queries.
"""
