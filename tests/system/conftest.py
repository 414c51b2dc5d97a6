"""Fixtures for system tests: a booted Debian 12 container reached over SSH (see booted.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.system.booted import BootedHost, boot_debian_host

# What the local apt repository holds: the packages a deploy installs (their dependencies are
# resolved when the repository is built). Packages already in the rootfs may be listed or not.
DEPLOY_PACKAGES = (
    "redis-server",
    "redis-tools",
    "prometheus",
    "prometheus-node-exporter",
    "prometheus-redis-exporter",
    "prometheus-alertmanager",
    "caddy",
    "nftables",
    "chrony",
    "unattended-upgrades",
    "python3-venv",
    "python3-pip",
    "curl",
    "ca-certificates",
    "e2fsprogs",
    "sudo",
    "gnupg",
    "apt-transport-https",
)

# The first test that asks for a host may build the rootfs and the apt repository (a few
# minutes on a cold cache), which pytest-timeout counts against that test.
SYSTEM_TEST_TIMEOUT = 1200


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("system") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SYSTEM_TEST_TIMEOUT))


@pytest.fixture(scope="session")
def boot_host() -> Iterator[Callable[[], BootedHost]]:
    """Boot a fresh host per call (each its own rootfs copy, slot, volume); all stop at the end."""
    hosts: list[BootedHost] = []

    def boot() -> BootedHost:
        host = boot_debian_host(DEPLOY_PACKAGES)
        hosts.append(host)
        return host

    yield boot
    for host in reversed(hosts):
        host.stop()


@pytest.fixture(scope="session")
def debian_host(boot_host: Callable[[], BootedHost]) -> BootedHost:
    """One bare booted Debian 12 for the whole session, for the deploy test to provision."""
    return boot_host()
