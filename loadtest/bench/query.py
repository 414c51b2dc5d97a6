"""Query benchmark: first-page latency of /v1/search over a month-scale posts store.

Builds (once, cached in --store; see loadtest.bench.store) a month of posts laid out as the
compactor leaves them. Then, for each probe word with no filter, a 1-day and a 7-day date filter
and an author, lang, tag and domain filter, it times the API's first page through HTTP (a real
`appliance serve` subprocess, result cache off) beside the plain DuckDB query over all files, and
times an export of 1000 rows in each format.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.store import compact, layout
from appliance.store.manifest import read_manifest
from loadtest.bench import free_port, median, p95
from loadtest.bench.store import COMMON_WORD, PROBES, StoreSpec, build_store, reindex_store

if TYPE_CHECKING:
    import duckdb


FILTERS = ("none", "1d", "7d", "author", "lang", "tag", "domain")
# the values of the lang/tag/domain cases (a 5%, ~1.3% and ~1.7% share of the posts)
CASE_LANG, CASE_TAG, CASE_DOMAIN = "de", "science", "github.com"
PLAIN_COLUMNS = (
    f"{layout.uri_sql('posts')} AS uri, did, rev, time_us, created_at, text, langs, reply_parent, reply_root, quote_uri, "
    "embed_kind, external_uri, links, mentions, tags"
)


class _Api:
    """A real `appliance serve` subprocess over the store, result cache off."""

    def __init__(
        self,
        store: Path,
        threads: int,
        workdir: Path,
        text_index: bool = True,
        environ: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
        from appliance.config import load_settings, to_environ

        port = free_port()
        given: dict[str, Any] = {
            "api_workers": 1,
            "cache_entries": 0,  # measure the query, not the cache
            "query_timeout_s": 600.0,
            "duckdb_threads": threads,
            "query_text_index": text_index,
            **overrides,
        }
        settings = load_settings(
            environ=environ or {},
            data_dir=str(store.resolve()),
            api_port=port,
            log_format="json",
            log_level="WARNING",
            **given,
        )
        self.settings = settings
        self.base = f"http://127.0.0.1:{port}"
        self.log = workdir / "bench-query-serve.log"
        env = {**os.environ, **to_environ(settings)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        began = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance serve exited: {self.log.read_text()[-2000:]}")
            try:
                if self.get("/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - began > 300:
                self.stop()
                raise TimeoutError("appliance serve did not become ready")
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - began

    def get(self, path: str, params: dict[str, str] | None = None) -> tuple[int, bytes]:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=900) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def _day_us(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1_000_000


def _case(meta: dict[str, Any], word: str, flt: str) -> tuple[dict[str, str], str, dict[str, Any]]:
    """API params, the plain query's extra WHERE and its params for one case."""
    last = datetime.fromisoformat(meta["last_day"])
    params = {"q": f'"{word}"' if " " in word else word, "limit": "50"}
    where = ""
    bound: dict[str, Any] = {}
    if flt in ("1d", "7d"):
        since = (last - timedelta(days=0 if flt == "1d" else 6)).strftime("%Y-%m-%d")
        until = (last + timedelta(days=1)).strftime("%Y-%m-%d")
        params.update(since=since, until=until)
        where = " AND time_us >= $since AND time_us < $until"
        bound = {"since": _day_us(since), "until": _day_us(until)}
    elif flt == "author":
        params["author"] = meta["author_handle"]
        where, bound = " AND did = $did", {"did": meta["author_did"]}
    elif flt.startswith("lang"):  # lang, or lang_XX
        lang = flt.removeprefix("lang").removeprefix("_") or CASE_LANG
        params["lang"] = lang
        where, bound = " AND list_contains(langs, $lang)", {"lang": lang}
    elif flt == "tag":
        params["tag"] = CASE_TAG
        where = " AND list_contains(list_transform(tags, lambda x: lower(x)), $tag)"
        bound = {"tag": CASE_TAG}
    elif flt == "domain":
        params["domain"] = CASE_DOMAIN
        where = (
            " AND (contains(coalesce(external_uri, ''), $domain)"
            " OR contains(array_to_string(links, ' '), $domain))"
        )
        bound = {"domain": CASE_DOMAIN}
    return params, where, bound


def _timed(fn: Any, runs: int) -> tuple[list[float], Any]:
    fn()  # one unmeasured run: both sides then read from a warm page cache
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return times, result


def _measure_case(
    api: _Api,
    plain: duckdb.DuckDBPyConnection,
    files: list[str],
    meta: dict[str, Any],
    case_of: tuple[str, str, str],
    runs: int,
    with_plain: bool,
) -> dict[str, Any]:
    """One case: the API's first page, and (with_plain) the plain DuckDB query beside it."""
    name, word, flt = case_of
    params, where, bound = _case(meta, word, flt)

    def via_api() -> int:
        status, body = api.get("/v1/search", params)
        if status != 200:
            raise RuntimeError(f"/v1/search {params}: {status} {body[:300]!r}")
        return len(json.loads(body)["posts"])

    sql = (
        f"SELECT {PLAIN_COLUMNS} FROM read_parquet($files) "
        f"WHERE text ILIKE $pattern{where} ORDER BY time_us DESC LIMIT 50"
    )
    plain_params = {"files": files, "pattern": f"%{word}%", **bound}

    def via_duckdb() -> int:
        return len(plain.execute(sql, plain_params).fetchall())

    api_times, api_rows = _timed(via_api, runs)
    case = {
        "api_median_s": round(median(api_times), 4),
        "api_p95_s": round(p95(api_times), 4),
        "api_rows": api_rows,
    }
    line = (
        f"{name:>6} {flt:>7}: API median {case['api_median_s']:.3f} s "
        f"(p95 {case['api_p95_s']:.3f}, {api_rows} rows)"
    )
    if with_plain:
        plain_times, plain_rows = _timed(via_duckdb, runs)
        case.update(
            plain_median_s=round(median(plain_times), 4),
            plain_p95_s=round(p95(plain_times), 4),
            plain_rows=plain_rows,
            api_over_plain=round(case["api_median_s"] / max(median(plain_times), 1e-6), 3),
        )
        line += (
            f"   plain DuckDB median {case['plain_median_s']:.3f} s (p95 "
            f"{case['plain_p95_s']:.3f}, {plain_rows} rows)   ratio {case['api_over_plain']}"
        )
    print(line, flush=True)
    return case


def _measure_export(api: _Api, fmt: str, runs: int, out: dict[str, Any]) -> None:
    """An export of 1000 rows of the common word in `fmt`, its times and size into `out`."""
    export_params = {"q": COMMON_WORD, "format": fmt, "limit": "1000"}

    def export() -> int:
        status, body = api.get("/v1/export", export_params)
        if status != 200:
            raise RuntimeError(f"/v1/export {export_params}: {status}")
        return len(body)

    times, size = _timed(export, runs)
    out[f"export_{fmt}_1000_median_s"] = round(median(times), 4)
    out[f"export_{fmt}_1000_p95_s"] = round(p95(times), 4)
    out[f"export_{fmt}_1000_bytes"] = size
    print(f"export {fmt:>7}: 1000 rows in {median(times):.3f} s median, {size:,} bytes")


def measure(
    store: Path,
    meta: dict[str, Any],
    runs: int,
    threads: int,
    text_index: bool = True,
    filters: tuple[str, ...] = FILTERS,
    with_plain: bool = True,
) -> dict[str, Any]:
    """Every case through the API and as the plain DuckDB query; exports in each format.

    Cases: each probe word with each filter, and "the" in Japanese posts (a word common in the
    store, in a language whose posts never hold it)."""
    import duckdb

    manifest = read_manifest(store)
    files = [str(store / p) for p in manifest.table_files("posts")]
    plain = duckdb.connect(config={"threads": threads})
    api = _Api(store, threads, store.parent, text_index)
    print(
        f"API ready in {api.ready_s:.1f} s (file statistics and visibility index loaded)",
        flush=True,
    )
    out: dict[str, Any] = {"posts": meta["posts"], "runs": runs, "cases": {}}
    try:
        cases = [(name, word, flt) for name, word in PROBES.items() for flt in filters]
        if "lang" in filters:
            cases.append(("the", "the", "lang_ja"))
        for case_of in cases:
            out["cases"][f"{case_of[0]}_{case_of[2]}"] = _measure_case(
                api, plain, files, meta, case_of, runs, with_plain
            )
        for fmt in ("csv", "jsonl", "parquet"):
            _measure_export(api, fmt, runs, out)
    finally:
        api.stop()
        plain.close()
    cases_out = out["cases"]
    for name in PROBES:
        if f"{name}_none" in cases_out:
            out[f"{name}_first_page_median_s"] = cases_out[f"{name}_none"]["api_median_s"]
        if with_plain and f"{name}_none" in cases_out:
            out[f"plain_duckdb_{name}_median_s"] = cases_out[f"{name}_none"]["plain_median_s"]
    out["slowest_case_median_s"] = max(c["api_median_s"] for c in cases_out.values())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=Path,
        default=Path("var/bench-query-store"),
        help="directory of the cached store (built on first use)",
    )
    parser.add_argument("--posts", type=int, default=25_000_000, help="posts in the store")
    parser.add_argument("--days", type=int, default=30, help="days the posts span")
    # the defaults are what `appliance compact` leaves for a closed day
    parser.add_argument("--files-per-day", type=int, default=1, help="Parquet files per day")
    parser.add_argument(
        "--row-group-size",
        type=int,
        default=compact.POSTS_ROW_GROUP_ROWS,
        help="rows per row group of the posts files",
    )
    parser.add_argument("--zstd-level", type=int, default=9, help="zstd level of the files")
    parser.add_argument("--build-only", action="store_true", help="build the store and stop")
    parser.add_argument(
        "--reindex-from",
        type=Path,
        metavar="DIR",
        help="make --store a hard-linked copy of the store in DIR with token indexes of the "
        "current format, its posts files rewritten if --row-group-size differs from DIR's "
        "(then measure it unless --build-only)",
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads, API and plain")
    parser.add_argument(
        "--filters",
        default=",".join(FILTERS),
        help=f"filters of the cases, comma-separated (of {', '.join(FILTERS)})",
    )
    parser.add_argument(
        "--no-plain", action="store_true", help="time the API only, not the plain DuckDB query"
    )
    parser.add_argument(
        "--no-text-index",
        action="store_true",
        help="run the API with APPLIANCE_QUERY_TEXT_INDEX=false (to compare)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = StoreSpec(
        args.posts, args.days, args.files_per_day, args.row_group_size, args.zstd_level
    )
    if args.reindex_from is not None:
        meta = reindex_store(args.reindex_from, args.store, args.row_group_size)
    else:
        meta = build_store(args.store, spec)
    if args.build_only:
        return {"posts": meta["posts"], "build_s": meta["build_s"]}
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} (2 shared cores: figures vary)", flush=True)
    filters = tuple(f for f in args.filters.split(",") if f)
    unknown = [f for f in filters if f not in FILTERS]
    if unknown:
        raise SystemExit(f"--filters: unknown {', '.join(unknown)} (of {', '.join(FILTERS)})")
    figures = measure(
        args.store,
        meta,
        max(args.runs, 5),
        args.threads,
        text_index=not args.no_text_index,
        filters=filters,
        with_plain=not args.no_plain,
    )
    figures["text_index"] = not args.no_text_index
    figures["load_average_before"] = round(load[0], 2)
    figures["load_average_after"] = round(os.getloadavg()[0], 2)
    figures["probe_counts"] = meta["probe_counts"]
    days = meta.get("index_days", [])
    if days:
        figures["index_build_s_per_day_median"] = median([d["seconds"] for d in days])
        figures["index_build_s_total"] = round(sum(d["seconds"] for d in days), 1)
        figures["index_bytes_total"] = sum(d["index_bytes"] for d in days)
        figures["posts_data_bytes_total"] = sum(d["data_bytes"] for d in days)
        figures["index_over_data"] = round(
            figures["index_bytes_total"] / figures["posts_data_bytes_total"], 4
        )
        figures["index_days"] = days
    figures["store_layout"] = meta["spec"]
    return figures
