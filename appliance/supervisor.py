"""`appliance up`: the whole stack on one machine — redis-server, ingester, batcher and API.

Each part runs as its own child process with the same settings (passed as APPLIANCE_*
variables). A child that dies is restarted with exponential backoff; Ctrl-C, SIGTERM or SIGHUP
stops them all, newest first, so the ingester and batcher flush before Redis goes away.

Every child runs in its own session, so a terminal's Ctrl-C (SIGINT to the whole foreground
process group) reaches `appliance up` alone, which turns it into one SIGTERM per child, in order.
Children that shared the terminal's group would get the SIGINT too and then our SIGTERM: Sanic's
worker manager answers such a second signal by SIGKILLing its whole process group, and Redis
would be cut mid-save.

With `--replay` the local Jetstream-protocol replay server stands in for the public Jetstream
where there is no internet. The replay server is not part of the runtime: it is the `loadtest`
package's `serve` command, started as one more child process (`python -m loadtest serve`), and
nothing in `appliance` imports it. `loadtest` ships in the same distribution; an installation
without it gets a clear error from `--replay` and runs everything else as before.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import redis

from appliance.config import Settings, to_environ
from appliance.logs import setup_logging
from appliance.redis_server import start_redis

log = logging.getLogger("appliance.up")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long gets its backoff reset
REPLAY_PACKAGE = "loadtest"  # provides the replay server (`python -m loadtest serve`)
OWNER_KEY = "appliance:owner"  # which data dir and source the Redis state belongs to
NO_SOURCE_HINT_AFTER_S = 30.0  # without --replay: say so if Jetstream is unreachable this long


class SetupError(Exception):
    """`appliance up` cannot start as asked (exit 2 with the message)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replay",
        nargs="*",
        metavar="FILE",
        default=None,
        help="use the local replay server instead of the public Jetstream: synthetic events, "
        "or the given capture files (JSONL, plain or .zst)",
    )
    parser.add_argument(
        "--replay-speed",
        default="10",
        help="replay pacing: a factor of real time, or 'max' (default 10)",
    )
    parser.add_argument(
        "--replay-events",
        type=int,
        default=8_100_000,
        help="synthetic events in the replay (default one day: 8.1M)",
    )
    parser.add_argument("--replay-port", type=int, default=0, help="replay server port (0: free)")
    parser.add_argument("--data-dir", dest="set_data_dir", help="root of the Parquet datasets")
    parser.add_argument(
        "--redis-dir", dest="set_redis_dir", help="Redis state (AOF) for this data dir and source"
    )
    parser.add_argument(
        "--hint-after",
        type=float,
        default=NO_SOURCE_HINT_AFTER_S,
        metavar="S",
        help="without --replay: say so when Jetstream is still unreachable after S seconds "
        f"(default {NO_SOURCE_HINT_AFTER_S:g})",
    )
    parser.add_argument("--api-port", dest="set_api_port", type=int, help="API port")
    parser.add_argument(
        "--batch-interval", dest="set_batch_interval_s", type=float, help="seconds between flushes"
    )


@dataclass
class Child:
    """One supervised process and how to (re)start it."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = field(default=0)
    # Answers once the child can take SIGTERM safely (see _stop_all); None: at any time.
    ready: Callable[[], bool] | None = None
    leads_group: bool = False  # started in its own session: its leftovers can be swept

    def launch(self) -> None:
        self.proc = self.start()
        self.started_at = time.monotonic()
        self.restart_at = None
        try:
            self.leads_group = os.getpgid(self.proc.pid) == self.proc.pid
        except ProcessLookupError:  # already gone; _supervise restarts it
            self.leads_group = False


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. Probed the way the servers bind (with
    SO_REUSEADDR), so sockets in TIME-WAIT after a stop do not count as in use."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, timeout_s: float) -> None:
    """Read the child's stdout until a line containing `marker` (its readiness signal)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"replay server exited with {proc.wait()} before it was ready")
        sys.stdout.buffer.write(line)
        if marker in line:
            return
    raise TimeoutError("replay server did not become ready in time")


def _copy_output(proc: subprocess.Popen[bytes]) -> None:
    """Keep forwarding a child's stdout after its readiness line (a closed pipe would kill it)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


def _service(name: str, env: dict[str, str]) -> Callable[[], subprocess.Popen[bytes]]:
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", name],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    return start


def _check_ports(settings: Settings) -> None:
    for what, host, port in (
        ("APPLIANCE_REDIS_PORT", settings.redis_host, settings.redis_port),
        ("APPLIANCE_API_PORT (--api-port)", settings.api_host, settings.api_port),
        ("APPLIANCE_INGEST_PORT", "127.0.0.1", settings.ingest_port),
        ("APPLIANCE_BATCH_PORT", "127.0.0.1", settings.batch_port),
        ("APPLIANCE_IDENTITY_PORT", settings.identity_host, settings.identity_port),
    ):
        if port and not _port_free(host, port):
            raise SetupError(f"port {port} on {host} is in use; set {what}")


def source_of(args: argparse.Namespace, settings: Settings) -> str:
    """The event source of a run, as the Redis state records it (its cursor is in its times)."""
    if args.replay is None:
        return "jetstream " + ",".join(settings.jetstream_urls)
    if not args.replay:
        return "replay synthetic seed=1"
    return "replay files " + ",".join(str(Path(p).resolve()) for p in args.replay)


def claim_redis_state(settings: Settings, source: str) -> None:
    """Make sure the Redis state belongs to this data dir and source, or refuse.

    Redis holds the ingester's cursor (in the source's time) and events not yet batched into a
    data dir. Resuming another source from that cursor skips its older events; batching another
    run's entries puts them into the wrong data dir. State with nothing at stake (no cursor, an
    empty stream: e.g. a run that never reached Jetstream) is simply taken over.
    """
    owner = {"data_dir": str(Path(settings.data_dir).resolve()), "source": source}
    client = redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_password
    )
    try:
        raw = client.get(OWNER_KEY)
        if raw is not None:
            before = json.loads(raw)
            at_stake = client.exists(settings.cursor_key) or client.xlen(settings.stream_key)
            if before != owner and at_stake:
                raise SetupError(_not_ours(settings, before, client.xlen(settings.stream_key)))
        client.set(OWNER_KEY, json.dumps(owner))
    finally:
        client.close()


def _not_ours(settings: Settings, before: dict[str, str], pending: int) -> str:
    redis_dir = Path(settings.redis_dir).resolve()
    return (
        f"the Redis state in {redis_dir} belongs to another run: data dir "
        f"{before.get('data_dir')}, source {before.get('source')}. It holds that run's cursor "
        f"and {pending} stream entries not yet batched. To continue that run, start it the same "
        "way (same --data-dir and source); to run this one beside it, give it its own Redis "
        "state with --redis-dir DIR (APPLIANCE_REDIS_DIR); to start afresh, delete "
        f"{redis_dir} (the entries not yet batched are lost)"
    )


def replay_command(args: argparse.Namespace, port: int) -> list[str]:
    """The replay server's command line for `--replay [FILE...]`."""
    if importlib.util.find_spec(REPLAY_PACKAGE) is None:
        raise SetupError(
            f"--replay needs the replay server of the {REPLAY_PACKAGE!r} package, which is not "
            "installed here (it ships with this project's source and package: pip install "
            "bluesky-appliance, or run from a checkout)"
        )
    cmd = [sys.executable, "-m", REPLAY_PACKAGE, "serve", "--port", str(port)]
    cmd += ["--speed", args.replay_speed]
    if not args.replay:
        return [*cmd, "--events", str(args.replay_events), "--seed", "1"]
    for path in args.replay:
        if not Path(path).is_file():
            raise SetupError(f"replay file {path} not found")
    return [*cmd, "--from", *args.replay]


def _children(settings: Settings, replay_cmd: list[str] | None) -> list[Child]:
    env = {**os.environ, **to_environ(settings)}

    def start_redis_child() -> subprocess.Popen[bytes]:
        return start_redis(settings)

    def start_replay() -> subprocess.Popen[bytes]:
        assert replay_cmd is not None
        proc = subprocess.Popen(
            replay_cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        _wait_for_line(proc, b"listening", 120)
        threading.Thread(target=_copy_output, args=(proc,), daemon=True).start()
        return proc

    children = [Child("redis-server", start_redis_child)]
    if replay_cmd is not None:
        children.append(Child("replay-server", start_replay))
    return [
        *children,
        Child("ingester", _service("ingest", env)),
        Child("batcher", _service("batch", env)),
        Child("api", _service("serve", env), ready=_answers(_health_url(settings))),
        Child("identity", _service("identity", env)),
    ]


def _health_url(settings: Settings) -> str:
    host = settings.api_host if settings.api_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.api_port}/health"


def _answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, ValueError):
            return False

    return check


def _banner(settings: Settings, args: argparse.Namespace) -> str:
    source = (
        f"replay server ({'files: ' + ', '.join(args.replay) if args.replay else 'synthetic'})"
        if args.replay is not None
        else "public Jetstream " + ", ".join(settings.jetstream_urls)
    )
    api = f"http://{settings.api_host}:{settings.api_port}"
    return (
        "appliance up: starting redis-server, ingester, batcher, API and identity worker\n"
        f"  source   {source}\n"
        f"  data     {Path(settings.data_dir).resolve()}  (batches every {settings.batch_interval_s:g} s)\n"
        f"  redis    {settings.redis_host}:{settings.redis_port}  (AOF in {Path(settings.redis_dir).resolve()})\n"
        f"  API      {api}/v1/search?q=hello   docs {api}/docs\n"
        f"  metrics  ingester :{settings.ingest_port}/metrics  batcher :{settings.batch_port}/metrics  API {api}/metrics  identity :{settings.identity_port}/metrics\n"
        "Ctrl-C stops everything (newest first; the ingester and batcher flush before Redis)."
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    setup_logging(settings.log_level, settings.log_format)
    if not settings.redis_password:
        # A fresh password each run: redis.conf is rendered anew, the children get it by env.
        settings = msgspec.structs.replace(settings, redis_password=secrets.token_hex(24))
    replay_cmd: list[str] | None = None
    try:
        _check_ports(settings)
        if args.replay is not None:
            replay_port = args.replay_port or _free_port()
            replay_cmd = replay_command(args, replay_port)
            settings = msgspec.structs.replace(
                settings, jetstream_urls=(f"ws://127.0.0.1:{replay_port}/subscribe",)
            )
    except SetupError as exc:
        print(f"appliance up: {exc}", file=sys.stderr)
        return 2
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    children = _children(settings, replay_cmd)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    print(_banner(settings, args), flush=True)
    source = source_of(args, settings)
    hint_after = getattr(args, "hint_after", NO_SOURCE_HINT_AFTER_S)
    hint_at = None if args.replay is not None else time.monotonic() + hint_after
    refused: SetupError | None = None
    try:
        for child in children:
            if stopping:
                break
            child.launch()
            log.info("started", extra={"child": child.name, "pid": child.proc and child.proc.pid})
            if child.name == "redis-server":
                claim_redis_state(settings, source)
        while not stopping:
            _supervise(children)
            if hint_at is not None and time.monotonic() >= hint_at:
                hint_at = None
                _hint_if_unreachable(settings, hint_after)
            time.sleep(0.2)
    except SetupError as exc:
        refused = exc
    finally:
        _stop_all(children)
    if refused is not None:
        print(f"appliance up: {refused}", file=sys.stderr)
        return 2
    print("appliance up: stopped", flush=True)
    return 0


def _hint_if_unreachable(settings: Settings, after_s: float) -> None:
    """Say it when the public Jetstream has not been reached (no internet?), and what to try."""
    url = f"http://{settings.ingest_host}:{settings.ingest_port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            connected = json.loads(resp.read()).get("websocket")
    except urllib.error.HTTPError as exc:  # 503: not ready; the body says which part
        connected = json.loads(exc.read() or b"{}").get("websocket")
    except (OSError, ValueError):
        return  # the ingester is (re)starting; its own log says why
    if connected is False:
        log.warning(
            "the ingester has not reached the public Jetstream in %g s (no internet, or a "
            "firewall?); it keeps retrying every URL with backoff. To see the appliance work "
            "without internet, stop it (Ctrl-C) and replay a synthetic firehose instead: "
            "make run ARGS=--replay  (or: appliance up --replay)",
            after_s,
        )


def _supervise(children: list[Child]) -> None:
    """Restart children that exited, each with its own exponential backoff."""
    now = time.monotonic()
    for child in children:
        if child.proc is None:
            continue
        code = child.proc.poll()
        if code is None:
            if now - child.started_at > STABLE_AFTER_S:
                child.backoff_s = BACKOFF_START_S
            continue
        if child.restart_at is None:
            child.restart_at = now + child.backoff_s
            log.warning(
                "child exited; restarting",
                extra={"child": child.name, "code": code, "in_s": child.backoff_s},
            )
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
        elif now >= child.restart_at:
            try:
                child.launch()
                child.restarts += 1
                log.info("restarted", extra={"child": child.name, "restarts": child.restarts})
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("restart failed", extra={"child": child.name, "error": str(exc)})
                child.restart_at = now + child.backoff_s


def _stop_all(children: list[Child], timeout_s: float = 20.0) -> None:
    """SIGTERM newest first and wait for each, so writers flush before Redis stops."""
    for child in reversed(children):
        proc = child.proc
        if proc is None or proc.poll() is not None:
            continue
        if child.ready is not None:
            _wait_ready(child, timeout_s)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("child ignored SIGTERM; killing", extra={"child": child.name})
            proc.kill()
            code = proc.wait()
        if child.leads_group:
            # Whatever it left behind (a worker whose parent was killed) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.info("stopped", extra={"child": child.name, "code": code})


def _wait_ready(child: Child, timeout_s: float) -> None:
    """Wait until a starting child can take SIGTERM. Sanic's worker manager loses a SIGTERM
    that arrives while it starts its workers (it then waits for them forever), so the API is
    stopped only once it answers, or has exited, or after the timeout."""
    assert child.proc is not None and child.ready is not None
    deadline = time.monotonic() + timeout_s
    while child.proc.poll() is None and time.monotonic() < deadline:
        if child.ready():
            return
        time.sleep(0.1)
