"""Batch stage: Redis Stream buffer → Arrow tables → date-partitioned Parquet.

`batcher` runs `appliance batch` (consumer group read, dedupe, write, manifest, ack, trim);
`tables` turns decoded events into rows of the stored tables. The files are written through
`appliance.store`.
"""
