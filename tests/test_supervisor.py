"""`appliance up`'s supervisor on its own: restarts with backoff, ordered stops, and the replay
server as an explicit, optional part (real child processes; the whole stack is tests/test_up.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis

from appliance import supervisor
from appliance.config import Settings, to_environ
from appliance.supervisor import Child, SetupError
from tests.conftest import RedisProcess, free_port, make_settings
from tests.helpers import spawn_in_group, wait_until
from tests.test_up import processes_marked


def replay_args(*files: str) -> argparse.Namespace:
    return argparse.Namespace(replay=list(files), replay_speed="max", replay_events=1000)


def test_the_replay_command_runs_the_loadtest_server_with_the_given_source(
    tmp_path: Path,
) -> None:
    synthetic = supervisor.replay_command(replay_args(), 7000)
    assert synthetic[1:] == ["-m", "loadtest", "serve", "--port", "7000", "--speed", "max",
                             "--events", "1000", "--seed", "1"]  # fmt: skip
    capture = tmp_path / "capture.jsonl"
    capture.write_text("")
    assert supervisor.replay_command(replay_args(str(capture)), 7000)[-2:] == [
        "--from",
        str(capture),
    ]
    with pytest.raises(SetupError, match=r"replay file .*missing\.jsonl not found"):
        supervisor.replay_command(replay_args(str(tmp_path / "missing.jsonl")), 7000)


def test_without_the_replay_package_replay_stops_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(supervisor, "REPLAY_PACKAGE", "no_such_replay_package")
    with pytest.raises(SetupError, match="no_such_replay_package"):
        supervisor.replay_command(replay_args(), 7000)
    settings = make_settings(tmp_path)
    args = argparse.Namespace(**vars(replay_args()), replay_port=0)
    assert supervisor.main(settings, args) == 2
    assert "--replay needs the replay server" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing was started


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_child_that_exits_is_restarted_after_a_doubling_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_START_S", 0.2)
    child = Child("short-lived", lambda: _python("raise SystemExit(3)"), backoff_s=0.2)
    child.launch()
    try:
        assert child.proc is not None
        child.proc.wait(10)
        supervisor._supervise([child])  # notices the exit, schedules the restart
        assert child.restart_at is not None and child.backoff_s == 0.4
        first = child.proc.pid

        def restarted() -> bool:
            supervisor._supervise([child])
            return child.restarts == 1

        wait_until(restarted, timeout=10, what="the restart")
        assert child.proc.pid != first and child.restart_at is None
    finally:
        supervisor._stop_all([child])


def test_stop_all_stops_the_newest_child_first_and_waits_for_each(tmp_path: Path) -> None:
    order = tmp_path / "order"
    code = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(tmp_path)!r} + '/ready-' + sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    children = [
        Child(name, lambda name=name: subprocess.Popen([sys.executable, "-c", code, name]))
        for name in ("redis", "ingester", "api")
    ]
    for child in children:
        child.launch()
    wait_until(
        lambda: all((tmp_path / f"ready-{c.name}").exists() for c in children),
        timeout=20,
        what="the children to install their SIGTERM handlers",
    )
    started = time.monotonic()
    supervisor._stop_all(children)
    assert order.read_text().split() == ["api", "ingester", "redis"]
    assert all(c.proc is not None and c.proc.returncode == 0 for c in children)
    assert time.monotonic() - started < 20


def test_a_port_left_in_time_wait_by_a_stopped_server_counts_as_free() -> None:
    # A server that closes its side of a connection first leaves that socket in TIME-WAIT for
    # about a minute after it stopped. Servers (Sanic, redis-server) bind with SO_REUSEADDR, and
    # so may listen again at once: the probe must agree.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()  # the server closes first: its socket goes to TIME-WAIT
            assert client.recv(1) == b""
    assert _in_time_wait(port), "the test did not produce a TIME-WAIT socket"
    assert supervisor._port_free("127.0.0.1", port)
    with socket.socket() as server:  # what a restarted server does
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        assert not supervisor._port_free("127.0.0.1", port)  # a listener is in use


def _in_time_wait(port: int) -> bool:
    """Whether /proc/net/tcp lists a socket on this local port in TIME-WAIT (state 06)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "06":
            return True
    return False


def test_redis_state_is_claimed_by_one_data_dir_and_source(
    settings: Settings, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    client = redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_password
    )
    supervisor.claim_redis_state(settings, "replay synthetic seed=1")
    supervisor.claim_redis_state(settings, "replay synthetic seed=1")  # the same run again
    client.set(settings.cursor_key, "1782864031989333")  # that run's ingester saved a cursor
    client.xadd(settings.stream_key, {"frames": "x"})  # and an entry waits for its batcher
    other_dir = msgspec.structs.replace(settings, data_dir=str(tmp_path / "other"))
    with pytest.raises(SetupError) as refused:
        supervisor.claim_redis_state(other_dir, "replay synthetic seed=1")
    message = str(refused.value)
    assert str(Path(settings.data_dir).resolve()) in message
    assert "1 stream entries not yet batched" in message and "--redis-dir" in message
    with pytest.raises(SetupError, match="source replay synthetic seed=1"):
        supervisor.claim_redis_state(settings, "jetstream wss://example.invalid/subscribe")
    supervisor.claim_redis_state(settings, "replay synthetic seed=1")  # its owner may go on
    # Nothing at stake (no cursor, no entries): the next run simply takes the state over.
    client.delete(settings.cursor_key, settings.stream_key)
    supervisor.claim_redis_state(other_dir, "jetstream wss://example.invalid/subscribe")
    owner = json.loads(client.get(supervisor.OWNER_KEY) or b"{}")
    assert owner["data_dir"] == str((tmp_path / "other").resolve())
    client.close()


def test_without_internet_up_says_so_and_suggests_the_replay(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens here: connections are refused, as without a route
    settings = make_settings(tmp_path, jetstream_urls=(f"ws://127.0.0.1:{closed}/subscribe",))
    mark = uuid.uuid4().hex
    env = {**os.environ, **to_environ(settings), "FRONTDOOR_TEST_RUN": mark}
    proc, lines = spawn_in_group(
        [sys.executable, "-m", "appliance", "up", "--hint-after", "2"], env
    )
    try:
        hint = wait_until(
            lambda: next((line for line in lines if "has not reached" in line), None),
            60,
            "the hint",
        )
        assert "make run ARGS=--replay" in hint
    finally:
        # Two seconds in, the API is often still starting its worker: the stop must wait for it
        # (Sanic loses a SIGTERM then) and leave nothing behind.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])
    assert processes_marked(f"FRONTDOOR_TEST_RUN={mark}") == []


def test_a_starting_child_is_stopped_once_ready_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Like Sanic's worker manager while it starts its workers: SIGTERM is lost until it is
    # ready; and like a worker, a grandchild in its process group.
    ready_file = tmp_path / "ready"
    grandchild_pid = tmp_path / "grandchild"
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(grandchild_pid)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(1.5)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        f"open({str(ready_file)!r}, 'w').close()\n"
        "time.sleep(120)\n"
    )
    child = Child(
        "starting",
        lambda: subprocess.Popen([sys.executable, "-c", code], start_new_session=True),
        ready=ready_file.exists,
    )
    child.launch()
    assert child.leads_group
    wait_until(grandchild_pid.exists, 20, "the grandchild")
    grandchild = int(grandchild_pid.read_text())
    supervisor._stop_all([child], timeout_s=10)
    assert child.proc is not None and child.proc.returncode == -signal.SIGTERM  # not killed
    wait_until(lambda: not _alive(grandchild), 10, "the grandchild to be gone")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
