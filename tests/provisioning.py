"""Provisioning deploys (provision, rebuild, teardown) run by the real `pyinfra` CLI against the
fake Hetzner API (`hcloud_fake`): the run's output and totals, and the group data the tests
start from. Used by tests/test_provision.py and the system test that provisions then deploys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.hcloud_fake import TOKEN, FakeHetzner
from tests.pyinfra_fake import REPO


@dataclass
class Run:
    returncode: int
    output: str

    def totals(self) -> dict[str, int]:
        """pyinfra's "Grand total" row: operations, changed, errors, no change."""
        match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", self.output)
        assert match, self.output[-3000:]
        values = [0 if v == "-" else int(v) for v in match.groups()]
        return dict(zip(["operations", "changed", "errors", "no_change"], values, strict=True))

    def hetzner_lines(self) -> list[str]:
        return [line.split("] ", 1)[1] for line in self.output.splitlines() if "] Hetzner" in line]

    def error_line(self) -> str:
        """The one line a refused run ends with (its last)."""
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1]


def base_settings(public_key: Path) -> dict[str, Any]:
    """group_data on top of inventory/group_data/all.py (tests change it between runs)."""
    return {
        "admin_ssh_addresses": ["198.51.100.7"],
        "hcloud_ssh_public_key": str(public_key),
        "hcloud_volume_size_gb": 40,
        "hcloud_poll_interval_s": 0.01,
        "hcloud_rate_limit_wait_s": 5,
        "rebuild_ssh_wait_s": 0,
    }


def pyinfra(
    deploy: str,
    fake: FakeHetzner,
    settings: dict[str, Any],
    tmp_path: Path,
    *args: str,
    token: str = TOKEN,
) -> Run:
    group_data = tmp_path / "group_data"
    group_data.mkdir(parents=True, exist_ok=True)
    (group_data / "all.py").write_text(
        "".join(f"{name} = {value!r}\n" for name, value in settings.items())
    )
    env = {**os.environ, "HCLOUD_TOKEN": token, "HCLOUD_ENDPOINT": fake.url}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "pyinfra"),
            "inventory/cloud.py",
            f"deploys/{deploy}.py",
            "--group-data",
            str(group_data),
            *(args or ("-y",)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert token not in output or token == "", "the token was printed"
    return Run(result.returncode, output)
