"""The metric catalogue: every Prometheus metric of every service, declared in one place.

Each service exposes its own registry on /metrics, so an ingester scrape carries no batcher
series. Names follow Prometheus conventions (`appliance_<service>_...`, `_total`, `_seconds`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from appliance.events import REJECT_REASONS

INGEST = CollectorRegistry(auto_describe=True)
BATCH = CollectorRegistry(auto_describe=True)

# --- ingester ---------------------------------------------------------------------------------
ingest_events = Counter(
    "appliance_ingest_events_total",
    "Valid events appended to the buffer, by kind and collection",
    ["kind", "collection"],
    registry=INGEST,
)
ingest_bytes = Counter("appliance_ingest_bytes_total", "Bytes of frames received", registry=INGEST)
ingest_dead_letters = Counter(
    "appliance_ingest_dead_letters_total",
    "Frames rejected and kept in the dead-letter stream, by reason",
    ["reason"],
    registry=INGEST,
)
for _reason in REJECT_REASONS:
    ingest_dead_letters.labels(_reason)
ingest_lag = Gauge(
    "appliance_ingest_lag_seconds",
    "Now minus time_us of the newest event received",
    registry=INGEST,
)
ingest_cursor = Gauge(
    "appliance_ingest_cursor_time_us", "The saved cursor (time_us)", registry=INGEST
)
ingest_reconnects = Counter(
    "appliance_ingest_reconnects_total",
    "Websocket reconnects, by cause",
    ["cause"],
    registry=INGEST,
)
ingest_stalls = Counter(
    "appliance_ingest_stalls_total",
    "Connections dropped because no frame arrived within the stall timeout",
    registry=INGEST,
)
ingest_gaps = Counter(
    "appliance_ingest_gaps_total",
    "Reconnects whose first event was later than the cursor by more than the rewind margin",
    registry=INGEST,
)
ingest_gap_seconds = Counter(
    "appliance_ingest_gap_seconds_total",
    "Seconds of firehose missed across recorded gaps",
    registry=INGEST,
)
ingest_redis_errors = Counter(
    "appliance_ingest_redis_errors_total",
    "Failed Redis writes, by cause (connection, oom, readonly, other)",
    ["cause"],
    registry=INGEST,
)
ingest_circuit_open = Gauge(
    "appliance_ingest_circuit_open",
    "1 while the Redis circuit is open (websocket reading paused)",
    registry=INGEST,
)
ingest_circuit_transitions = Counter(
    "appliance_ingest_circuit_transitions_total",
    "Circuit breaker state changes, by new state",
    ["state"],
    registry=INGEST,
)
ingest_connected = Gauge(
    "appliance_ingest_connected", "1 while the websocket is connected", registry=INGEST
)
buffer_length = Gauge(
    "appliance_buffer_entries", "Entries in the Redis Stream buffer (XLEN)", registry=INGEST
)
ingest_held_events = Gauge(
    "appliance_ingest_held_events",
    "Events received but not yet written to Redis (bounded; grows only while the circuit is open)",
    registry=INGEST,
)
