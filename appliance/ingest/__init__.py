"""Ingest stage: Jetstream websocket → the Redis Stream buffer.

`jetstream` (the subscription: its limits, the /subscribe URL with the cursor, backoff),
`frames` (a websocket connection that hands frames over in bulk), `ingester` (the reader:
connection, validation with `events`, micro-batches, the stall watchdog), `writer` (the Redis
side: batches written through `buffer` with the cursor, the circuit breaker) and `command`
(`appliance ingest`). Nothing here knows about Parquet or queries.
"""
