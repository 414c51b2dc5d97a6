"""`loadtest replay --target`: a replay fed into an appliance that runs on its own (redis-server,
batcher and API as separate processes, as `appliance up` starts them) passes verification,
refuses to touch it again once it holds data unless told, and names what is wrong with a bad
target before feeding anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Settings
from loadtest import cli
from loadtest.replay.stack import Stack, free_port
from tests.conftest import REPO_ROOT, make_settings


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Settings]:
    """An appliance as an operator runs it (automatic compaction on, the result limit on, here
    at 15 rows), started and stopped by the test, not by the replay."""
    settings = make_settings(tmp_path / "appliance", batch_interval_s=0.5, result_limit_max=15)
    stack = Stack(settings, tmp_path / "appliance", [])
    del stack.procs["server"], stack.procs["ingester"]
    stack.start()
    try:
        yield settings
    finally:
        stack.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return {**env, **extra}


def _replay(tmp_path: Path, name: str, target: str, *more: str, **env: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "loadtest", "replay", "--scale", "5000", "--per-day", "100000",
            "--path", "direct", "--target", target, "--report", str(tmp_path / name),
            "--cache", str(tmp_path / "cache"), "--jobs", "1", *more]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO_ROOT, env=_env(**env), capture_output=True, timeout=240)
    return done.returncode, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]


@pytest.mark.timeout(300)
def test_a_replay_against_a_running_appliance_feeds_and_verifies_it(
    tmp_path: Path, appliance: Settings
) -> None:
    s = appliance
    api, buffer = f"http://127.0.0.1:{s.api_port}", f"redis://127.0.0.1:{s.redis_port}"
    password = {"APPLIANCE_REDIS_PASSWORD": s.redis_password}
    code, out = _replay(tmp_path, "first", f"{api},{buffer},file://{s.data_dir}", **password)
    assert code == 0, out
    figures = json.loads((tmp_path / "first" / "report.json").read_text())
    assert figures["verified"] is True and figures["problems"] == [], out
    assert figures["storage_check"] == "Parquet keys (file://)"
    assert figures["events_stored"] == figures["events_valid"] > 4900
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    assert figures["stats_endpoint_ok"] is True
    assert all(q["ok"] for q in figures["query_latencies"]), figures["query_latencies"]
    # the appliance's result limit caps the exports the verifier compares
    assert any(q["expected"] > q["export_rows"] == 15 for q in figures["query_latencies"])
    assert figures["deleted_posts_checked"] > 0 and figures["deleted_posts_visible"] == 0
    assert s.redis_password not in (tmp_path / "first" / "report.json").read_text()

    # Now it holds data: refused, nothing fed.
    code, out = _replay(tmp_path, "again", f"{api},{buffer}", **password)
    assert code == 2 and "already holds" in out and "--target-allow-data" in out, out
    assert not (tmp_path / "again" / "report.json").exists()

    # A wrong password (from a file) is named as such.
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    code, out = _replay(tmp_path, "w", f"{api},{buffer}", "--target-password-file", str(wrong))
    assert code == 2 and f"refused the password from {wrong}" in out, out

    # Settings that are not the appliance's (another consumer group): named before feeding.
    code, out = _replay(tmp_path, "g", f"{api},{buffer}", APPLIANCE_CONSUMER_GROUP="nobody",
                        **password)  # fmt: skip
    assert code == 2 and "no consumer group 'nobody'" in out, out

    # Told to: another seed (new keys) is added and checked as what it added, by counts.
    secret = tmp_path / "secret"
    secret.write_text(s.redis_password + "\n")
    code, out = _replay(tmp_path, "more", f"{api},{buffer}", "--seed", "9",
                        "--target-password-file", str(secret), "--target-allow-data")  # fmt: skip
    assert code == 0, out
    more = json.loads((tmp_path / "more" / "report.json").read_text())
    assert more["verified"] is True and more["storage_check"].startswith("/v1/stats counts")
    assert more["events_stored"] == more["events_valid"] and more["lost"] == 0
    assert "held data before" in more["skipped"] and more["query_latencies"] == []


@pytest.mark.parametrize(
    ("target", "more", "message"),
    [
        ("redis://127.0.0.1:6379", [], "the API's base URL is missing"),
        ("http://127.0.0.1:8080", [], "the Redis buffer to feed is missing"),
        ("http://127.0.0.1:8080,redis://:hunter2@127.0.0.1:6379", [], "no password in the Redis"),
        ("http://127.0.0.1:8080,ftp://x", [], "is not one of http(s)://API"),
        ("http://127.0.0.1:8080,redis://127.0.0.1:6379/3", [], "(database 0)"),
        ("http://a:1,redis://b:2", ["--faults", "kill-batcher:1"], "never starts, stops or kills"),
        ("http://a:1,redis://b:2,file:///nonexistent/data", [], "does not exist here"),
    ],
)
def test_a_bad_target_is_refused_with_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    more: list[str],
    message: str,
) -> None:
    argv = ["replay", "--scale", "100", "--path", "direct", "--target", target,
            "--report", str(tmp_path / "r"), *more]  # fmt: skip
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_target_that_does_not_answer_or_the_websocket_path_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nothing = f"http://127.0.0.1:{free_port()},redis://127.0.0.1:{free_port()}"
    base = ["replay", "--scale", "100", "--target", nothing, "--report", str(tmp_path / "r")]
    assert cli.main([*base, "--path", "direct"]) == 2
    assert "cannot reach the API at http://127.0.0.1:" in capsys.readouterr().err
    assert cli.main(base) == 2  # --path websocket, the default
    assert "add --path direct" in capsys.readouterr().err
