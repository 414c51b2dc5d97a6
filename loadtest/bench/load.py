"""Load benchmark: a seeded mixed workload at given concurrencies against a real `appliance serve`.

Runs over the month store that `loadtest bench query --store DIR` builds (25M posts over 30 days
by default). The workload is a fixed, seeded list of requests, the same for every run: searches
for a common word, a rare word, a phrase, an absent word and "the", some with a 1-day or 7-day
range, a language, an author, a mention, a hashtag or a link domain, some asking for page 2-5 or
sorted oldest first; exports; and cursor walks (a first page, then the returned cursor for the
next pages). N client threads (keep-alive connections) take requests from the list until it is
done. Each run prints throughput, latency percentiles, errors by status, the server's CPU per
request, and the slowest requests; the same runs with the result cache off and on.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from loadtest.bench import median
from loadtest.bench.query import ABSENT_WORD, COMMON_WORD, PHRASE, RARE_WORD, _Api

LANGS = ["en", "ja", "pt", "de", "fr", "es"]
TAGS = ["art", "news", "photography", "bluesky", "gaming", "science"]
DOMAINS = ["youtube.com", "nytimes.com", "example.org", "bsky.app", "github.com"]
# q values and their shares of the searches ("" = no text, a filter alone)
WORDS = [
    (COMMON_WORD, 0.30),
    (RARE_WORD, 0.15),
    (f'"{PHRASE}"', 0.15),
    ("the", 0.15),
    (ABSENT_WORD, 0.05),
    (f"{COMMON_WORD} -the", 0.05),
    ("", 0.15),
]


@dataclass
class Request:
    """One step of the workload: a search, an export, or a cursor walk of `pages` pages."""

    kind: str  # search | export | walk
    params: dict[str, str]
    pages: int = 1

    def label(self) -> str:
        return f"{self.kind} " + "&".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0 when the connection failed
    seconds: float
    label: str
    retry_after: str | None = None


@dataclass
class Run:
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0


def _handle(rng: random.Random, authors: int) -> str:
    """A handle of the store (user<rank>): ranks log-uniform from the 10th most active author
    (a few thousand posts a day) to the quiet ones (a few posts a month)."""
    rank = min(int(10 ** rng.uniform(1, 5)), authors - 1)
    return f"user{rank}.bsky.social"


def workload(meta: dict[str, Any], n: int, seed: int) -> list[Request]:
    """n requests (a walk counts its pages), the same list for the same store and seed."""
    rng = random.Random(seed)
    first = datetime.fromisoformat(meta["first_day"])
    days = (datetime.fromisoformat(meta["last_day"]) - first).days + 1
    authors = max(1000, int(meta["posts"]) // 50)
    words, weights = zip(*WORDS, strict=True)
    out: list[Request] = []
    count = 0
    while count < n:
        params: dict[str, str] = {}
        roll = rng.random()
        if roll < 0.40:
            day = first + timedelta(days=rng.randrange(days))
            params.update(since=f"{day:%Y-%m-%d}", until=f"{day + timedelta(days=1):%Y-%m-%d}")
        elif roll < 0.60:
            start = first + timedelta(days=rng.randrange(max(days - 6, 1)))
            until = start + timedelta(days=7)
            params.update(since=f"{start:%Y-%m-%d}", until=f"{until:%Y-%m-%d}")
        roll = rng.random()
        if roll < 0.12:
            params["lang"] = rng.choice(LANGS)
        elif roll < 0.24:
            params["author"] = _handle(rng, authors)
        elif roll < 0.30:
            params["mention"] = _handle(rng, authors)
        elif roll < 0.36:
            params["tag"] = rng.choice(TAGS)
        elif roll < 0.42:
            params["domain"] = rng.choice(DOMAINS)
        q = rng.choices(words, weights)[0]
        if q:  # without one: the newest posts of a day, a language, an author, ...
            params["q"] = q
        if rng.random() < 0.1:
            params["sort"] = "oldest"
        roll = rng.random()
        if roll < 0.05:
            params.update(format=rng.choice(["csv", "jsonl", "parquet"]), limit="1000")
            out.append(Request("export", params))
            count += 1
        elif roll < 0.15:
            pages = min(rng.randint(2, 4), n - count)
            out.append(Request("walk", params, pages))
            count += pages
        else:
            if rng.random() < 0.3:
                params["page"] = str(rng.randint(2, 5))
            if rng.random() < 0.2:
                params["limit"] = rng.choice(["25", "100"])
            out.append(Request("search", params))
            count += 1
    return out


class _Client:
    """One keep-alive HTTP connection; reconnects after a failure."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str, params: dict[str, str]) -> tuple[int, bytes, str | None]:
        url = f"{path}?{urllib.parse.urlencode(params)}"
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", url)
                response = self.conn.getresponse()
                body = response.read()
                return response.status, body, response.getheader("Retry-After")
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:  # a kept-alive connection the server closed: one retry, then give up
                    return 0, b"", None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _perform(client: _Client, req: Request) -> list[Outcome]:
    """The outcomes of one workload step (a walk gives one per page it fetched)."""
    if req.kind == "export":
        began = time.perf_counter()
        status, _, retry = client.get("/v1/export", req.params)
        return [Outcome("export", status, time.perf_counter() - began, req.label(), retry)]
    outcomes: list[Outcome] = []
    params = dict(req.params)
    for page in range(req.pages):
        began = time.perf_counter()
        status, body, retry = client.get("/v1/search", params)
        kind = "search" if req.kind == "search" else ("walk-first" if page == 0 else "walk-next")
        outcomes.append(Outcome(kind, status, time.perf_counter() - began, req.label(), retry))
        if status != 200:
            break
        token = json.loads(body).get("cursor")
        if not token:
            break
        params = {**req.params, "cursor": token}
    return outcomes


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_load(api: _Api, requests: list[Request], clients: int, timeout: float) -> Run:
    """Run the whole list with `clients` threads; the server's CPU is read around the run."""
    parsed = urllib.parse.urlsplit(api.base)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    todo = iter(requests)
    lock = threading.Lock()
    result = Run(clients)

    def client_loop() -> None:
        client = _Client(host, port, timeout)
        try:
            while True:
                with lock:
                    req = next(todo, None)
                if req is None:
                    return
                outcomes = _perform(client, req)
                with lock:
                    result.outcomes.extend(outcomes)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, name=f"client-{i}") for i in range(clients)]
    result.load_before = os.getloadavg()[0]
    cpu_before = _tree_cpu_s(api.proc.pid)
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - began
    result.server_cpu_s = _tree_cpu_s(api.proc.pid) - cpu_before
    result.load_after = os.getloadavg()[0]
    return result


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(run: Run, worst: int = 5) -> dict[str, Any]:
    """The figures of one run: rates, percentiles (all and per kind), errors, CPU, worst."""
    times = sorted(o.seconds for o in run.outcomes)
    n = len(run.outcomes)
    statuses: dict[str, int] = {}
    for o in run.outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    searches = [o for o in run.outcomes if o.kind != "export"]
    per_kind = {}
    for kind in sorted({o.kind for o in run.outcomes}):
        ks = sorted(o.seconds for o in run.outcomes if o.kind == kind)
        per_kind[kind] = {
            "n": len(ks),
            "p50_s": round(_pct(ks, 0.5), 3),
            "p95_s": round(_pct(ks, 0.95), 3),
        }
    slowest = sorted(run.outcomes, key=lambda o: -o.seconds)[:worst]
    return {
        "clients": run.clients,
        "requests": n,
        "wall_s": round(run.wall_s, 2),
        "requests_per_s": round(n / run.wall_s, 2) if run.wall_s else 0.0,
        "searches_per_s": round(len(searches) / run.wall_s, 2) if run.wall_s else 0.0,
        "p50_s": round(_pct(times, 0.50), 3),
        "p95_s": round(_pct(times, 0.95), 3),
        "p99_s": round(_pct(times, 0.99), 3),
        "max_s": round(times[-1], 3) if times else 0.0,
        "median_s": round(median(times), 3) if times else 0.0,
        "statuses": statuses,
        "errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "failed_connections": statuses.get("0", 0),
        "server_cpu_s": round(run.server_cpu_s, 2),
        "server_cpu_ms_per_request": round(1000 * run.server_cpu_s / n, 1) if n else 0.0,
        "per_kind": per_kind,
        "worst": [
            {"s": round(o.seconds, 3), "status": o.status, "request": o.label} for o in slowest
        ],
        "load_average_before": round(run.load_before, 2),
        "load_average_after": round(run.load_after, 2),
    }


def _print_run(cache: str, s: dict[str, Any]) -> None:
    print(
        f"cache {cache:>3} {s['clients']:>3} clients: {s['requests']} requests in "
        f"{s['wall_s']:.1f} s = {s['searches_per_s']:.1f} searches/s "
        f"({s['requests_per_s']:.1f} requests/s); p50 {s['p50_s']:.3f} p95 {s['p95_s']:.3f} "
        f"p99 {s['p99_s']:.3f} max {s['max_s']:.3f} s; statuses {s['statuses']}; server CPU "
        f"{s['server_cpu_ms_per_request']:.0f} ms/request; load {s['load_average_before']:.2f}"
        f" -> {s['load_average_after']:.2f}",
        flush=True,
    )
    for kind, k in s["per_kind"].items():
        print(f"    {kind:>10}: n {k['n']:>4}  p50 {k['p50_s']:.3f}  p95 {k['p95_s']:.3f}")
    for w in s["worst"]:
        print(f"    slow: {w['s']:.3f} s  {w['status']}  {w['request']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=Path,
        default=Path("var/bench-query-store"),
        help="a store built by `loadtest bench query --store DIR` (--build-only builds it alone)",
    )
    parser.add_argument(
        "--clients", default="1,5,20,50", help="concurrencies to run, comma-separated"
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--seed", type=int, default=17, help="seed of the workload")
    parser.add_argument(
        "--cache", choices=["off", "on", "both"], default="both", help="result cache off, on, both"
    )
    parser.add_argument("--workers", type=int, help="API worker processes (default: settings)")
    parser.add_argument("--threads", type=int, help="DuckDB threads (default: settings)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="client timeout per request, seconds"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an APPLIANCE_* setting for the server (repeatable), e.g. APPLIANCE_API_WORKERS=2",
    )


def _server_environ(pairs: list[str]) -> dict[str, str]:
    """The server's APPLIANCE_* settings: this environment's, then --set (validated by the
    server's own settings loader when it starts)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("APPLIANCE_")}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("APPLIANCE_"):
            raise SystemExit(f"--set {pair!r}: expected APPLIANCE_NAME=VALUE")
        env[name] = value
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.config import load_settings

    meta_path = args.store / "bench.json"
    if not meta_path.exists():
        raise SystemExit(
            f"no store in {args.store}: build it with `loadtest bench query --store "
            f"{args.store} --build-only`"
        )
    meta = json.loads(meta_path.read_text())
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1:
        raise SystemExit("--clients: positive integers, comma-separated")
    environ = _server_environ(args.set)
    base = load_settings(environ=environ)
    requests = workload(meta, args.requests, args.seed)
    kinds = {k: sum(1 for r in requests if r.kind == k) for k in ("search", "export", "walk")}
    print(f"workload: {len(requests)} steps {kinds}, seed {args.seed}", flush=True)
    modes = ["off", "on"] if args.cache == "both" else [args.cache]
    figures: dict[str, Any] = {"posts": meta["posts"], "seed": args.seed, "runs": {}}
    for cache in modes:
        entries = 0 if cache == "off" else (base.cache_entries or 256)
        for n in clients:
            # a fresh server per run: the cache and DuckDB's state start empty each time
            api = _Api(
                args.store,
                args.threads or base.duckdb_threads,
                args.store.parent,
                environ=environ,
                api_workers=args.workers or base.api_workers,
                cache_entries=entries,
                query_timeout_s=base.query_timeout_s,
                query_text_index=base.query_text_index,
            )
            try:
                settings = api.settings
                summary = summarize(run_load(api, requests, n, args.timeout))
            finally:
                api.stop()
            summary.update(
                cache_entries=entries,
                api_workers=settings.api_workers,
                duckdb_threads=settings.duckdb_threads,
                query_timeout_s=settings.query_timeout_s,
            )
            _print_run(cache, summary)
            figures["runs"][f"cache_{cache}_{n}"] = summary
    return figures
