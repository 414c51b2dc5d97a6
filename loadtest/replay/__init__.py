"""`loadtest replay`: a phase validation. Feed a day, a week, a month (or N events) of synthetic
firehose (or recorded captures) through the whole pipeline, inject faults, verify what was
stored against the ground truth computed from the source, and write a report with charts.

Modules: `source` (the capture to replay, cached, and what it should produce), `stack` (the
processes), `faults` (seeded fault injection), `monitor` (sampling and live progress),
`verify` (storage and API against the expectation), `report` (report.json, report.md, charts),
`run` (the command).
"""
