"""`loadtest record`: capture our server into rotating zstd files, replay them byte-identical."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zstandard
from websockets.asyncio.client import connect

from loadtest import firehose as fh
from loadtest.record import capture_files, record, with_cursor
from tests.helpers import wait_until


def read_capture(directory: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in capture_files(directory):
        with path.open("rb") as fh_, zstandard.ZstdDecompressor().stream_reader(fh_) as reader:
            lines += reader.read().split(b"\n")[:-1]
    return lines


def test_record_rotates_survives_a_drop_and_replays_byte_identical(
    jetstream_server: Any, tmp_path: Path
) -> None:
    cfg = fh.FirehoseConfig(seed=31, events=3000, oversized_fraction=0.002)
    frames = list(fh.generate(cfg))
    source = jetstream_server(events=3000, seed=31, oversized=0.002, drop_at=[1200])
    out = tmp_path / "capture"

    stats = asyncio.run(record(source.url, out, rotate_mb=0.2, max_events=3000, stall_seconds=10))
    assert stats.frames == 3000 and stats.reconnects == 1
    assert stats.duplicates_skipped == 1  # the cursor is inclusive: the last frame came again
    files = capture_files(out)
    assert len(files) >= 3 and stats.files == len(files)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    assert read_capture(out) == frames  # no gap, no duplicate across the drop

    replay = jetstream_server(files=[out])

    async def client() -> list[bytes]:
        async with connect(replay.url, max_size=None) as ws:
            return [await asyncio.wait_for(ws.recv(decode=False), 10) for _ in range(3000)]  # type: ignore[misc]

    assert asyncio.run(client()) == frames


def test_cli_record_stops_cleanly_on_sigterm(jetstream_server: Any, tmp_path: Path) -> None:
    frames = list(fh.generate(fh.FirehoseConfig(seed=32, events=200)))
    source = jetstream_server(events=200, seed=32)
    out = tmp_path / "capture"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "record", "--url", source.url, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: list(out.glob(".*.tmp")), 20, "the capture's temporary file")
        # it stays a temporary while recording (the stream is exhausted, not closed)
        time.sleep(1.0)
        assert capture_files(out) == []
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert b"recorded 200 frames into 1 files" in stdout
    assert read_capture(out) == frames


def test_cli_record_rejects_a_bad_url(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "record", "--url", "http://x", "--out", str(tmp_path)],
        capture_output=True,
    )
    assert result.returncode == 2 and b"ws://" in result.stderr


def test_with_cursor_sets_or_replaces_the_parameter() -> None:
    url = "wss://host/subscribe?wantedCollections=a.b.c&cursor=5"
    assert with_cursor(url, 7) == "wss://host/subscribe?wantedCollections=a.b.c&cursor=7"
    assert with_cursor(url, None) == "wss://host/subscribe?wantedCollections=a.b.c"
