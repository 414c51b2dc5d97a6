"""The `appliance` command line as a shell runs it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_config_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    # `appliance config | head -0`: the reader has closed the pipe before anything is written
    # (we close our end at once; the interpreter takes far longer to start).
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "config", "-v"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
