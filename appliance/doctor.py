"""`appliance doctor`: check an installed appliance end to end and name what is broken.

The site deploy runs it as its last step, so a deploy that leaves a broken server fails loudly.
Each check prints one line; the exit status is 1 when any check fails. With `--wait S` the
failing checks are retried until they pass or S seconds have gone by (services just restarted
need a few seconds, Prometheus a scrape interval).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis

from appliance.config import Settings

DEFAULT_UNITS = (
    "redis-server",
    "appliance-ingest",
    "appliance-batch",
    "appliance-api",
    "appliance-identity",
)


class CheckFailed(Exception):
    """A check found something wrong; the message says what."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unit",
        action="append",
        dest="units",
        metavar="NAME",
        help=f"a systemd unit that must be active (repeatable; default {', '.join(DEFAULT_UNITS)})",
    )
    parser.add_argument(
        "--url",
        action="append",
        dest="urls",
        default=[],
        metavar="URL",
        help="a URL that must answer 200, e.g. https://localhost/ready (repeatable)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept any TLS certificate for --url (Caddy's internal CA)",
    )
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        help="Prometheus base URL whose scrape targets must all be up, e.g. http://127.0.0.1:9090",
    )
    parser.add_argument(
        "--volume",
        action="store_true",
        help="the data root must be on its own filesystem (the data volume), not the system disk",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="retry failing checks for up to S seconds (default 0: check once)",
    )


def check_units(units: list[str]) -> str:
    inactive = []
    for unit in units:
        state = subprocess.run(
            ["systemctl", "is-active", unit], capture_output=True, text=True, check=False
        ).stdout.strip()
        if state != "active":
            inactive.append(f"{unit} is {state or 'unknown'}")
    if inactive:
        raise CheckFailed("; ".join(inactive))
    return f"{len(units)} unit(s) active"


def check_redis(settings: Settings) -> str:
    def client(password: str | None) -> redis.Redis:
        return redis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            password=password,
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    try:
        with client(settings.redis_password or None) as authed:
            authed.ping()
            policy = authed.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError as exc:
        raise CheckFailed(
            f"redis at {settings.redis_host}:{settings.redis_port}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        with client(None) as anonymous:
            anonymous.ping()
    except redis.AuthenticationError:
        pass
    except redis.ResponseError as exc:
        if "NOAUTH" not in str(exc):
            raise CheckFailed(f"redis without a password: unexpected answer {exc}") from None
    else:
        raise CheckFailed("redis answers without a password")
    if policy != "noeviction":
        raise CheckFailed(f"redis maxmemory-policy is {policy}, not noeviction")
    return "redis answers with the password only, noeviction"


def check_data_root(settings: Settings, on_volume: bool) -> str:
    root = Path(settings.data_dir)
    if not root.is_dir():
        raise CheckFailed(f"data root {root} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-", suffix=".tmp") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise CheckFailed(f"data root {root} is not writable: {exc}") from None
    if on_volume and os.stat(root).st_dev == os.stat("/").st_dev:
        raise CheckFailed(f"data root {root} is on the system disk, not on the data volume")
    where = "on its own volume" if on_volume else "writable"
    return f"data root {root} {where}"


def check_url(url: str, insecure: bool) -> str:
    context = None
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise CheckFailed(f"{url} answered {exc.code}: {exc.read(300)!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CheckFailed(f"{url}: {exc}") from None
    return f"{url} answered {status}"


def check_prometheus(base: str) -> str:
    url = base.rstrip("/") + "/api/v1/targets?state=active"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CheckFailed(f"prometheus at {base}: {exc}") from None
    targets = body.get("data", {}).get("activeTargets", [])
    if not targets:
        raise CheckFailed(f"prometheus at {base} has no scrape targets")
    down = [
        f"{t['labels'].get('job')}/{t['labels'].get('instance')} {t.get('health')}"
        f" ({t.get('lastError') or 'not scraped yet'})"
        for t in targets
        if t.get("health") != "up"
    ]
    if down:
        raise CheckFailed("targets not up: " + "; ".join(down))
    return f"prometheus: all {len(targets)} targets up"


def checks(settings: Settings, args: argparse.Namespace) -> dict[str, Callable[[], str]]:
    """The checks asked for, by name, in the order they run."""
    out: dict[str, Callable[[], str]] = {
        "units": lambda: check_units(list(args.units or DEFAULT_UNITS)),
        "redis": lambda: check_redis(settings),
        "data": lambda: check_data_root(settings, args.volume),
    }
    for url in args.urls:
        out[f"url {url}"] = functools.partial(check_url, url, args.insecure)
    if args.prometheus:
        out["prometheus"] = lambda: check_prometheus(args.prometheus)
    return out


def run_checks(
    todo: dict[str, Callable[[], str]], wait_s: float, sleep: Callable[[float], None] = time.sleep
) -> dict[str, tuple[bool, str]]:
    """Run every check; retry the failing ones until they pass or `wait_s` has gone by."""
    deadline = time.monotonic() + wait_s
    results: dict[str, tuple[bool, str]] = {}
    pending = dict(todo)
    while True:
        for name, check in list(pending.items()):
            try:
                results[name] = (True, check())
                del pending[name]
            except CheckFailed as exc:
                results[name] = (False, str(exc))
        if not pending or time.monotonic() >= deadline:
            return {name: results[name] for name in todo}
        sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def main(settings: Settings, args: argparse.Namespace) -> int:
    """Print one line per check; 0 when all pass, 1 when any fails."""
    results = run_checks(checks(settings, args), args.wait)
    for name, (ok, detail) in results.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [name for name, (ok, _) in results.items() if not ok]
    if failed:
        print(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
        return 1
    print("doctor: all checks passed")
    return 0
