"""Batch benchmark: one batch the size of a 5-minute window at 10x the live firehose.

Generates the events (loadtest.firehose), then measures:

1. the in-process batch pipeline in a fresh child process (stream entries → decode → Arrow →
   dedupe → Parquet → manifest), timed per stage, with its peak RSS;
2. the whole path through a real redis-server (XADD entries, then `appliance batch` as a
   subprocess: XREADGROUP → files → XACK → trim), from its own log line, with its peak RSS;
3. storage: Parquet bytes per event against the raw JSON and the same events as zstd JSON lines
   (level 3), for posts and for all events, in the default configuration (only posts' own
   CIDs stored) and,
   beside it, with APPLIANCE_STORE_CIDS=true (`*_with_cids`, one more child run); the same after
   compaction; and encoding variants measured on the same rows (zstd levels, the derived uri
   stored as a column, CIDs as binary) and what more of the post record would cost (reply and
   quote CIDs, the record JSON), so that the choice of layout rests on numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from appliance import events
from appliance.store import layout
from appliance.store.manifest import read_manifest
from appliance.store.writer import writer_options
from loadtest.bench import free_port, median, peak_rss_mb

FIVE_MINUTES_AT_10X_PER_DAY = 144_000_000  # 500k events per 5 minutes
LIVE_POPULATION = 1_012_500  # DIDs active per day at the live rate (8.1M events / 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=500_000, help="events in the batch")
    parser.add_argument("--seed", type=int, default=1, help="generator seed")
    parser.add_argument(
        "--per-day",
        type=int,
        default=FIVE_MINUTES_AT_10X_PER_DAY,
        help="stream rate (events per day of stream time); default: 500k per 5 minutes",
    )
    parser.add_argument(
        "--population", type=int, default=LIVE_POPULATION, help="distinct DIDs in the stream"
    )
    parser.add_argument(
        "--entry-events", type=int, default=100, help="events per stream entry (as the ingester)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="in-process runs (fresh processes); the best is reported, the median beside it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="transform worker processes (APPLIANCE_BATCH_WORKERS; default: its default)",
    )
    parser.add_argument(
        "--ab-workers",
        type=int,
        help="also time this many workers, alternating with --workers run by run (A/B)",
    )
    parser.add_argument("--skip-redis", action="store_true", help="skip the path through Redis")
    parser.add_argument("--skip-variants", action="store_true", help="skip encoding variants")
    parser.add_argument("--workdir", help="directory for the data (default: a temporary one)")


# --- the child: the in-process pipeline ------------------------------------------------------


def _child(
    frames_path: str,
    data_dir: str,
    entry_events: int,
    store_cids: bool = False,
    workers: int | None = None,
) -> None:
    """Run one batch over the frames file; print the figures as JSON (runs in a fresh process).

    The transform workers are started before the clock starts, as the batcher starts them once.
    """
    from appliance.batch import files, transform
    from appliance.batch.tables import TableBuilder
    from appliance.buffer import pack
    from appliance.config import load_settings

    overrides: dict[str, Any] = {"store_cids": store_cids}
    if workers is not None:
        overrides["batch_workers"] = workers
    settings = load_settings(environ={}, data_dir=data_dir, compact_auto=False, **overrides)
    pool = transform.TransformPool(settings.batch_workers) if settings.batch_workers else None
    if pool is not None:
        pool.start()
    # Stream entries as XREADGROUP returns them (read line by line: only the entries stay).
    entries: list[tuple[str, dict[bytes, bytes] | None]] = []
    with open(frames_path, "rb") as fh:
        chunk: list[bytes] = []
        for line in fh:
            chunk.append(line.rstrip(b"\n"))
            if len(chunk) == entry_events:
                entries.append((f"1-{len(entries)}", pack(chunk)))
                chunk = []
        if chunk:
            entries.append((f"1-{len(entries)}", pack(chunk)))
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    cpu_started = time.process_time()
    builder = TableBuilder(max_bytes=settings.max_event_bytes, store_cids=settings.store_cids)
    batch = transform.Batch("new", builder, pool=pool)
    # As XREADGROUP replies of 200 entries, each dropped once transformed (as in the batcher).
    reads = [entries[i : i + 200] for i in range(0, len(entries), 200)]
    del entries
    reads.reverse()
    while reads:
        batch.add_entries(reads.pop())
    transformed = time.perf_counter()
    tables = batch.tables()
    built = time.perf_counter()
    written = files.write_batch(settings, batch, files.StoredKeys())
    finished = time.perf_counter()
    workers_peak = [peak_rss_mb(pid) for pid in pool.pids()] if pool is not None else []
    if pool is not None:
        pool.close()
    figures = {
        "batch_events": batch.frames,
        "rows": sum(t.num_rows for t in tables.values()),
        "decode_route_seconds": transformed - started,
        "arrow_finish_seconds": built - transformed,
        "write_seconds": finished - built,
        "batch_seconds": finished - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "peak_rss_mb": peak_rss_mb(),
        "workers": settings.batch_workers,
        "workers_peak_rss_mb": workers_peak,
        "rss_input_mb": rss_before,
        "bytes": written.bytes,
        "rows_by_table": written.rows,
    }
    print(json.dumps(figures))


def _run_child(
    frames_path: Path,
    data_dir: Path,
    entry_events: int,
    store_cids: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    code = (
        "import sys; from loadtest.bench.batch import _child; "
        f"_child({str(frames_path)!r}, {str(data_dir)!r}, {entry_events}, {store_cids!r}, "
        f"{workers!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=False, cwd=os.getcwd()
    )
    if out.returncode != 0:
        raise RuntimeError(f"batch child failed: {out.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


# --- the path through Redis -----------------------------------------------------------------


def _through_redis(frames: list[bytes], workdir: Path, entry_events: int) -> dict[str, Any]:
    import redis

    from appliance.buffer import pack
    from appliance.config import load_settings, to_environ
    from appliance.redis_server import start_redis

    settings = load_settings(
        environ={},
        data_dir=str(workdir / "redis-path-data"),
        redis_dir=str(workdir / "redis"),
        redis_port=free_port(),
        redis_password=os.urandom(12).hex(),
        redis_maxmemory="4gb",
        batch_port=free_port(),
        batch_interval_s=600,
        batch_max_events=len(frames),
        compact_auto=False,
        log_format="json",
    )
    server = start_redis(settings)
    batcher = None
    try:
        client = redis.Redis(port=settings.redis_port, password=settings.redis_password)
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(frames), entry_events):
            pipe.xadd(settings.stream_key, pack(frames[i : i + entry_events]))  # type: ignore[arg-type]
            if len(pipe) >= 500:
                pipe.execute()
        pipe.execute()
        log_path = workdir / "batcher.log"
        env = {**os.environ, **to_environ(settings)}
        with open(log_path, "wb") as log:
            batcher = subprocess.Popen(
                [sys.executable, "-m", "appliance", "batch"], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 600
        line: dict[str, Any] | None = None
        peak = 0.0
        while line is None:
            if batcher.poll() is not None:
                raise RuntimeError(f"batcher exited: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("the batcher did not write the batch in 600 s")
            peak = max(peak, peak_rss_mb(batcher.pid))
            for text in log_path.read_text().splitlines():
                if text.startswith("{") and json.loads(text)["msg"] == "batch written":
                    line = json.loads(text)
            time.sleep(0.2)
        peak = max(peak, peak_rss_mb(batcher.pid))
        left = client.xlen(settings.stream_key)
        client.close()
        return {
            "redis_batch_seconds": line["collect_seconds"] + line["seconds"],
            "redis_flush_seconds": line["seconds"],
            "redis_read_transform_seconds": line["collect_seconds"],
            "redis_peak_rss_mb": round(peak, 1),
            "redis_stream_left_after_trim": left,
        }
    finally:
        if batcher is not None and batcher.poll() is None:
            batcher.terminate()
            batcher.wait(60)
        server.terminate()
        server.wait(30)


# --- storage variants -------------------------------------------------------------------------


def _cid_binary(column: pa.ChunkedArray) -> pa.Array:
    out: list[bytes | None] = []
    for text in column.to_pylist():
        if text is None:
            out.append(None)
            continue
        body = text[1:].upper()  # multibase "b" = base32 lower case, unpadded
        out.append(base64.b32decode(body + "=" * (-len(body) % 8)))
    return pa.array(out, pa.binary())


def _encoded_size(table: pa.Table, level: int) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, **writer_options(table.schema, level))
    return len(buf.getvalue())


def _read_tables(data_dir: Path) -> dict[str, pa.Table]:
    tables = {}
    for table in layout.TABLES:
        files = list((data_dir / table).glob("date=*/*.parquet"))
        if files:
            tables[table] = pa.concat_tables(
                pq.read_table(f, schema=layout.SCHEMAS[table]) for f in files
            )
    return tables


def _variants(data_dir: Path, cids_dir: Path, events_n: int) -> dict[str, float]:
    """Bytes per event of the same rows under other encodings (measured, in memory).

    `data_dir` holds the default batch (CIDs null), `cids_dir` the same batch with CIDs.
    """
    default, with_cids = _read_tables(data_dir), _read_tables(cids_dir)
    out: dict[str, float] = {}

    def total(tables: dict[str, pa.Table], transform: Any, level: int = 3) -> float:
        return sum(_encoded_size(transform(n, t), level) for n, t in tables.items()) / events_n

    def same(_: str, t: pa.Table) -> pa.Table:
        return t

    def sorted_by_time(_: str, t: pa.Table) -> pa.Table:
        return t.sort_by("time_us")

    def with_uri(name: str, t: pa.Table) -> pa.Table:
        # the layout before the uri was derived: at://did/collection/rkey as the first column
        if name in (*layout.COMMIT_TABLES, "deletes"):
            return t.add_column(0, "uri", layout.uri_array(name, t))
        return t

    def cid_binary(_: str, t: pa.Table) -> pa.Table:
        for column in ("cid", "subject_cid"):
            if column in t.schema.names:
                i = t.schema.get_field_index(column)
                t = t.set_column(i, column, _cid_binary(t[column]))
        return t

    for level in (1, 3, 9, 19):
        out[f"zstd_{level}"] = total(default, same, level)
    out["sorted_by_time_zstd_3"] = total(default, sorted_by_time)
    out["with_uri_column_zstd_3"] = total(default, with_uri)
    out["with_cids_zstd_3"] = total(with_cids, same)
    out["with_cids_zstd_9"] = total(with_cids, same, 9)
    out["with_cids_binary_zstd_3"] = total(with_cids, cid_binary)
    out["with_cids_and_uri_column_zstd_3"] = total(with_cids, with_uri)
    return {k: round(v, 1) for k, v in out.items()}


def _post_record_variants(data_dir: Path, frames_path: Path, raw_posts: int) -> dict[str, float]:
    """What more of the post record would cost (B per post, and the posts saving), measured on
    the stored posts rows with columns added from their frames: the reply and quote CIDs (the
    strong refs a complete record needs), and the record JSON itself (whole, or without its text,
    which the `text` column already holds)."""
    posts = _read_tables(data_dir)["posts"]
    decode = msgspec.json.Decoder().decode
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    with open(frames_path, "rb") as fh:
        for line in fh:
            if b'"app.bsky.feed.post"' not in line:
                continue
            try:
                event = decode(line)
                c = event["commit"]
                records[(event["did"], c["rkey"], c["rev"])] = c["record"]
            except (msgspec.DecodeError, KeyError, TypeError):
                continue
    key_columns = (posts[c].to_pylist() for c in ("did", "rkey", "rev"))
    recs = [records.get(k) or {} for k in zip(*key_columns, strict=True)]

    def at(rec: Any, *path: str) -> Any:
        for key in path:
            rec = rec.get(key) if isinstance(rec, dict) else None
        return rec

    refs = {
        "reply_root_cid": [at(r, "reply", "root", "cid") for r in recs],
        "reply_parent_cid": [at(r, "reply", "parent", "cid") for r in recs],
        "quote_cid": [
            at(r, "embed", "record", "cid") or at(r, "embed", "record", "record", "cid")
            for r in recs
        ],
    }
    whole = [msgspec.json.encode(r).decode() for r in recs]
    no_text = [
        msgspec.json.encode({k: v for k, v in r.items() if k != "text"}).decode() for r in recs
    ]
    variants = {
        "default": {},
        "with_reply_and_quote_cids": refs,
        "with_record_json": {"record": whole},
        "with_record_json_without_text": {"record": no_text},
    }
    out: dict[str, float] = {}
    for name, columns in variants.items():
        table = posts
        for column, values in columns.items():
            table = table.append_column(column, pa.array(values, pa.string()))
        size = _encoded_size(table, 3)
        out[f"bytes_per_post_{name}"] = round(size / max(1, posts.num_rows), 1)
        out[f"saving_posts_{name}"] = round(1 - size / max(1, raw_posts), 4)
    return out


# --- run ---------------------------------------------------------------------------------------


def _inputs(args: argparse.Namespace, workdir: Path) -> tuple[list[bytes], Path, dict[str, int]]:
    """Generate the events; write them as JSON lines; raw bytes per table ("all" for all)."""
    from loadtest.firehose import FirehoseConfig, generate

    cfg = FirehoseConfig(
        seed=args.seed,
        events=args.events,
        events_per_day=args.per_day,
        population=args.population,
    )
    print(f"generating {args.events} events ...", flush=True)
    frames = list(generate(cfg))
    raw = {"all": sum(len(f) for f in frames)}
    now = events.now_us()
    for frame in frames:
        try:
            table = layout.table_for(events.decode(frame, now=now))
        except events.Rejected:
            continue
        raw[table] = raw.get(table, 0) + len(frame)
    frames_path = workdir / "frames.jsonl"
    frames_path.write_bytes(b"\n".join(frames))
    return frames, frames_path, raw


def _timed_runs(
    args: argparse.Namespace, frames_path: Path, workdir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`--repeat` in-process runs (and the `--ab-workers` runs beside them), fresh processes."""
    runs: list[dict[str, Any]] = []
    ab_runs: list[dict[str, Any]] = []
    for attempt in range(max(1, args.repeat)):
        data_dir = workdir / f"data-{attempt}"
        runs.append(_run_child(frames_path, data_dir, args.entry_events, workers=args.workers))
        print(
            f"  run {attempt + 1}: {runs[-1]['batch_seconds']:.2f} s wall, "
            f"{runs[-1]['cpu_seconds']:.2f} s CPU, {runs[-1]['workers']} workers, "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if args.ab_workers is not None:
            ab_dir = workdir / f"data-ab-{attempt}"
            ab_runs.append(
                _run_child(frames_path, ab_dir, args.entry_events, workers=args.ab_workers)
            )
            print(
                f"  B run {attempt + 1}: {ab_runs[-1]['batch_seconds']:.2f} s wall, "
                f"{ab_runs[-1]['workers']} workers, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    return runs, ab_runs


def _run_figures(
    runs: list[dict[str, Any]], raw: dict[str, int], zstd_jsonl: int
) -> dict[str, Any]:
    """Timing and storage figures of the best run, medians beside them."""
    child = min(runs, key=lambda r: r["batch_seconds"])
    n = child["batch_events"]
    stored_all = sum(child["bytes"].values())
    stored_posts = child["bytes"].get("posts", 0)
    posts_rows = max(1, child["rows_by_table"].get("posts", 0))
    return {
        "batch_events": n,
        "batch_seconds": round(child["batch_seconds"], 3),
        "batch_seconds_median": round(median([r["batch_seconds"] for r in runs]), 3),
        "cpu_seconds_median": round(median([r["cpu_seconds"] for r in runs]), 3),
        "runs": len(runs),
        "rows_per_s": round(child["rows"] / child["batch_seconds"]),
        "events_per_s": round(n / child["batch_seconds"]),
        "decode_route_seconds": round(child["decode_route_seconds"], 3),
        "arrow_finish_seconds": round(child["arrow_finish_seconds"], 3),
        "write_seconds": round(child["write_seconds"], 3),
        "cpu_seconds": round(child["cpu_seconds"], 3),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "peak_rss_mb_median": round(median([r["peak_rss_mb"] for r in runs]), 1),
        "workers": child["workers"],
        "workers_peak_rss_mb": [round(x, 1) for x in child["workers_peak_rss_mb"]],
        "load_average_1m_after_runs": round(os.getloadavg()[0], 2),
        "input_rss_mb": round(child["rss_input_mb"], 1),
        "raw_json_bytes_per_event": round(raw["all"] / n, 1),
        "zstd_jsonl_bytes_per_event": round(zstd_jsonl / n, 1),
        "bytes_per_event_all": round(stored_all / n, 1),
        "saving_all": round(1 - stored_all / raw["all"], 4),
        "saving_vs_zstd_jsonl": round(1 - stored_all / zstd_jsonl, 4),
        "bytes_per_post": round(stored_posts / posts_rows, 1),
        "raw_json_bytes_per_post": round(raw.get("posts", 0) / posts_rows, 1),
        "saving_posts": round(1 - stored_posts / max(1, raw.get("posts", 0)), 4),
        "bytes_per_row_by_table": {
            t: round(b / child["rows_by_table"][t], 1) for t, b in child["bytes"].items()
        },
    }


def _with_cids_figures(with_cids: dict[str, Any], raw: dict[str, int], n: int) -> dict[str, Any]:
    stored = sum(with_cids["bytes"].values())
    posts = with_cids["bytes"].get("posts", 0)
    return {
        "batch_seconds_with_cids": round(with_cids["batch_seconds"], 3),
        "bytes_per_event_all_with_cids": round(stored / n, 1),
        "saving_all_with_cids": round(1 - stored / raw["all"], 4),
        "bytes_per_post_with_cids": round(
            posts / max(1, with_cids["rows_by_table"].get("posts", 0)), 1
        ),
        "saving_posts_with_cids": round(1 - posts / max(1, raw.get("posts", 0)), 4),
    }


def _compaction_figures(data_dir: Path, n: int, raw: dict[str, int]) -> dict[str, Any]:
    """Compaction of the same rows (sorted by time, zstd level 9): its time and sizes."""
    from appliance.config import load_settings
    from appliance.store import compact

    settings = load_settings(environ={}, data_dir=str(data_dir), compact_grace_s=0)
    started = time.perf_counter()
    manifest = read_manifest(data_dir)
    partitions = sorted(
        {
            (t, p.split("/")[1].removeprefix("date="))
            for t in manifest.files
            for p in manifest.files[t]
        },
        key=lambda td: td[0] != "deletes",
    )
    for table, day in partitions:
        compact.compact_partition(settings, table, day)
    compact.remove_expired(settings)
    seconds = round(time.perf_counter() - started, 2)
    compacted = read_manifest(data_dir)
    sizes = {
        t: sum((data_dir / p).stat().st_size for p in paths) for t, paths in compacted.files.items()
    }
    return {
        "compact_seconds": seconds,
        "compacted_bytes_per_event_all": round(sum(sizes.values()) / n, 1),
        "compacted_saving_all": round(1 - sum(sizes.values()) / raw["all"], 4),
        "compacted_saving_posts": round(1 - sizes.get("posts", 0) / max(1, raw.get("posts", 0)), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-batch-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        frames, frames_path, raw = _inputs(args, workdir)
        zstd_jsonl = len(zstandard.ZstdCompressor(level=3).compress(frames_path.read_bytes()))
        print(
            f"raw JSON {raw['all'] / len(frames):.1f} B/event, "
            f"zstd-3 JSON lines {zstd_jsonl / len(frames):.1f} B/event",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        runs, ab_runs = _timed_runs(args, frames_path, workdir)
        figures = _run_figures(runs, raw, zstd_jsonl)
        figures["load_average_1m_before"] = round(load_before, 2)
        n = figures["batch_events"]
        best = min(range(len(runs)), key=lambda i: runs[i]["batch_seconds"])
        data_dir = workdir / f"data-{best}"
        print(
            f"in-process batch (best of {len(runs)}): {figures['batch_seconds']} s for {n} events "
            f"({figures['rows_per_s']} rows/s), peak RSS {figures['peak_rss_mb']} MiB",
            flush=True,
        )
        # The same batch with APPLIANCE_STORE_CIDS=true: the storage trade-off, side by side.
        cids_dir = workdir / "data-with-cids"
        with_cids = _run_child(frames_path, cids_dir, args.entry_events, store_cids=True)
        figures.update(_with_cids_figures(with_cids, raw, n))
        print(
            f"storage: {figures['bytes_per_event_all']} B/event, saving_all "
            f"{figures['saving_all']}, saving_posts {figures['saving_posts']} (default CIDs); "
            f"with CIDs {figures['bytes_per_event_all_with_cids']} B/event, saving_all "
            f"{figures['saving_all_with_cids']}, saving_posts {figures['saving_posts_with_cids']}",
            flush=True,
        )
        if ab_runs:
            figures["ab"] = {
                "workers": ab_runs[0]["workers"],
                "batch_seconds": round(min(r["batch_seconds"] for r in ab_runs), 3),
                "batch_seconds_median": round(median([r["batch_seconds"] for r in ab_runs]), 3),
                "peak_rss_mb_median": round(median([r["peak_rss_mb"] for r in ab_runs]), 1),
            }
        if not args.skip_variants:
            figures["variants_bytes_per_event"] = _variants(data_dir, cids_dir, n)
            figures["post_record_variants"] = _post_record_variants(
                data_dir, frames_path, raw.get("posts", 0)
            )
        figures.update(_compaction_figures(data_dir, n, raw))
        if not args.skip_redis:
            print("through redis-server ...", flush=True)
            figures.update(_through_redis(frames, workdir, args.entry_events))
        figures["targets"] = {
            "batch_seconds_le_5": figures["batch_seconds"] <= 5,
            "saving_all_ge_0.87": figures["saving_all"] >= 0.87,
            "saving_posts_ge_0.85": figures["saving_posts"] >= 0.85,
        }
        return figures
