"""Fixtures for system tests: a booted Debian 12 container reached over SSH (see booted.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from roles import debian_packages
from tests.system.booted import BootedHost, boot_debian_host

# What the local apt repository holds: every package the deploy's roles install (their
# dependencies are resolved when the repository is built), from the roles themselves.
DEPLOY_PACKAGES = tuple(debian_packages())

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
