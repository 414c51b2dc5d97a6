"""Batch stage: Redis Stream buffer → Arrow tables → date-partitioned Parquet.

`batcher` (`appliance batch`: the loop over the consumer group in `buffer`), `transform`
(entries → Arrow, in-process or in worker processes), `decode` (many frames per decoder call,
with the ingester's exact rejections), `tables` (events → rows of the stored tables) and
`files` (dedupe against stored rows, atomic batch files, the manifest update). The files are
written through `appliance.store`.
"""
