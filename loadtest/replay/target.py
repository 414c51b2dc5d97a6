"""`loadtest replay --target URLS`: feed a running appliance and verify what it stored.

The target is named by URLs, each recognised by its scheme:

- `http(s)://HOST:PORT` (required): the API, for /ready, /v1/stats, the sample searches and
  exports, and the deleted posts;
- `redis://HOST:PORT` (required): the appliance's Redis buffer, which the replay feeds directly
  with the ingester's own packing (validated frames in micro-batched entries, dead letters, one
  MULTI/EXEC each). The password comes from `APPLIANCE_REDIS_PASSWORD` or
  `--target-password-file FILE`, never from the URL or the command line. The stream, dead-letter
  and consumer-group names are the appliance's settings, read from `APPLIANCE_*` as the
  appliance reads them (defaults otherwise);
- `file:///DATA_DIR` (optional): the target's data root, when this machine can read it (the
  same host, or a booted test host's file system): the Parquet files are then checked key by
  key as for the replay's own stack; without it, per table and day the counts of /v1/stats.

Nothing on the target is started, stopped or killed, and its ingester's cursor is not written:
faults are refused. A target that already holds events, buffered entries or dead letters is
refused unless `--target-allow-data`: verification then compares what this replay added (the
counts per table and day, the new dead letters) and skips the sample searches, whose answers
the data already there would change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import redis

from appliance.config import ConfigError, Settings, load_settings
from loadtest.replay import feed, source, verify
from loadtest.replay.report import latencies
from loadtest.replay.stack import http_get

SCHEMES = "http(s)://API, redis://HOST:PORT (the buffer), file:///DATA_DIR (optional)"


class TargetError(ValueError):
    """A target that cannot be used as given: the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    api: str  # base URL without a trailing slash
    redis_host: str
    redis_port: int
    data_dir: Path | None
    password_from: str  # where the Redis password came from, for messages (never the value)


def parse_target(text: str) -> tuple[str, str, str | None]:
    """(api, redis URL, data dir or None) from `--target`, each checked for its form."""
    api = buffer_url = data = None
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = urllib.parse.urlsplit(part)
        if url.scheme in ("http", "https"):
            if api is not None:
                raise TargetError(f"--target: two API URLs ({api}, {part})")
            if not url.hostname or url.query or url.fragment or url.username:
                raise TargetError(f"--target: {part!r} is not an API base URL (http://HOST:PORT)")
            api = part.rstrip("/")
        elif url.scheme == "redis":
            if buffer_url is not None:
                raise TargetError(f"--target: two Redis URLs ({buffer_url}, {part})")
            if url.password is not None or url.username:
                raise TargetError(
                    "--target: no password in the Redis URL (a command line is visible to every "
                    "user of the machine): set APPLIANCE_REDIS_PASSWORD or --target-password-file"
                )
            if not url.hostname or url.path not in ("", "/", "/0") or url.query:
                raise TargetError(f"--target: {part!r} is not redis://HOST:PORT (database 0)")
            buffer_url = part
        elif url.scheme == "file":
            if data is not None:
                raise TargetError(f"--target: two data directories ({data}, {url.path})")
            data = urllib.parse.unquote(url.path)
        else:
            raise TargetError(f"--target: {part!r} is not one of {SCHEMES}")
    if api is None:
        raise TargetError("--target: the API's base URL is missing (http://HOST:PORT)")
    if buffer_url is None:
        raise TargetError("--target: the Redis buffer to feed is missing (redis://HOST:PORT)")
    return api, buffer_url, data


def resolve(args: argparse.Namespace, environ: dict[str, str]) -> tuple[Target, Settings]:
    """The target and the appliance settings the replay feeds it with (names of the stream,
    dead letters and consumer group; packing sizes), validated before anything is touched."""
    if args.faults:
        raise TargetError(
            "--faults with --target: a replay never starts, stops or kills anything on a "
            "running appliance; run faults against the replay's own stack (no --target)"
        )
    if args.path != "direct":
        raise TargetError(
            "--target feeds the appliance's Redis buffer: add --path direct (the target's "
            "ingester keeps its own source and cursor)"
        )
    if args.speed is not None or args.soak is not None:
        raise TargetError("--target feeds at full speed: --speed and --soak need the own stack")
    if args.work:
        raise TargetError("--work is the own stack's directory: nothing is kept with --target")
    api, buffer_url, data = parse_target(args.target)
    url = urllib.parse.urlsplit(buffer_url)
    try:
        port = url.port or 6379
    except ValueError:
        raise TargetError(f"--target: {buffer_url!r} has a bad port") from None
    password_from = "APPLIANCE_REDIS_PASSWORD"
    overrides: dict[str, Any] = {"redis_host": url.hostname, "redis_port": port}
    if args.target_password_file:
        try:
            password = Path(args.target_password_file).read_text().strip()
        except OSError as exc:
            raise TargetError(f"--target-password-file: {exc.strerror}") from None
        if not password:
            raise TargetError(f"--target-password-file {args.target_password_file}: empty")
        overrides["redis_password"] = password
        password_from = args.target_password_file
    try:
        settings = load_settings(environ=environ, **overrides)
    except ConfigError as exc:
        raise TargetError(f"the appliance settings in the environment: {exc}") from None
    data_dir = Path(data) if data else None
    if data_dir is not None and not data_dir.is_dir():
        raise TargetError(f"--target: the data directory {data_dir} does not exist here")
    assert url.hostname is not None
    return Target(api, url.hostname, port, data_dir, password_from), settings


def connect(target: Target, settings: Settings) -> redis.Redis:
    """A client of the target's Redis, checked: reachable, and the password accepted."""
    client = redis.Redis(
        host=target.redis_host,
        port=target.redis_port,
        password=settings.redis_password or None,
        socket_timeout=10,
        socket_connect_timeout=5,
    )
    where = f"Redis at {target.redis_host}:{target.redis_port}"
    try:
        client.ping()
    except redis.AuthenticationError:
        raise TargetError(f"{where} refused the password from {target.password_from}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "auth" in str(exc).lower():
            raise TargetError(
                f"{where} needs a password: set APPLIANCE_REDIS_PASSWORD or --target-password-file"
            ) from None
        raise TargetError(f"{where}: {exc}") from None
    except redis.RedisError as exc:
        raise TargetError(f"cannot reach {where}: {exc}") from None
    return client


def _stats(api: str) -> dict[str, Any]:
    status, body = http_get(f"{api}/v1/stats", timeout=60)
    if status != 200:
        raise TargetError(f"GET {api}/v1/stats: HTTP {status} {body[:200]!r}")
    return dict(json.loads(body))


def check_ready(api: str) -> dict[str, Any]:
    """The API answers /ready and /v1/stats; returns the stats (what the store holds now)."""
    try:
        status, body = http_get(f"{api}/ready", timeout=10)
    except OSError as exc:
        raise TargetError(f"cannot reach the API at {api}: {exc}") from None
    if status != 200:
        raise TargetError(f"the API at {api} is not ready: HTTP {status} {body[:200]!r}")
    try:
        return _stats(api)
    except (OSError, ValueError) as exc:
        raise TargetError(f"the API at {api} did not answer /v1/stats: {exc}") from None


def check_group(client: redis.Redis, settings: Settings) -> None:
    """The target's batcher reads the stream with its consumer group (it creates the group when
    it starts): without it nothing fed would ever be stored, and the replay would only time out."""
    try:
        groups = client.xinfo_groups(settings.stream_key)
    except redis.ResponseError:  # no such stream yet
        groups = []
    if not any(g["name"].decode() == settings.consumer_group for g in groups):
        raise TargetError(
            f"no consumer group {settings.consumer_group!r} on the stream "
            f"{settings.stream_key!r}: is the target's batcher running, and are "
            "APPLIANCE_STREAM_KEY and APPLIANCE_CONSUMER_GROUP the appliance's own?"
        )


def holdings(client: redis.Redis, settings: Settings, stats: dict[str, Any]) -> list[str]:
    """What the target holds already: stored events, buffered entries, dead letters."""
    held = []
    if stats.get("events"):
        held.append(f"{stats['events']:,} stored events")
    for key, what in (
        (settings.stream_key, "entries in the buffer stream"),
        (settings.dead_letter_key, "dead letters"),
    ):
        n = int(client.xlen(key))
        if n:
            held.append(f"{n:,} {what} ({key})")
    return held


def _last_id(client: redis.Redis, key: str) -> str:
    entries: list[tuple[bytes, Any]] = client.xrevrange(key, count=1)  # type: ignore[assignment]
    return "(" + entries[0][0].decode() if entries else "-"


def _day_counts(stats: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(t, d["date"]): n for d in stats.get("days", []) for t, n in d["tables"].items()}


def check_counts(
    before: dict[str, Any],
    after: dict[str, Any],
    expect: source.Expectation,
    out: verify.Verification,
) -> None:
    """Per table and day, what /v1/stats counts now minus before equals the ground truth's count
    (an excess is reported as stored twice, a shortfall as lost: counts cannot tell them apart
    where both happen, the Parquet check with file:// can)."""
    was, now = _day_counts(before), _day_counts(after)
    for table, days in sorted(expect.truth.tables.items()):
        expected = sum(d.count for d in days.values())
        mismatched, stored, lost, extra = [], 0, 0, 0
        for day in sorted(set(days) | {d for t, d in now if t == table}):
            added = now.get((table, day), 0) - was.get((table, day), 0)
            want = days[day].count if day in days else 0
            stored += added
            lost += max(want - added, 0)
            extra += max(added - want, 0)
            if added != want:
                mismatched.append(day)
        out.tables.append(verify.TableCheck(table, expected, stored, extra, lost, mismatched))
        if mismatched:
            out.problems.append(f"{table}: counts of days {mismatched} differ")
    out.events_expected = sum(t.expected for t in out.tables)
    out.events_stored = sum(t.stored for t in out.tables)
    out.lost = sum(t.lost for t in out.tables)
    out.duplicates = sum(t.duplicates for t in out.tables)


def wait_stored(
    client: redis.Redis, settings: Settings, api: str, want: int, timeout_s: float
) -> bool:
    """Until the buffer is drained (every entry acknowledged by the target's batcher) and the
    API counts at least `want` events more than before, or stops changing for 30 s."""
    deadline = time.monotonic() + timeout_s
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            if feed.drained(client, settings):
                events = int(_stats(api).get("events", 0))
                if events >= want:
                    return True
                if events != last:
                    last, still_since = events, time.monotonic()
                elif time.monotonic() - still_since > 30:
                    return True  # drained and settled: verification says what is missing
        time.sleep(0.5)
    return False


def run(args: argparse.Namespace, events: int) -> dict[str, Any]:
    """Validate the target, feed it, wait until it stored everything, verify, report."""
    target, settings = resolve(args, dict(os.environ))
    before = check_ready(target.api)
    client = connect(target, settings)
    try:
        check_group(client, settings)
        held = holdings(client, settings, before)
        if held and not args.target_allow_data:
            raise TargetError(
                f"the target already holds {', '.join(held)}: verification counts exact events, "
                "so it needs an empty appliance (or --target-allow-data to check only what this "
                "replay adds)"
            )
        paths, expect, prep = source.prepare(args, 0.0, events)
        dead_from = _last_id(client, settings.dead_letter_key)
        began = time.monotonic()
        feeder = feed.Feeder(settings, paths, write_cursor=False)
        feeder.start()
        want = int(before.get("events", 0)) + expect.truth.count()
        while not feeder.done and time.monotonic() - began < args.timeout:
            print(f"target: fed {feeder.fed:,} of {expect.frames:,} frames", flush=True)
            feeder.wait(5)
        stored = feeder.done and wait_stored(
            client, settings, target.api, want, max(args.timeout - (time.monotonic() - began), 60)
        )
        wall_s = time.monotonic() - began
        feeder.stop.set()
        result, skipped = _verify(target, settings, client, expect, before, dead_from, bool(held))
        if not stored:
            result.problems.append(f"not everything was stored within {args.timeout:g} s")
            result.verified = False
    finally:
        client.close()
    return _report(args, target, events, expect, prep, result, wall_s, held, skipped)


def _verify(
    target: Target,
    settings: Settings,
    client: redis.Redis,
    expect: source.Expectation,
    before: dict[str, Any],
    dead_from: str,
    had_data: bool,
) -> tuple[verify.Verification, str]:
    out = verify.Verification()
    skipped = ""
    verify.check_rejects(client, settings.dead_letter_key, expect, out, start=dead_from)
    if target.data_dir is not None and not had_data:
        verify.check_storage(target.data_dir, expect, out)
    else:
        check_counts(before, _stats(target.api), expect, out)
    if had_data:
        skipped = "sample searches and deleted posts: the target held data before"
    else:
        verify.check_api(target.api, expect, out, export_cap=None)
    return verify.conclude(out), skipped


def _report(
    args: argparse.Namespace,
    target: Target,
    events: int,
    expect: source.Expectation,
    prep: dict[str, Any],
    v: verify.Verification,
    wall_s: float,
    held: list[str],
    skipped: str,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "scale": args.scale,
        "events": events,
        "source": expect.source,
        "path": "direct",
        "target": {
            "api": target.api,
            "redis": f"redis://{target.redis_host}:{target.redis_port}",
            "data_dir": str(target.data_dir) if target.data_dir else None,
            "held_before": held,
        },
        "storage_check": "Parquet keys (file://)"
        if target.data_dir is not None and not held
        else "/v1/stats counts per table and day",
        "seed": args.seed,
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "prepare": prep,
        "events_generated": expect.frames,
        "events_valid": expect.truth.count(),
        "events_stored": v.events_stored,
        "lost": v.lost,
        "duplicates": v.duplicates,
        "verified": v.verified,
        "problems": v.problems,
        "skipped": skipped,
        "wall_s": round(wall_s, 2),
        "events_per_s": round(expect.frames / wall_s) if wall_s else None,
        "query_latencies": latencies(v.searches),
        "rejects": {"expected": v.rejects_expected, "found": v.rejects_found},
        "deleted_posts_checked": v.deleted_checked,
        "deleted_posts_visible": len(v.deleted_visible),
        "stats_endpoint_ok": v.stats_ok,
        "tables": [msgspec.to_builtins(t) for t in v.tables],
    }
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(_markdown(figures))
    return figures


def _markdown(f: dict[str, Any]) -> str:
    ok = "**passed**" if f["verified"] else "**FAILED**: " + "; ".join(f["problems"][:3])
    t = f["target"]
    lines = [
        f"# Replay against a running appliance: {f['scale']} ({f['events']:,} events)",
        "",
        f"Verification {ok}. Target: API {t['api']}, buffer {t['redis']}; fed directly into "
        f"the buffer; storage checked by {f['storage_check']}. Source: {f['source']}; seed "
        f"{f['seed']}. Finished {f['finished_at']}, 1-minute load {f['load_average_1m_end']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events generated / valid / stored | {f['events_generated']:,} / "
        f"{f['events_valid']:,} / {f['events_stored']:,} |",
        f"| lost / stored twice | {f['lost']} / {f['duplicates']} |",
        f"| wall time (first frame fed to the last event stored) | {f['wall_s']:,.1f} s |",
        f"| events/s end to end | {f['events_per_s']:,} |",
        f"| rejects expected / found | {f['rejects']['expected']} / {f['rejects']['found']} |",
        f"| deleted posts checked / visible | {f['deleted_posts_checked']} / "
        f"{f['deleted_posts_visible']} |",
    ]
    if f["skipped"]:
        lines.append(f"| not checked | {f['skipped']} |")
    if f["target"]["held_before"]:
        lines.append(f"| held before | {', '.join(f['target']['held_before'])} |")
    lines += [
        "",
        "| query | expected rows | search s | export rows | equal |",
        "|---|---|---|---|---|",
    ]
    for q in f["query_latencies"]:
        lines.append(
            f"| {q['query']} | {q['expected']} | {q['search_s']} | {q['export_rows']} | "
            f"{'yes' if q['ok'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, events: int) -> int:
    try:
        result = run(args, events)
    except TargetError as exc:
        print(f"loadtest replay: {exc}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.report) / 'report.md'}")
    print("verified" if result["verified"] else "NOT verified: " + "; ".join(result["problems"]))
    return 0 if result["verified"] else 1
