"""The whole chain on a fresh booted Debian: provision through the fake Hetzner API (which
hands out the booted host's address as the server's IPv4 and its loop device's id as the
volume's), the site deploy through inventory/hetzner.py (hosts and volume_device listed from the
API by label), then a search answered through Caddy.

It reuses the provisioning test's CLI helper and the site test's deploy and search helpers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, start_jetstream_server
from tests.hcloud_fake import TOKEN, FakeHetzner
from tests.provisioning import base_settings, pyinfra
from tests.system.booted import VOLUME_ID, BootedHost
from tests.system.site import (
    EVENTS,
    assert_search_finds_posts,
    run_deploy,
    session_wheelhouse,
    write_group_data,
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def fresh_host(boot_host: Callable[[], BootedHost]) -> BootedHost:
    """A bare booted Debian of its own: the site test deploys to the shared one."""
    return boot_host()


@pytest.fixture(scope="module")
def cloud(fresh_host: BootedHost) -> Iterator[FakeHetzner]:
    api = FakeHetzner(next_ipv4=lambda: fresh_host.address, next_volume_id=VOLUME_ID)
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def replay(
    fresh_host: BootedHost, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    server = start_jetstream_server(
        tmp_path_factory.mktemp("replay"), events=EVENTS, seed=11, host=fresh_host.gateway
    )
    yield server
    server.stop()


def test_provision_then_site_deploy_then_a_search_through_caddy(
    fresh_host: BootedHost,
    cloud: FakeHetzner,
    replay: ServerHandle,
    tmp_path: Path,
) -> None:
    # The key Hetzner would put into root's authorized_keys: the one the booted host has.
    public_key = tmp_path / "root.pub"
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(fresh_host.ssh_key)],
        capture_output=True,
        text=True,
        check=True,
    )
    public_key.write_text(derived.stdout)
    settings = {**base_settings(public_key), "admin_ssh_addresses": [fresh_host.gateway]}
    provisioned = pyinfra("provision", cloud, settings, tmp_path / "provision")
    assert provisioned.returncode == 0, provisioned.output[-3000:]
    assert (
        f"Hetzner: server bluesky-appliance at {fresh_host.address} (cx22 in fsn1), data volume "
        f"{fresh_host.volume_device}" in provisioned.hetzner_lines()
    )

    (tmp_path / "wheelhouse").mkdir()
    group_data = write_group_data(
        tmp_path / "site",
        fresh_host,
        replay,
        wheelhouse=session_wheelhouse(tmp_path / "wheelhouse"),
        volume_device=None,
    )
    deploy = run_deploy(
        fresh_host,
        group_data,
        inventory="inventory/hetzner.py",
        environment={"HCLOUD_TOKEN": TOKEN, "HCLOUD_ENDPOINT": cloud.url},
    )
    assert deploy.returncode == 0, deploy.output[-6000:]
    assert "doctor: all checks passed" in deploy.output
    # The volume the API named is the one mounted at the data root.
    mounted = fresh_host.ssh("findmnt -n -o SOURCE /srv/appliance").stdout.strip()
    real = fresh_host.ssh(f"readlink -f {fresh_host.volume_device}").stdout.strip()
    assert mounted == real
    assert_search_finds_posts(f"https://{fresh_host.address}")
