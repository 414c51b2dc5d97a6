"""What the site-deploy system tests share: the group data for a booted host, this checkout's
wheelhouse, running the site deploy over SSH, and a search through Caddy."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploys.wheelhouse import build
from tests.conftest import ServerHandle
from tests.helpers import wait_until
from tests.system.booted import BootedHost
from tests.system.images import cache_dir

REPO = Path(__file__).resolve().parents[2]
EVENTS = 3000  # events the replay server feeds the host's ingester


@dataclass
class Deploy:
    returncode: int
    output: str
    seconds: float

    def totals(self) -> dict[str, int]:
        """pyinfra's "Grand total" row: operations, changed (success), errors, no change."""
        match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", self.output)
        assert match, self.output[-3000:]
        values = [0 if v == "-" else int(v) for v in match.groups()]
        return dict(zip(["operations", "changed", "errors", "no_change"], values, strict=True))


def write_group_data(
    directory: Path,
    host: BootedHost,
    replay: ServerHandle,
    *,
    wheelhouse: Path,
    volume_device: str | None,
) -> Path:
    """Write the test's all.py into `directory`: the booted host's admin address and replay
    server, the project wheel `wheelhouse`, no Grafana, small memory; volume_device None leaves
    it to the inventory."""
    directory.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "admin_ssh_addresses": [host.gateway],
        "jetstream_urls": [replay.url],
        "grafana_enabled": False,
        "wheelhouse": str(wheelhouse.parent),
        "redis_maxmemory": "256mb",
        "api_workers": 1,
        "appliance_settings": {
            "APPLIANCE_BATCH_INTERVAL_S": "3",
            "APPLIANCE_DUCKDB_MEMORY_LIMIT": "512MB",
        },
    }
    if volume_device is not None:
        values["volume_device"] = volume_device
    (directory / "all.py").write_text(
        "".join(f"{name} = {value!r}\n" for name, value in values.items())
    )
    return directory


def session_wheelhouse(directory: Path) -> Path:
    """This checkout's wheelhouse in a directory of this session's own (concurrent sessions of
    other checkouts must not swap the project wheel between two deploys), with the dependency
    wheels taken from, and added to, a cache shared between sessions."""
    cache = cache_dir() / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    for wheel in cache.glob("*.whl"):
        shutil.copy2(wheel, directory / wheel.name)
    project = build(directory)
    for wheel in directory.glob("*.whl"):
        if wheel != project and not (cache / wheel.name).exists():
            partial = cache / f".{wheel.name}.part"
            shutil.copy2(wheel, partial)
            partial.rename(cache / wheel.name)
    return project


def run_deploy(
    host: BootedHost,
    group_data: Path,
    *,
    inventory: str = "inventory/hosts.py",
    environment: dict[str, str] | None = None,
) -> Deploy:
    """Run the site deploy onto `host`; by default through the static inventory naming it."""
    command = [
        str(Path(sys.executable).parent / "pyinfra"),
        inventory,
        "deploys/site.py",
        "-y",
        "--group-data",
        str(group_data),
        *host.pyinfra_args(),
    ]
    env = {**os.environ, **(environment or {"APPLIANCE_HOSTS": host.address})}
    for name in list(env):
        if name.startswith("DEPLOY_SECRET_"):
            del env[name]
    start = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False
    )
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    (group_data / f"deploy-{int(start)}.log").write_text(output)
    print(f"\ndeploy took {seconds:.1f} s")
    return Deploy(result.returncode, output, seconds)


def https_get(url: str) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Caddy's internal CA
    try:
        with urllib.request.urlopen(url, timeout=15, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_search_finds_posts(base: str, timeout_s: float = 120) -> None:
    """Poll `base`/v1/search through Caddy until it returns posts."""
    last: list[tuple[int, bytes]] = [(0, b"")]

    def posts() -> list[object]:
        last[0] = https_get(f"{base}/v1/search?limit=5")
        status, body = last[0]
        return json.loads(body)["posts"] if status == 200 else []

    try:
        wait_until(posts, timeout_s, "posts searchable through Caddy", interval=2)
    except AssertionError:
        status, body = last[0]
        raise AssertionError(
            f"no posts searchable through Caddy: {status} {body[:300]!r}"
        ) from None
