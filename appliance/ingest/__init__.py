"""Ingest stage: Jetstream websocket → the Redis Stream buffer.

`jetstream` (the subscription: its limits, the /subscribe URL with the cursor, backoff),
`frames` (a websocket connection that hands frames over in bulk) and `ingester` (`appliance
ingest`: validate with `events`, hand over through `buffer`). Nothing here knows about Parquet
or queries.
"""
