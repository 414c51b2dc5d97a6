"""The stack a replay runs against: redis-server, the replay server, ingester, batcher and API,
each its own process (as `appliance up` starts them) on free loopback ports, each in its own
session, with its log in the work directory. Stopped by PID, newest first; a process can be
killed -9 and started again (the faults), and one that dies on its own is restarted and counted.
"""

from __future__ import annotations

import os
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

import redis

from appliance.config import Settings, to_environ
from appliance.redis_server import start_redis

# Start order; stopped in reverse, so the ingester and batcher flush before Redis goes away.
ORDER = ("redis", "server", "ingester", "batcher", "api")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _children_of() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def tree_usage(pid: int, children: dict[int, list[int]]) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process and its descendants (Sanic's workers are children)."""
    rss, cpu = 0, 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime is field 14, stime 15, rss 24
        cpu += (int(fields[11]) + int(fields[12])) / _TICKS
        rss += int(fields[21]) * _PAGE
        todo += children.get(p, [])
    return rss, cpu


@dataclass
class Proc:
    """One process of the stack and how to start it again."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0  # by the faults
    unexpected_exits: list[int] = field(default_factory=list)  # exit codes of deaths on its own
    cpu_done_s: float = 0.0  # CPU of earlier incarnations
    cpu_now_s: float = 0.0
    peak_rss: int = 0
    rss: int = 0
    stopped: bool = False  # on purpose: not restarted

    def launch(self) -> None:
        self.popen = self.start()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def cpu_s(self) -> float:
        return self.cpu_done_s + self.cpu_now_s

    def retire(self) -> None:
        """Book the CPU of an incarnation that is gone."""
        self.cpu_done_s += self.cpu_now_s
        self.cpu_now_s = 0.0


class Stack:
    """The processes of one replay; `settings` names their ports and directories."""

    def __init__(self, settings: Settings, work: Path, server_args: list[str]) -> None:
        self.settings = settings
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server_port = free_port()
        self.server_args = server_args
        self.lock = threading.Lock()  # a fault's kill and restart vs the supervisor's restarts
        env = {**os.environ, **to_environ(settings), "APPLIANCE_LOG_FORMAT": "json"}
        self.env = env
        self.procs: dict[str, Proc] = {
            "redis": Proc("redis", lambda: start_redis(settings)),
            "server": Proc("server", self._start_server),
            "ingester": Proc("ingester", self._service("ingest")),
            "batcher": Proc("batcher", self._service("batch")),
            "api": Proc("api", self._service("serve")),
        }

    @property
    def server_url(self) -> str:
        return f"ws://127.0.0.1:{self.server_port}/subscribe"

    def url(self, name: str, path: str) -> str:
        port = {
            "ingester": self.settings.ingest_port,
            "batcher": self.settings.batch_port,
            "api": self.settings.api_port,
        }[name]
        return f"http://127.0.0.1:{port}{path}"

    def redis(self) -> redis.Redis:
        s = self.settings
        return redis.Redis(
            host=s.redis_host, port=s.redis_port, password=s.redis_password, socket_timeout=10
        )

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop them
            )

    def _service(self, command: str) -> Callable[[], subprocess.Popen[bytes]]:
        name = {"ingest": "ingester", "batch": "batcher", "serve": "api"}[command]
        return lambda: self._popen(name, [sys.executable, "-m", "appliance", command])

    def _start_server(self) -> subprocess.Popen[bytes]:
        log = self.logs / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        argv = [sys.executable, "-m", "loadtest", "serve", "--port", str(self.server_port)]
        proc = self._popen("server", [*argv, *self.server_args])
        deadline = time.monotonic() + 120
        while b"listening" not in log.read_bytes()[offset:]:
            if proc.poll() is not None:
                raise RuntimeError(f"the replay server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replay server did not listen in 120 s; see {log}")
            time.sleep(0.05)
        return proc

    def start(self) -> None:
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        for name in ORDER:
            if name in self.procs:  # the direct path has no server or ingester
                self.procs[name].launch()
        self.wait_ready("api", 120)

    def wait_ready(self, name: str, timeout_s: float) -> float:
        """Seconds until the service's /ready answers 200."""
        began = time.monotonic()
        while True:
            try:
                if http_get(self.url(name, "/ready"), timeout=2)[0] == 200:
                    return time.monotonic() - began
            except OSError:
                pass
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"{name} was not ready within {timeout_s:g} s")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """kill -9 (its whole session: the API's workers too) and wait for it."""
        proc = self.procs[name]
        assert proc.popen is not None
        pid = proc.popen.pid
        try:
            if os.getpgid(pid) == pid:  # its own session (not redis-server, started in ours)
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait(30)
        proc.retire()

    def restart(self, name: str) -> None:
        self.procs[name].launch()
        self.procs[name].restarts += 1

    def supervise(self) -> list[str]:
        """Restart a process that died on its own; return the names restarted."""
        restarted = []
        for proc in self.procs.values():
            if proc.stopped or proc.popen is None or proc.popen.poll() is None:
                continue
            proc.unexpected_exits.append(proc.popen.returncode)
            proc.retire()
            proc.launch()
            restarted.append(proc.name)
        return restarted

    def sample_usage(self) -> dict[str, tuple[int, float]]:
        """Per process: (RSS bytes, CPU seconds so far over all its incarnations)."""
        children = _children_of()
        out = {}
        for proc in self.procs.values():
            if proc.popen is None or proc.popen.poll() is not None:
                out[proc.name] = (0, proc.cpu_s)
                continue
            rss, cpu = tree_usage(proc.popen.pid, children)
            proc.rss, proc.cpu_now_s = rss, cpu
            proc.peak_rss = max(proc.peak_rss, rss)
            out[proc.name] = (rss, proc.cpu_s)
        return out

    def stop_one(self, name: str, timeout_s: float = 60.0) -> None:
        """SIGTERM and wait (SIGKILL if it ignores it); it stays stopped."""
        proc = self.procs.get(name)
        if proc is None or proc.popen is None:
            return
        self.sample_usage()
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(10)
        proc.retire()
        proc.stopped = True

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM newest first, waiting for each, so writers flush before Redis stops."""
        for name in reversed(ORDER):
            if name in self.procs:
                self.stop_one(name, timeout_s)
