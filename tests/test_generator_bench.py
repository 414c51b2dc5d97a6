"""`loadtest bench generator` prints its figures (never asserted as speeds), the mid-stream and
render figures included; rendering a chunk mid-stream gives the same frames as from the start."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from loadtest import firehose as fh
from loadtest.firehose.config import _DEL_M


def test_bench_generator_reports_every_figure() -> None:
    cmd = [sys.executable, "-m", "loadtest", "bench", "generator"]
    cmd += ["--events", "2000", "--runs", "1", "--offset", "50000"]
    out = subprocess.run(cmd, capture_output=True, timeout=280, check=True)
    figures = json.loads(out.stdout.decode().strip().splitlines()[-1])
    for name in ("generator", "generator_mid", "render", "decode", "server", "server_file"):
        assert figures[f"{name}_events_per_s"] > 0, name
        assert figures[f"{name}_events_per_cpu_s"] > 0, name
    assert "render (gen+facts+zstd)" in out.stdout.decode()


def test_a_fresh_generator_mid_stream_agrees_with_one_that_got_there() -> None:
    # Far enough in that deletes reach blocks the fresh generator never made (its kind cache
    # is cold there), the way a worker rendering one chunk of a long capture starts.
    cfg = fh.FirehoseConfig(seed=4, events=_DEL_M * 600)
    start = cfg.events - 3000
    walked = list(itertools.islice(fh.generate(cfg), start, None))
    fh._generator.cache_clear()
    assert list(fh.generate(cfg, start)) == walked
