"""Store: the Parquet layout every writer and reader shares.

`layout` (tables, schemas, natural keys, partition paths), `writer` (atomic Parquet writes),
`manifest` (the live file set), `compact` (`appliance compact`: a closed day's files merged and
swapped atomically) and `textindex` (per-file token index). It imports nothing from the stages
above it (batch, query, api).
"""
