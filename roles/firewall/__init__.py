"""The host firewall (nftables): SSH from the admin addresses only, 80/443 from anywhere,
loopback free, everything else dropped. The ruleset is checked before it is loaded and is
loaded atomically; established connections stay open, so the SSH session applying it survives."""

from __future__ import annotations

import ipaddress

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from roles.ops import beside

RULESET = "/etc/nftables.conf"
PACKAGES = ["nftables"]


def split_addresses(addresses: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The admin addresses as (IPv4 networks, IPv6 networks), normalised."""
    nets = [ipaddress.ip_network(a, strict=False) for a in addresses]
    v4 = [str(n) for n in nets if n.version == 4]
    v6 = [str(n) for n in nets if n.version == 6]
    return v4, v6


@deploy("Configure the firewall")
def firewall(
    *, admin_addresses: list[str] | tuple[str, ...], ssh_port: int, public_tcp_ports: list[int]
) -> None:
    if not admin_addresses:
        raise ValueError("admin_addresses is empty: nobody could reach SSH after the deploy")
    v4, v6 = split_addresses(admin_addresses)
    apt.packages(name="Install nftables", packages=PACKAGES, no_recommends=True)
    rules = files.template(
        name="Write the nftables ruleset",
        src=beside(__file__, "nftables.conf.j2"),
        dest=RULESET,
        mode="644",
        admin_v4=v4,
        admin_v6=v6,
        ssh_port=ssh_port,
        public_tcp_ports=public_tcp_ports,
    )
    server.shell(
        name="Check the ruleset, then load it atomically",
        commands=[f"nft -c -f {RULESET}", f"nft -f {RULESET}"],
        _if=rules.did_change,
    )
    systemd.service(
        name="Load the ruleset at every boot",
        service="nftables",
        running=True,
        enabled=True,
    )
