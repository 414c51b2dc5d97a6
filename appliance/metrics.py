"""The metric catalogue: every Prometheus metric of every service, declared in one place.

Each service exposes its own registry on /metrics, so an ingester scrape carries no batcher
series. Names follow Prometheus conventions (`appliance_<service>_...`, `_total`, `_seconds`).
"""

from __future__ import annotations

import shutil

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

# --- batcher ------------------------------------------------------------------------------------
BATCH_FAILURE_CAUSES = ("disk_full", "unwritable", "io", "redis", "transform", "error")
batch_duration = Histogram(
    "appliance_batch_duration_seconds",
    "Seconds to write one batch (transform done; dedupe, Parquet, manifest, XACK, trim)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=BATCH,
)
batch_batches = Counter(
    "appliance_batch_batches_total", "Batches written and acknowledged", registry=BATCH
)
batch_events = Counter(
    "appliance_batch_events_total",
    "Events read from the buffer and routed, by table (before dedupe)",
    ["table"],
    registry=BATCH,
)
batch_rows = Counter(
    "appliance_batch_rows_total", "Rows written to Parquet, by table", ["table"], registry=BATCH
)
batch_duplicates = Counter(
    "appliance_batch_duplicates_total",
    "Events dropped as duplicates by natural key, by scope (batch = inside the batch, "
    "stored = already in a stored file)",
    ["scope"],
    registry=BATCH,
)
batch_bytes = Counter(
    "appliance_batch_bytes_written_total",
    "Bytes of Parquet files written by batches, by table",
    ["table"],
    registry=BATCH,
)
batch_raw_bytes = Counter(
    "appliance_batch_raw_bytes_total", "Bytes of raw JSON frames batched", registry=BATCH
)
batch_compression_ratio = Gauge(
    "appliance_batch_compression_ratio",
    "Raw JSON bytes / Parquet bytes of the last batch",
    registry=BATCH,
)
batch_pending = Gauge(
    "appliance_batch_pending_entries",
    "Stream entries delivered to the group but not yet acknowledged (XPENDING)",
    registry=BATCH,
)
batch_oldest_unacked_age = Gauge(
    "appliance_batch_oldest_unacked_age_seconds",
    "Age of the oldest entry not yet acknowledged (pending, else the first unread), 0 if none",
    registry=BATCH,
)
batch_failures = Counter(
    "appliance_batch_failures_total",
    "Failed batch attempts and failed entry transformations, by cause",
    ["cause"],
    registry=BATCH,
)
for _cause in BATCH_FAILURE_CAUSES:
    batch_failures.labels(_cause)
batch_failing = Gauge(
    "appliance_batch_failing",
    "1 while the last batch attempt failed (cleared by the next batch written)",
    registry=BATCH,
)
batch_dead_letters = Counter(
    "appliance_batch_dead_letters_total",
    "Frames or entries the batcher moved to the dead-letter stream, by reason",
    ["reason"],
    registry=BATCH,
)
for _reason in (*REJECT_REASONS, "batch_poison"):
    batch_dead_letters.labels(_reason)  # at 0 from the start, so the first increase() counts
batch_bad_created_at = Counter(
    "appliance_batch_bad_created_at_total",
    "Records whose createdAt (or identity/account time) could not be parsed (stored as null)",
    registry=BATCH,
)
batch_last_success = Gauge(
    "appliance_batch_last_success_timestamp_seconds",
    "Unix time of the last batch written and acknowledged",
    registry=BATCH,
)
batch_interval = Gauge(
    "appliance_batch_interval_seconds",
    "The configured seconds between flushes (batch_interval_s), for staleness alerts",
    registry=BATCH,
)
data_root_free = Gauge(
    "appliance_data_root_free_bytes",
    "Bytes available to the service on the data root's filesystem (NaN if it cannot be read)",
    registry=BATCH,
)
data_root_size = Gauge(
    "appliance_data_root_size_bytes",
    "Size in bytes of the data root's filesystem (NaN if it cannot be read)",
    registry=BATCH,
)
store_files = Gauge(
    "appliance_store_files",
    "Live Parquet files in the manifest, by table",
    ["table"],
    registry=BATCH,
)
store_bytes = Gauge(
    "appliance_store_bytes",
    "Bytes of the live Parquet files in the manifest, by table",
    ["table"],
    registry=BATCH,
)
compact_failures = Counter(
    "appliance_compact_failures_total",
    "Compaction passes that failed (the old files stay live; the next cycle tries again)",
    registry=BATCH,
)
compact_last_success = Gauge(
    "appliance_compact_last_success_timestamp_seconds",
    "Unix time the last compaction pass over the closed days finished without an error",
    registry=BATCH,
)
compact_runs = Counter(
    "appliance_compact_runs_total",
    "Partitions compacted, by table",
    ["table"],
    registry=BATCH,
)
compact_duration = Histogram(
    "appliance_compact_duration_seconds",
    "Seconds to compact one partition",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
    registry=BATCH,
)
compact_index_seconds = Histogram(
    "appliance_compact_index_seconds",
    "Seconds to write the token index (textindex) of one compacted posts file",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
    registry=BATCH,
)
compact_index_failures = Counter(
    "appliance_compact_index_failures_total",
    "Compacted posts files left without a token index because writing it failed",
    registry=BATCH,
)
compact_rows_dropped = Counter(
    "appliance_compact_rows_dropped_total",
    "Rows compaction removed: duplicates, versions superseded by an update, deleted records",
    ["table"],
    registry=BATCH,
)
compact_files_removed = Counter(
    "appliance_compact_files_removed_total",
    "Retired or orphaned files deleted after the grace period",
    registry=BATCH,
)


def watch_data_root(path: str) -> None:
    """Report the size and free space of the filesystem holding `path` at every scrape."""

    def usage(field: str) -> float:
        try:
            return float(getattr(shutil.disk_usage(path), field))
        except OSError:
            return float("nan")

    data_root_free.set_function(lambda: usage("free"))
    data_root_size.set_function(lambda: usage("total"))


# --- API --------------------------------------------------------------------------------------
# The API runs several Sanic worker processes. `appliance serve` points PROMETHEUS_MULTIPROC_DIR
# at a fresh directory before the workers start, so each worker keeps these values in its own
# file and /metrics (any worker) sums them; without it (tests in one process) they live in API.
API = CollectorRegistry(auto_describe=True)
API_PREFIX = "appliance_api_"

api_requests = Counter(
    "appliance_api_requests_total",
    "HTTP requests answered, by route pattern, method and status",
    ["route", "method", "status"],
    registry=API,
)
api_request_seconds = Histogram(
    "appliance_api_request_duration_seconds",
    "Time from request to response (to the last byte for streams), by route pattern and status",
    ["route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=API,
)
api_query_seconds = Histogram(
    "appliance_api_query_duration_seconds",
    "Time spent querying DuckDB for one request, by kind (search, export, stats)",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=API,
)
api_cache = Counter(
    "appliance_api_cache_lookups_total",
    "Search result cache lookups, by result (hit, miss)",
    ["result"],
    registry=API,
)
api_query_timeouts = Counter(
    "appliance_api_query_timeouts_total",
    "Queries interrupted after query_timeout_s (answered 504)",
    registry=API,
)
api_text_index = Counter(
    "appliance_api_text_index_total",
    "Token-index lookups by outcome: narrowed, not_selective, missing, invalid, error",
    ["outcome"],
    registry=API,
)
for _outcome in ("narrowed", "not_selective", "missing", "invalid", "error"):
    api_text_index.labels(_outcome)
api_rows_read = Counter(
    "appliance_api_rows_read_total",
    "Candidate rows searches read one by one (named by the row postings of token indexes)",
    registry=API,
)
api_hidden_rows = Counter(
    "appliance_api_hidden_rows_total",
    "Candidate rows a query skipped because a newer version or a delete hides them",
    registry=API,
)
api_rejected = Counter(
    "appliance_api_rejected_total",
    "Requests answered 503 by admission control, by reason (queue_full, wait, long_scan)",
    ["reason"],
    registry=API,
)
for _reason in ("queue_full", "wait", "long_scan"):
    api_rejected.labels(_reason)
api_long_scans = Counter(
    "appliance_api_long_scans_total",
    "Searches that turned into long scans, by outcome: run (took the long-scan lane), refused "
    "(the lane stayed taken; answered 503)",
    ["outcome"],
    registry=API,
)
for _outcome in ("run", "refused"):
    api_long_scans.labels(_outcome)
api_waiting = Gauge(
    "appliance_api_waiting_queries",
    "Requests waiting for a query slot (summed over workers)",
    multiprocess_mode="livesum",
    registry=API,
)
api_export_rows = Counter(
    "appliance_api_export_rows_total",
    "Rows streamed by /v1/export, by format",
    ["format"],
    registry=API,
)
api_identity_lookups = Counter(
    "appliance_api_identity_lookups_total",
    "Identity lookups of searches by kind (handle_of: a result's author; did_of: a handle in "
    "author=/mention=) and result (hit: known and fresh, stale: known, due again, miss: "
    "unknown, live: resolved at query time, error: the store or a resolver failed)",
    ["kind", "result"],
    registry=API,
)
for _kind in ("handle_of", "did_of"):
    for _result in ("hit", "stale", "miss", "live", "error"):
        api_identity_lookups.labels(_kind, _result)
api_posts_shown = Counter(
    "appliance_api_posts_shown_total",
    "Posts returned by search and export, by what their author's handle was "
    "(verified, invalid: handle.invalid, none: unknown)",
    ["handle"],
    registry=API,
)
for _handle in ("verified", "invalid", "none"):
    api_posts_shown.labels(_handle)

# --- identity worker --------------------------------------------------------------------------
IDENTITY = CollectorRegistry(auto_describe=True)

identity_resolutions = Counter(
    "appliance_identity_resolutions_total",
    "DID resolutions by outcome: ok (verified handle), invalid (handle.invalid), not_found (no "
    "DID document), unavailable (a source did not answer), rate_limited (PLC answered 429)",
    ["outcome"],
    registry=IDENTITY,
)
for _outcome in ("ok", "invalid", "not_found", "unavailable", "rate_limited"):
    identity_resolutions.labels(_outcome)
identity_queue = Gauge(
    "appliance_identity_queue_length",
    "DIDs due for resolution (never resolved, past their TTL, or past their backoff)",
    registry=IDENTITY,
)
identity_dids = Gauge(
    "appliance_identity_dids",
    "DIDs in the identity store, by status (verified, invalid, not_found, pending)",
    ["status"],
    registry=IDENTITY,
)
identity_posts_with_handle = Gauge(
    "appliance_identity_posts_with_handle_ratio",
    "Share of counted posts whose author has a known handle (verified or handle.invalid)",
    registry=IDENTITY,
)
identity_events = Counter(
    "appliance_identity_firehose_events_total",
    "Firehose identity events that changed a store entry",
    registry=IDENTITY,
)
identity_paused = Gauge(
    "appliance_identity_paused",
    "1 while resolutions wait out a PLC 429 (Retry-After) or a PLC outage backoff",
    registry=IDENTITY,
)
identity_rate = Gauge(
    "appliance_identity_rate",
    "The configured resolutions per second (identity_rate)",
    registry=IDENTITY,
)
identity_files = Counter(
    "appliance_identity_files_scanned_total",
    "Live Parquet files read for DIDs (posts) and identity events (identities), by table",
    ["table"],
    registry=IDENTITY,
)
