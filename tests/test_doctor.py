"""`appliance doctor` against real parts: redis-server, Prometheus, an HTTP server, a directory."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from appliance import doctor
from appliance.config import Settings
from loadtest.bench import free_port
from tests.conftest import RedisProcess, stop_process
from tests.helpers import wait_until


def test_redis_with_its_password_passes(settings: Settings, redis_proc: RedisProcess) -> None:
    assert "password only" in doctor.check_redis(settings)


def test_redis_with_a_wrong_password_fails(settings: Settings, redis_proc: RedisProcess) -> None:
    wrong = msgspec.structs.replace(settings, redis_password="not-the-password")
    with pytest.raises(doctor.CheckFailed, match=r"redis at 127\.0\.0\.1:\d+"):
        doctor.check_redis(wrong)


def test_redis_without_a_password_fails(settings: Settings, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(settings.redis_port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:

        def refusal() -> str | None:
            try:
                doctor.check_redis(settings)
            except doctor.CheckFailed as exc:
                return None if "Connection" in str(exc) else str(exc)  # None: not started yet
            pytest.fail("a Redis without a password passed the check")

        assert "answers without a password" in wait_until(refusal, 10, "redis-server to answer")
    finally:
        stop_process(proc)


def test_data_root_must_exist_be_writable_and_can_be_required_on_a_volume(
    settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(doctor.CheckFailed, match="is not a directory"):
        doctor.check_data_root(settings, on_volume=False)
    Path(settings.data_dir).mkdir()
    assert "writable" in doctor.check_data_root(settings, on_volume=False)
    assert not list(Path(settings.data_dir).iterdir())  # the probe file is gone
    # tmp_path is on the system disk here: not a volume.
    with pytest.raises(doctor.CheckFailed, match="on the system disk"):
        doctor.check_data_root(settings, on_volume=True)


@pytest.fixture
def http_status() -> Iterator[tuple[str, dict[str, int]]]:
    """A local HTTP server answering GET with the status in `state["status"]`."""
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"])
            self.end_headers()
            self.wfile.write(b'{"ready": false}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ready", state
    server.shutdown()
    server.server_close()


def test_a_url_must_answer_200(http_status: tuple[str, dict[str, int]]) -> None:
    url, state = http_status
    assert "answered 200" in doctor.check_url(url, insecure=False)
    state["status"] = 503
    with pytest.raises(doctor.CheckFailed, match=r"answered 503: b'\{\"ready\": false\}'"):
        doctor.check_url(url, insecure=False)
    with pytest.raises(doctor.CheckFailed, match="Connection refused"):
        doctor.check_url(f"http://127.0.0.1:{free_port()}/ready", insecure=False)


def test_prometheus_targets_must_all_be_up(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n"
        f"  - job_name: self\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
        f"  - job_name: gone\n    static_configs: [{{targets: ['127.0.0.1:{dead}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def scraped() -> str | None:
            with pytest.raises(doctor.CheckFailed) as failed:
                doctor.check_prometheus(f"http://127.0.0.1:{port}")
            detail = str(failed.value)
            return detail if "targets not up" in detail and "unknown" not in detail else None

        # until both targets have been scraped once
        detail = wait_until(scraped, 30, "both targets scraped", interval=0.2)
        assert f"gone/127.0.0.1:{dead} down" in detail
        assert "self/" not in detail  # Prometheus scraping itself is up
    finally:
        stop_process(proc)


def test_failing_checks_are_retried_until_they_pass_or_time_runs_out() -> None:
    answers = iter([doctor.CheckFailed("not yet"), doctor.CheckFailed("not yet"), "fine"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    slept: list[float] = []
    results = doctor.run_checks({"flaky": flaky}, wait_s=60, sleep=slept.append)
    assert results == {"flaky": (True, "fine")}
    assert len(slept) == 2

    def never() -> str:
        raise doctor.CheckFailed("still broken")

    assert doctor.run_checks({"never": never}, wait_s=0) == {"never": (False, "still broken")}


def test_the_command_names_the_failing_check_and_exits_1(
    settings: Settings, redis_proc: RedisProcess
) -> None:
    Path(settings.data_dir).mkdir()
    env = {
        f"APPLIANCE_{k.upper()}": str(v)
        for k, v in msgspec.structs.asdict(settings).items()
        if not isinstance(v, tuple)
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--unit", "no-such-unit-x"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL units: no-such-unit-x is ")
    assert lines[1].startswith("ok   redis: ")
    assert lines[2].startswith("ok   data: ")
    assert lines[-1] == "doctor: 1 check(s) failed: units"
