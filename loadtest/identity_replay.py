"""`loadtest identity-replay`: how fast authors get their handles in a replay.

Runs `appliance up --replay` (synthetic firehose, paced at max) with its identity worker pointed
at the loopback fakes of the PLC directory and the handles' hosts (`loadtest.identity_fakes`, in
`auto` mode: every did:plc has a handle that verifies over HTTPS; the DNS fake answers NXDOMAIN,
so each resolution is a PLC GET, a TXT query and an HTTPS GET). Every few seconds it exports
every stored post through the API (result limit off) and prints the share that carries a handle,
with the worker's figures from /v1/stats; it stops once that share reaches the target (or at the
timeout) and prints the figures as JSON on the last line: DIDs to resolve, the rate, the time the
rate allows (DIDs / rate) and the time the share took.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.bench import free_port
from loadtest.identity_fakes import DnsServer, IdentityWeb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=30_000, help="synthetic events replayed")
    parser.add_argument("--rate", type=float, default=50.0, help="APPLIANCE_IDENTITY_RATE")
    parser.add_argument("--target", type=float, default=0.99, help="share of posts to reach")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (seconds)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")


def _get(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def _sample(api: str) -> dict[str, Any]:
    """Every stored post (an export, one JSON line each) and the worker's /v1/stats line."""
    lines = _get(f"{api}/v1/export?format=jsonl").splitlines()
    posts = [json.loads(line) for line in lines if line.strip()]
    posts = [p for p in posts if "uri" in p]  # a summary line, if the export writes one
    with_handle = sum(1 for p in posts if p.get("handle"))
    verified = sum(1 for p in posts if p.get("handle") not in (None, "handle.invalid"))
    stats = json.loads(_get(f"{api}/v1/stats"))
    return {
        "posts": len(posts),
        "share": with_handle / len(posts) if posts else 0.0,
        "share_verified": verified / len(posts) if posts else 0.0,
        "authors": len({p["did"] for p in posts}),
        "identity": stats.get("identity") or {},
    }


def _environment(
    root: Path, api_port: int, web: IdentityWeb, dns: DnsServer, rate: float
) -> dict[str, str]:
    """`appliance up`'s settings: its files under `root`, free ports, the fakes of the PLC
    directory, the web and DNS, and the identity worker's rate."""
    return {
        **os.environ,
        "APPLIANCE_DATA_DIR": str(root / "data"),
        "APPLIANCE_REDIS_DIR": str(root / "redis"),
        "APPLIANCE_REDIS_PORT": str(free_port()),
        "APPLIANCE_INGEST_PORT": str(free_port()),
        "APPLIANCE_BATCH_PORT": str(free_port()),
        "APPLIANCE_IDENTITY_PORT": str(free_port()),
        "APPLIANCE_API_PORT": str(api_port),
        "APPLIANCE_RESULT_LIMIT": "false",
        "APPLIANCE_PLC_URL": web.url,
        "APPLIANCE_IDENTITY_WEB_ORIGIN": web.url,
        "APPLIANCE_IDENTITY_DNS": dns.address,
        "APPLIANCE_IDENTITY_RATE": str(rate),
        "APPLIANCE_LOG_FORMAT": "json",
    }


def _figures(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    first_posts: float | None,
    plc_requests: int,
    reached_target: bool,
) -> dict[str, Any]:
    """The run's figures, from its samples."""
    last = samples[-1] if samples else {}
    dids = (last.get("identity") or {}).get("dids") or 0
    reached = next((s["t"] for s in samples if s["share"] >= args.target), None)
    return {
        "events": args.events,
        "rate_per_s": args.rate,
        "posts": last.get("posts"),
        "authors_of_posts": last.get("authors"),
        "dids_resolved": dids,
        "plc_requests": plc_requests,
        "backfill_s_the_rate_allows": round(dids / args.rate, 1) if args.rate else None,
        "first_posts_at_s": first_posts,
        "target": args.target,
        "target_reached_at_s": reached,
        "backfill_s_taken": round(reached - first_posts, 1)
        if reached is not None and first_posts is not None
        else None,
        "final_share": last.get("share"),
        "final_share_verified": last.get("share_verified"),
        "reached": reached_target,
    }


def main(args: argparse.Namespace) -> int:
    web, dns = IdentityWeb(), DnsServer()
    web.state.auto = True
    root = Path(tempfile.mkdtemp(prefix="identity-replay-"))
    api_port = free_port()
    env = _environment(root, api_port, web, dns, args.rate)
    command = [sys.executable, "-m", "appliance", "up", "--replay", "--replay-speed", "max"]
    command += ["--replay-events", str(args.events), "--batch-interval", "5"]
    log = open(root / "up.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{api_port}"
    print(f"appliance up --replay in {root} (log: up.log), PLC fake {web.url}, rate {args.rate}/s")
    began = time.monotonic()
    first_posts: float | None = None
    samples: list[dict[str, Any]] = []
    done = threading.Event()
    try:
        while time.monotonic() - began < args.timeout and proc.poll() is None:
            time.sleep(args.every)
            try:
                sample = _sample(api)
            except OSError:
                continue  # not serving yet
            if not sample["posts"]:
                continue
            now = time.monotonic() - began
            first_posts = first_posts if first_posts is not None else now
            sample["t"] = round(now, 1)
            samples.append(sample)
            ident = sample["identity"]
            print(
                f"t={now:6.1f}s posts={sample['posts']:6d} authors={sample['authors']:5d} "
                f"with handle {sample['share']:.4f} (verified {sample['share_verified']:.4f}) "
                f"store: dids={ident.get('dids')} verified={ident.get('verified')} "
                f"queue={ident.get('queue')}",
                flush=True,
            )
            if sample["share"] >= args.target and ident.get("queue") == 0:
                done.set()
                break
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        web.close()
        dns.close()
    figures = _figures(args, samples, first_posts, len(web.plc_requests()), done.is_set())
    print(json.dumps(figures, sort_keys=True))
    return 0 if done.is_set() else 1
