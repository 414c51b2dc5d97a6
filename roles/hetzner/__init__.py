"""The appliance's Hetzner Cloud resources, as pyinfra operations run on the operator's machine.

Each operation reads the project's current state through the API and yields only the changes
it needs, as Python commands pyinfra runs at execution time (`--dry` stops before them and lists
what would change); a resource already as wanted yields nothing, so a second run reports no
changes. Changes Hetzner makes in place are made in place (a bigger volume, new firewall rules);
the ones it cannot make (a smaller volume, another location) are refused by `preflight` before
anything changes. A failure stops the run with one line naming the fix and one saying what exists.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

from hcloud.firewalls import FirewallResource, FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.primary_ips import PrimaryIP
from hcloud.server_types import ServerType
from hcloud.servers import ServerCreatePublicNetwork
from hcloud.ssh_keys import SSHKey
from pyinfra import host, logger
from pyinfra.api import FunctionCommand, State, deploy, operation
from pyinfra.api.host import Host

from roles.hetzner.cloud import LABEL, Cloud, CloudError, Names
from roles.hetzner.preflight import check_ours

Rule = tuple[str, str, str, tuple[str, ...]]  # direction, protocol, port, sorted source networks

ANYWHERE = ("0.0.0.0/0", "::/0")


def firewall_rules(admin_addresses: tuple[str, ...], ssh_port: int) -> list[FirewallRule]:
    """SSH from the admin addresses, 80 and 443 from anywhere; nothing else comes in."""
    admins = sorted(str(ipaddress.ip_network(a, strict=False)) for a in admin_addresses)
    return [
        FirewallRule("in", "tcp", admins, port=str(ssh_port), description="SSH from the admins"),
        FirewallRule("in", "tcp", list(ANYWHERE), port="80", description="HTTP (ACME, redirect)"),
        FirewallRule("in", "tcp", list(ANYWHERE), port="443", description="HTTPS"),
    ]


def _rule_set(rules: list[FirewallRule]) -> set[Rule]:
    return {
        (
            r.direction or "",
            r.protocol or "",
            r.port or "",
            tuple(sorted(str(ipaddress.ip_network(s, strict=False)) for s in r.source_ips)),
        )
        for r in rules
    }


def _step(cloud: Cloud, names: Names, what: str, apply: Callable[[], None]) -> FunctionCommand:
    """A change pyinfra runs at execution time: `apply` makes it and waits for its actions."""

    def run(state: State, host: Host) -> bool:
        try:
            with cloud.doing(what):
                apply()
        except CloudError as exc:
            _stop(host, cloud, names, str(exc))
            return False
        host.log(f"Hetzner: {what}: done")
        return True

    run.__name__ = what.replace(" ", "_")
    return FunctionCommand(run, (), {})


def _refuse(cloud: Cloud, names: Names, message: str) -> FunctionCommand:
    """Stop the run at this operation with `message` (a change found only at execution time)."""

    def run(state: State, host: Host) -> bool:
        _stop(host, cloud, names, message)
        return False

    return FunctionCommand(run, (), {})


def _stop(host: Host, cloud: Cloud, names: Names, message: str) -> None:
    host.log_styled(f"Hetzner: {message}", fg="red", log_func=logger.error)
    host.log_styled(
        f"Hetzner: stopped half-way, {cloud.existing(names)}; "
        "fix the cause and run again: it continues from there",
        fg="yellow",
        log_func=logger.error,
    )


def _stops_cleanly(
    op: Callable[..., Generator[FunctionCommand, None, None]],
) -> Callable[..., Generator[FunctionCommand, None, None]]:
    """A CloudError while an operation looks at the project stops the run at that operation
    with its one line (and what exists), instead of a traceback."""

    @functools.wraps(op)
    def looking(
        cloud: Cloud, names: Names, *args: Any, **kwargs: Any
    ) -> Generator[FunctionCommand, None, None]:
        try:
            yield from op(cloud, names, *args, **kwargs)
        except CloudError as exc:
            yield _refuse(cloud, names, str(exc))

    return looking


def _plan(what: str) -> None:
    """Say what a change will do when pyinfra only looks for changes (`--dry`, no `-y`)."""
    if not host.state.is_executing:
        host.log(f"Hetzner plan: {what}")


@operation()
@_stops_cleanly
def ssh_key(cloud: Cloud, names: Names, public_key: str) -> Generator[FunctionCommand, None, None]:
    """The operator's public key in the project, for the server's root login."""
    client = cloud.client
    with cloud.doing(f"look up the SSH key {names.ssh_key}"):
        key = cloud.operator_key(names, public_key)
    if key is not None:
        if key.public_key.split()[:2] != public_key.split()[:2]:
            yield _refuse(
                cloud,
                names,
                f"the SSH key {names.ssh_key!r} in the project is another key than "
                "hcloud_ssh_public_key: delete it in the Hetzner Console or set "
                "hcloud_ssh_key_name to another name",
            )
        return
    what = f"upload the SSH key {names.ssh_key}"
    _plan(what)

    def create() -> None:
        client.ssh_keys.create(name=names.ssh_key, public_key=public_key, labels=names.labels)

    yield _step(cloud, names, what, create)


@operation()
@_stops_cleanly
def firewall(
    cloud: Cloud, names: Names, admin_addresses: tuple[str, ...], ssh_port: int
) -> Generator[FunctionCommand, None, None]:
    """The Hetzner firewall: SSH from the admin addresses, 80/443 public, nothing else."""
    client = cloud.client
    rules = firewall_rules(admin_addresses, ssh_port)
    with cloud.doing(f"look up the firewall {names.firewall}"):
        current = cloud.find("firewalls", names.firewall)
    if current is None:
        what = f"create the firewall {names.firewall} (SSH from {len(admin_addresses)} admin address(es), 80/443 public)"
        _plan(what)

        def create() -> None:
            response = client.firewalls.create(
                name=names.firewall,
                rules=rules,
                labels=names.labels,  # type: ignore[arg-type]  # hcloud 2.27 says str; it is a dict
            )
            cloud.wait(*(response.actions or []))

        yield _step(cloud, names, what, create)
    elif _rule_set(current.rules or []) != _rule_set(rules):
        what = f"set the rules of the firewall {names.firewall} (SSH from {', '.join(sorted(admin_addresses))}, 80/443 public)"
        _plan(what)

        def update() -> None:
            cloud.wait(*current.set_rules(rules))

        yield _step(cloud, names, what, update)


@operation()
@_stops_cleanly
def primary_ip(cloud: Cloud, names: Names, location: str) -> Generator[FunctionCommand, None, None]:
    """A primary IPv4 of the project's own, kept when the server is rebuilt or re-created."""
    with cloud.doing(f"look up the primary IP {names.ipv4}"):
        current = cloud.find("primary_ips", names.ipv4)
    if current is not None:
        return
    what = f"reserve the primary IPv4 {names.ipv4} in {location}"
    _plan(what)

    def create() -> None:
        response = cloud.client.primary_ips.create(
            type="ipv4",
            name=names.ipv4,
            location=Location(name=location),
            auto_delete=False,
            labels=names.labels,
        )
        cloud.wait(response.action)

    yield _step(cloud, names, what, create)


@operation()
@_stops_cleanly
def server(
    cloud: Cloud,
    names: Names,
    server_type: str,
    location: str,
    image: str,
    ipv6: bool,
    public_key: str,
) -> Generator[FunctionCommand, None, None]:
    """The server, with the SSH key, the firewall and the primary IPv4; started."""
    client = cloud.client
    with cloud.doing(f"look up the server {names.server}"):
        current = cloud.find("servers", names.server)
        fw = cloud.find("firewalls", names.firewall)
    if current is None:
        what = f"create the server {names.server} ({server_type} in {location}, {image})"
        _plan(what)

        def create() -> None:
            firewall = cloud.find("firewalls", names.firewall)
            ipv4 = cloud.find("primary_ips", names.ipv4)
            key = cloud.operator_key(names, public_key)
            response = client.servers.create(
                name=names.server,
                server_type=ServerType(name=server_type),
                image=Image(name=image),
                location=Location(name=location),
                ssh_keys=[SSHKey(id=key.id)] if key else None,
                firewalls=[firewall] if firewall else None,
                labels=names.labels,
                public_net=ServerCreatePublicNetwork(
                    ipv4=PrimaryIP(id=ipv4.id) if ipv4 else None,
                    enable_ipv4=True,
                    enable_ipv6=ipv6,
                ),
                start_after_create=True,
                automount=False,
            )
            cloud.wait(response.action, *response.next_actions)

        yield _step(cloud, names, what, create)
        return
    applied = {f.firewall.id for f in current.public_net.firewalls or []}
    if fw is not None and fw.id not in applied:
        what = f"apply the firewall {names.firewall} to the server {names.server}"
        _plan(what)

        def apply() -> None:
            resource = FirewallResource(type="server", server=current)
            cloud.wait(*fw.apply_to_resources([resource]))

        yield _step(cloud, names, what, apply)


@operation()
@_stops_cleanly
def volume(
    cloud: Cloud, names: Names, size_gb: int, location: str
) -> Generator[FunctionCommand, None, None]:
    """The data volume of `size_gb`, attached to the server (the site deploy formats and mounts it)."""
    client = cloud.client
    with cloud.doing(f"look up the volume {names.volume}"):
        current = cloud.find("volumes", names.volume)
        srv = cloud.find("servers", names.server)
    if current is None:
        what = f"create the {size_gb} GB volume {names.volume} attached to {names.server}"
        _plan(what)

        def create() -> None:
            attached_to = cloud.find("servers", names.server)
            response = client.volumes.create(
                size=size_gb,
                name=names.volume,
                labels=names.labels,  # type: ignore[arg-type]  # hcloud 2.27 says str; it is a dict
                location=None if attached_to else Location(name=location),
                server=attached_to,
                automount=False,
            )
            cloud.wait(response.action, *response.next_actions)

        yield _step(cloud, names, what, create)
        return
    if current.size < size_gb:
        what = f"grow the volume {names.volume} from {current.size} to {size_gb} GB"
        _plan(what)

        def grow() -> None:
            cloud.wait(current.resize(size_gb))

        yield _step(cloud, names, what, grow)
    if current.server is None:
        what = f"attach the volume {names.volume} to {names.server}"
        _plan(what)

        def attach() -> None:
            target = cloud.find("servers", names.server)
            cloud.wait(current.attach(target, automount=False))

        yield _step(cloud, names, what, attach)
    elif srv is not None and current.server.id != srv.id:
        yield _refuse(
            cloud,
            names,
            f"the volume {names.volume} is attached to another server (id {current.server.id}): "
            "detach it in the Hetzner Console first",
        )


@operation()
@_stops_cleanly
def report(cloud: Cloud, names: Names) -> Generator[FunctionCommand, None, None]:
    """Say where the server is and which volume device holds the data (changes nothing)."""
    with cloud.doing(f"look up the server {names.server}"):
        srv = cloud.find("servers", names.server)
        vol = cloud.find("volumes", names.volume)
    if srv is None:
        host.log(f"Hetzner: the server {names.server} does not exist yet")
        return
    ipv4 = srv.public_net.ipv4.ip if srv.public_net and srv.public_net.ipv4 else "no IPv4"
    device = vol.linux_device if vol is not None else "no volume"
    host.log(
        f"Hetzner: server {srv.name} at {ipv4} ({srv.server_type.name} in {srv.location.name}), "
        f"data volume {device}"
    )
    return
    yield  # an operation is a generator even when it has nothing to change


@operation(is_idempotent=False)
@_stops_cleanly
def rebuilt(
    cloud: Cloud, names: Names, image: str, ssh_port: int, ssh_wait_s: int
) -> Generator[FunctionCommand, None, None]:
    """Rebuild the server from `image`: its disk is replaced, the volume and the IP stay."""
    with cloud.doing(f"look up the server {names.server}"):
        current = cloud.find("servers", names.server)
    if current is None:
        yield _refuse(
            cloud,
            names,
            f"there is no server {names.server} to rebuild: run deploys/provision.py first",
        )
        return
    check_ours(current, names, "server")
    what = f"rebuild the server {names.server} from {image} (volume and IP stay)"
    _plan(what)

    def replace_disk() -> None:
        cloud.wait(current.rebuild(Image(name=image)).action)
        ipv4 = current.public_net.ipv4.ip if current.public_net.ipv4 else None
        if ipv4 and ssh_wait_s:
            _wait_for_port(ipv4, ssh_port, ssh_wait_s)

    yield _step(cloud, names, what, replace_disk)


def _wait_for_port(address: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise CloudError(
                    f"the rebuilt server does not answer on {address}:{port} after "
                    f"{timeout_s:.0f} s: look at its console in the Hetzner Console"
                ) from None
            time.sleep(2)


@operation(is_idempotent=False)
@_stops_cleanly
def deleted(
    cloud: Cloud, names: Names, kind: str, resource: str
) -> Generator[FunctionCommand, None, None]:
    """Delete the appliance's resource of `kind` called `resource`, if there is one."""
    with cloud.doing(f"look up the {kind} {resource}"):
        current = cloud.find(kind, resource)
    if current is None or (current.labels or {}).get(LABEL) != names.appliance:
        return  # gone already, or not this appliance's: never deleted
    label = kind.rstrip("s").replace("_", " ")
    what = f"delete the {label} {resource}"
    _plan(what)

    def delete() -> None:
        if kind == "volumes" and current.server is not None:
            cloud.wait(current.detach())
        result = current.delete()
        if kind == "servers":
            cloud.wait(result)

    yield _step(cloud, names, what, delete)


@deploy("Provision the Hetzner Cloud resources")
def provision(
    *,
    cloud: Cloud,
    names: Names,
    public_key: str,
    admin_addresses: tuple[str, ...],
    ssh_port: int,
    server_type: str,
    location: str,
    image: str,
    volume_size_gb: int,
    ipv6: bool,
) -> None:
    ssh_key(
        name=f"Upload the operator's SSH key as {names.ssh_key}",
        cloud=cloud,
        names=names,
        public_key=public_key,
    )
    firewall(
        name="Allow SSH from the admin addresses and 80/443 from anywhere in the Hetzner firewall",
        cloud=cloud,
        names=names,
        admin_addresses=admin_addresses,
        ssh_port=ssh_port,
    )
    primary_ip(
        name="Reserve a primary IPv4 that outlives the server",
        cloud=cloud,
        names=names,
        location=location,
    )
    server(
        name=f"Create the {server_type} server in {location} from {image}",
        cloud=cloud,
        names=names,
        server_type=server_type,
        location=location,
        image=image,
        ipv6=ipv6,
        public_key=public_key,
    )
    volume(
        name=f"Attach a {volume_size_gb} GB data volume to the server",
        cloud=cloud,
        names=names,
        size_gb=volume_size_gb,
        location=location,
    )
    report(name="Report the server's address and data volume", cloud=cloud, names=names)


@deploy("Rebuild the Hetzner server")
def rebuild(*, cloud: Cloud, names: Names, image: str, ssh_port: int, ssh_wait_s: int) -> None:
    rebuilt(
        name=f"Rebuild the server from {image}, keeping its volume and IP",
        cloud=cloud,
        names=names,
        image=image,
        ssh_port=ssh_port,
        ssh_wait_s=ssh_wait_s,
    )
    report(name="Report the server's address and data volume", cloud=cloud, names=names)


@deploy("Tear down the Hetzner Cloud resources")
def teardown(*, cloud: Cloud, names: Names, delete_volume: bool) -> None:
    for kind, resource, sentence in [
        ("servers", names.server, f"Delete the server {names.server}"),
        ("firewalls", names.firewall, f"Delete the firewall {names.firewall}"),
        ("primary_ips", names.ipv4, f"Release the primary IPv4 {names.ipv4}"),
        ("ssh_keys", names.ssh_key, f"Delete the SSH key {names.ssh_key}"),
    ]:
        deleted(name=sentence, cloud=cloud, names=names, kind=kind, resource=resource)
    if delete_volume:
        deleted(
            name=f"Delete the data volume {names.volume} and the data on it",
            cloud=cloud,
            names=names,
            kind="volumes",
            resource=names.volume,
        )
