"""One settings object for every service, built once from APPLIANCE_* environment variables.

Each field carries a default and a one-line help text; `appliance config` and the settings
table of docs/operations.md are generated from the same declarations. No other module reads os.environ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta

from appliance.events import MAX_EVENT_BYTES

PREFIX = "APPLIANCE_"

# Fields whose values never appear in output or logs.
SECRETS = frozenset({"redis_password", "api_cursor_secret"})

PUBLIC_JETSTREAMS = (
    "wss://jetstream1.us-east.bsky.network/subscribe",
    "wss://jetstream2.us-east.bsky.network/subscribe",
    "wss://jetstream1.us-west.bsky.network/subscribe",
    "wss://jetstream2.us-west.bsky.network/subscribe",
)


def _h(text: str, **constraints: Any) -> Meta:
    return Meta(description=text, **constraints)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of the appliance. Build with `load_settings()`."""

    # --- storage ---------------------------------------------------------------------------
    data_dir: Annotated[str, _h("Root of the Parquet datasets (the SSD volume in production)")] = (
        "./data"
    )
    # --- redis -----------------------------------------------------------------------------
    redis_host: Annotated[str, _h("Redis host (bound to loopback)")] = "127.0.0.1"
    redis_port: Annotated[int, _h("Redis port", ge=1, le=65535)] = 6379
    redis_password: Annotated[str, _h("Redis password (required by our redis.conf; secret)")] = ""
    redis_dir: Annotated[str, _h("Directory for Redis AOF/RDB files (appliance up)")] = (
        "./var/redis"
    )
    redis_maxmemory: Annotated[
        str, _h("Redis maxmemory (noeviction: writers get errors, never silent loss)")
    ] = "1gb"
    stream_key: Annotated[str, _h("Redis Stream that buffers validated events", min_length=1)] = (
        "appliance:events"
    )
    dead_letter_key: Annotated[
        str, _h("Redis Stream that keeps rejected frames with their reason", min_length=1)
    ] = "appliance:deadletter"
    dead_letter_maxlen: Annotated[
        int, _h("Approximate cap on dead-letter entries kept", ge=100)
    ] = 100_000
    cursor_key: Annotated[
        str, _h("Redis key holding the ingester cursor (time_us)", min_length=1)
    ] = "appliance:cursor"
    consumer_group: Annotated[str, _h("Consumer group the batcher reads with", min_length=1)] = (
        "batcher"
    )
    # --- ingester --------------------------------------------------------------------------
    jetstream_urls: Annotated[
        tuple[str, ...], _h("Jetstream /subscribe URLs, comma-separated, tried in turn")
    ] = PUBLIC_JETSTREAMS
    wanted_collections: Annotated[
        tuple[str, ...], _h("Collections to subscribe to (NSIDs or prefix.*); empty = all")
    ] = ()
    wanted_dids: Annotated[tuple[str, ...], _h("DIDs to subscribe to; empty = all")] = ()
    cursor_rewind_s: Annotated[
        float, _h("Seconds to rewind the saved cursor on reconnect", ge=0, le=3600)
    ] = 5.0
    stall_timeout_s: Annotated[
        float, _h("Reconnect when no frame arrives for this many seconds", gt=0)
    ] = 30.0
    reconnect_max_backoff_s: Annotated[
        float, _h("Cap of the exponential reconnect backoff", gt=0)
    ] = 30.0
    max_event_bytes: Annotated[
        int, _h("Frames larger than this are dead-lettered as oversized", ge=1024)
    ] = MAX_EVENT_BYTES
    ingest_entry_events: Annotated[
        int, _h("Events packed into one Redis Stream entry", ge=1, le=10_000)
    ] = 100
    ingest_flush_ms: Annotated[
        int, _h("Longest a received event waits before it is written to Redis", ge=1)
    ] = 100
    ingest_port: Annotated[
        int, _h("Port of the ingester's /health, /ready, /metrics", ge=0, le=65535)
    ] = 9101
    ingest_host: Annotated[
        str, _h("Address the ingester's /health, /ready, /metrics listen on")
    ] = "127.0.0.1"
    ingest_pipeline_events: Annotated[
        int, _h("Most events written per Redis round trip (entries pipelined in one MULTI)", ge=1)
    ] = 5000
    ingest_gap_tolerance_s: Annotated[
        float,
        _h("A first event after (re)connect this much past the resume point is a gap", ge=0),
    ] = 10.0
    ingest_log_interval_s: Annotated[
        float, _h("Seconds between the ingester's progress log lines", gt=0)
    ] = 10.0
    # --- batcher ---------------------------------------------------------------------------
    batch_interval_s: Annotated[float, _h("Seconds between Parquet flushes", gt=0)] = 300.0
    batch_max_events: Annotated[int, _h("Flush early once this many events are buffered", ge=1)] = (
        500_000
    )
    batch_max_attempts: Annotated[
        int, _h("Attempts before an entry is moved to the dead-letter stream", ge=1)
    ] = 3
    batch_claim_idle_s: Annotated[
        float, _h("Claim entries pending this long with another consumer", gt=0)
    ] = 60.0
    batch_port: Annotated[
        int, _h("Port of the batcher's /health, /ready, /metrics", ge=0, le=65535)
    ] = 9102
    batch_workers: Annotated[
        int,
        _h(
            "Worker processes that decode stream entries beside the batcher's own thread "
            "(0 = in-process only); spawned once at start",
            ge=0,
            le=16,
        ),
    ] = 0
    parquet_zstd_level: Annotated[int, _h("zstd level of Parquet files", ge=1, le=22)] = 3
    store_cids: Annotated[
        bool,
        _h(
            "Store the CIDs of likes, reposts, follows, blocks and other records (cid, "
            "subject_cid); off, the columns stay but are null: CIDs are random hashes, about "
            "half the stored bytes. Posts' own cid is always stored (XRPC's PostView needs it)"
        ),
    ] = False
    compact_grace_s: Annotated[
        float, _h("Seconds replaced files are kept for queries still reading them", ge=0)
    ] = 120.0
    batch_host: Annotated[str, _h("Address the batcher's /health, /ready, /metrics listen on")] = (
        "127.0.0.1"
    )
    batch_consumer: Annotated[
        str, _h("Consumer name in the group; keep it stable so a restart finds its pending entries")
    ] = "batcher-1"
    batch_dedupe_margin_s: Annotated[
        float,
        _h("Stored rows this close in time_us to a batch are checked for duplicate keys", ge=0),
    ] = 60.0
    batch_crash_at: Annotated[
        str, _h("Testing only: SIGKILL the batcher at this named point (see docs/architecture.md)")
    ] = ""
    compact_auto: Annotated[
        bool, _h("The batcher compacts each day once it is closed (see compact_after_s)")
    ] = True
    compact_after_s: Annotated[
        float,
        _h("A day is closed once events this many seconds past its end (UTC) are batched", ge=0),
    ] = 3600.0
    compact_max_rows: Annotated[int, _h("Most rows per compacted Parquet file", ge=1000)] = (
        5_000_000
    )
    compact_zstd_level: Annotated[int, _h("zstd level of compacted files", ge=1, le=22)] = 9
    compact_memory_limit: Annotated[
        str, _h("DuckDB memory_limit while compacting (spills to disk beyond it)")
    ] = "1GB"
    # --- API -------------------------------------------------------------------------------
    api_host: Annotated[str, _h("Address the API listens on")] = "127.0.0.1"
    api_port: Annotated[int, _h("Port the API listens on", ge=0, le=65535)] = 8080
    api_workers: Annotated[int, _h("Sanic worker processes", ge=1, le=64)] = 1
    result_limit: Annotated[
        bool, _h("Feature flag: cap every search and export at result_limit_max rows")
    ] = True
    result_limit_max: Annotated[int, _h("Rows a query may reach with the flag on", ge=1)] = 1000
    export_hard_cap: Annotated[int, _h("Rows an export may return with the flag off", ge=1)] = (
        1_000_000
    )
    page_size: Annotated[int, _h("Default page size of /v1/search", ge=1, le=100)] = 50
    query_timeout_s: Annotated[float, _h("Interrupt a query after this many seconds", gt=0)] = 10.0
    duckdb_memory_limit: Annotated[str, _h("DuckDB memory_limit per API worker")] = "2GB"
    duckdb_threads: Annotated[int, _h("DuckDB threads per API worker", ge=1, le=64)] = 2
    api_max_running: Annotated[
        int, _h("Queries an API worker runs at once (its query threads)", ge=1, le=256)
    ] = 2
    api_max_waiting: Annotated[
        int, _h("Queries an API worker lets wait for a slot; more are answered 503", ge=0)
    ] = 32
    api_max_wait_s: Annotated[
        float,
        _h("Longest a query waits for a slot (or a long scan for its lane) before a 503", gt=0),
    ] = 5.0
    query_long_scans: Annotated[
        int, _h("Long scans (searches past 2M rows read) an API worker runs at once", ge=1)
    ] = 1
    cors_origins: Annotated[
        tuple[str, ...], _h("Origins allowed by CORS, comma-separated; empty = none")
    ] = ()
    cache_entries: Annotated[int, _h("Entries in the search result cache", ge=0)] = 256
    query_text_index: Annotated[
        bool,
        _h(
            "Read only the rows (or row groups) of compacted posts files that their token index "
            "says can match"
        ),
    ] = True
    api_cursor_secret: Annotated[
        str, _h("Key that signs search cursors (secret); empty = a new random key per start")
    ] = ""
    # --- identity (DID -> handle) --------------------------------------------------------------
    plc_url: Annotated[str, _h("PLC directory that serves did:plc documents")] = (
        "https://plc.directory"
    )
    identity_rate: Annotated[
        float,
        _h("DID resolutions per second of the background worker (0 = resolve none)", ge=0, le=100),
    ] = 5.0
    identity_ttl_s: Annotated[
        float, _h("Seconds a resolved handle stays fresh before it is resolved again", ge=60)
    ] = 86_400.0
    identity_timeout_s: Annotated[
        float, _h("Timeout of each request the identity worker makes", gt=0, le=60)
    ] = 5.0
    identity_query_timeout_s: Annotated[
        float, _h("Time a search may spend resolving a handle never seen to its DID", gt=0, le=30)
    ] = 2.0
    identity_dns: Annotated[
        tuple[str, ...],
        _h(
            "DNS servers for _atproto TXT lookups (host or host:port, comma-separated); empty = system"
        ),
    ] = ()
    identity_web_origin: Annotated[
        str,
        _h(
            "Testing only: send every https://<host>/.well-known request to this origin (Host kept)"
        ),
    ] = ""
    identity_host: Annotated[
        str, _h("Address the identity worker's /health, /ready, /metrics listen on")
    ] = "127.0.0.1"
    identity_port: Annotated[
        int, _h("Port of the identity worker's /health, /ready, /metrics", ge=0, le=65535)
    ] = 9103
    # --- logging ---------------------------------------------------------------------------
    log_level: Annotated[str, _h("Log level: DEBUG, INFO, WARNING, ERROR")] = "INFO"
    log_format: Annotated[str, _h("Log format: json, text, or auto (text on a terminal)")] = "auto"

    def __post_init__(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"{PREFIX}LOG_LEVEL: {self.log_level!r} is not a log level")
        if self.log_format not in {"json", "text", "auto"}:
            raise ConfigError(f"{PREFIX}LOG_FORMAT: {self.log_format!r} is not json|text|auto")
        for url in self.jetstream_urls:
            if not url.startswith(("ws://", "wss://")):
                raise ConfigError(f"{PREFIX}JETSTREAM_URLS: {url!r} is not a ws:// or wss:// URL")
        for name, url in (
            ("PLC_URL", self.plc_url),
            ("IDENTITY_WEB_ORIGIN", self.identity_web_origin),
        ):
            if (url or name == "PLC_URL") and not re.fullmatch(r"https?://[^/?#\s]+/?", url):
                raise ConfigError(f"{PREFIX}{name}: {url!r} is not an http(s):// origin")
        for server in self.identity_dns:
            host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
            if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
                raise ConfigError(f"{PREFIX}IDENTITY_DNS: {server!r} is not host or host:port")


class ConfigError(ValueError):
    """A setting from the environment is missing, malformed or out of range."""


def _field_types() -> dict[str, Any]:
    return get_type_hints(Settings, include_extras=True)


def describe() -> list[tuple[str, str, Any]]:
    """(ENV_NAME, help, default) for every setting, in declaration order."""
    out = []
    hints = _field_types()
    for field in msgspec.structs.fields(Settings):
        meta = next(a for a in get_args(hints[field.name]) if isinstance(a, Meta))
        out.append((PREFIX + field.name.upper(), meta.description or "", field.default))
    return out


def markdown_table() -> str:
    """The settings as a Markdown table (variable, default, help), as docs/operations.md has it."""
    rows = ["| variable | default | what |", "|---|---|---|"]
    for env_name, help_text, default in describe():
        shown = ",".join(default) if isinstance(default, tuple) else default
        if isinstance(shown, bool):
            shown = str(shown).lower()
        cell = f"`{shown}`" if shown != "" else "(empty)"
        rows.append(f"| `{env_name}` | {cell} | {help_text} |")
    return "\n".join(rows)


def _parse(name: str, raw: str, annotated: Any) -> Any:
    base = get_args(annotated)[0] if get_origin(annotated) is Annotated else annotated
    if get_origin(base) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if base is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{PREFIX}{name.upper()}: {raw!r} is not a boolean (true/false)")
    return raw.strip() if base is str else raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment (and explicit overrides, e.g. CLI flags)."""
    env = os.environ if environ is None else environ
    hints = _field_types()
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        key = PREFIX + field.name.upper()
        if key in env:
            values[field.name] = _parse(field.name, env[key], hints[field.name])
    known = {PREFIX + f.name.upper() for f in msgspec.structs.fields(Settings)}
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc))) from exc


def _explain(message: str) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.redis_port`"; name the variable instead.
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        return f"{PREFIX}{path.rstrip('`').split('[')[0].upper()}: {text}"
    return message


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as a dict with secrets replaced, for printing and logs."""
    out = msgspec.structs.asdict(settings)
    for name in SECRETS:
        if out.get(name):
            out[name] = "********"
    return out


def to_environ(settings: Settings) -> dict[str, str]:
    """Render settings back to APPLIANCE_* variables, for child processes."""
    env = {}
    for name, value in msgspec.structs.asdict(settings).items():
        if isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[PREFIX + name.upper()] = text
    return env
