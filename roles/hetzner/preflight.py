"""The checks before any change to the Hetzner project: the token works, the catalogue has the
location, server type and image, what exists is this appliance's (by its label), and nothing
exists that differs from the inventory in a way Hetzner cannot change in place."""

from __future__ import annotations

from typing import Any

from roles.hetzner.cloud import LABEL, Cloud, CloudError, Names


def check_ours(obj: Any, names: Names, kind: str) -> None:
    """Refuse an object of the project named like ours but without our label."""
    if obj is not None and (obj.labels or {}).get(LABEL) != names.appliance:
        raise CloudError(
            f"a {kind} named {obj.name!r} exists in the project without the label "
            f"{names.selector}: it is not this appliance's; rename it or choose another "
            "appliance_name"
        )


def preflight(
    cloud: Cloud,
    names: Names,
    *,
    server_type: str,
    location: str,
    image: str,
    volume_size_gb: int,
) -> str:
    """Check the token, the catalogue and every change Hetzner cannot make, before any change.
    Returns the server type's monthly price in the location, from Hetzner's price list."""
    client = cloud.client
    with cloud.doing("read the project (checking the token)"):
        found = {
            kind: cloud.find(kind, name)
            for kind, name in [
                ("servers", names.server),
                ("volumes", names.volume),
                ("firewalls", names.firewall),
                ("primary_ips", names.ipv4),
            ]
        }
        known_type = client.server_types.get_by_name(server_type)
        known_location = client.locations.get_by_name(location)
        known_image = client.images.get_by_name_and_architecture(
            image, (known_type.architecture if known_type else None) or "x86"
        )
    _check_catalogue(
        location=location,
        server_type=server_type,
        image=image,
        known=(known_location, known_type, known_image),
    )
    for kind, obj in found.items():
        check_ours(obj, names, kind.rstrip("s").replace("_", " "))
    _check_unchangeable(
        found, location=location, server_type=server_type, volume_size_gb=volume_size_gb
    )
    return _monthly_price(known_type, server_type=server_type, location=location)


def _check_catalogue(
    *, location: str, server_type: str, image: str, known: tuple[Any, Any, Any]
) -> None:
    """The location, server type and image, as Hetzner found them (None: not in its catalogue)."""
    known_location, known_type, known_image = known
    if known_location is None:
        raise CloudError(
            f"hcloud_location {location!r} is not a Hetzner Cloud location: set it in "
            "inventory/group_data/all.py to one of fsn1, nbg1, hel1, ash, hil, sin"
        )
    if known_type is None:
        raise CloudError(
            f"hcloud_server_type {server_type!r} is not offered by Hetzner Cloud: set it in "
            "inventory/group_data/all.py (e.g. cx22; `hcloud server-type list` shows them)"
        )
    if known_image is None:
        raise CloudError(
            f"hcloud_image {image!r} is not a Hetzner image: set it in "
            "inventory/group_data/all.py (e.g. debian-12)"
        )


def _check_unchangeable(
    found: dict[str, Any], *, location: str, server_type: str, volume_size_gb: int
) -> None:
    """What exists already but differs from the inventory in a way Hetzner cannot change."""
    server, volume, ipv4 = found["servers"], found["volumes"], found["primary_ips"]
    if server is not None and server.location.name != location:
        raise CloudError(
            f"hcloud_location: the server {server.name} is in {server.location.name}, the "
            f"inventory says {location}; Hetzner cannot move a server: set hcloud_location back "
            f"to {server.location.name!r}, or tear down and provision again"
        )
    if server is not None and server.server_type.name != server_type:
        raise CloudError(
            f"hcloud_server_type: the server is a {server.server_type.name}, the inventory says "
            f"{server_type}; a type change needs the server powered off, so this deploy does "
            "not make it: rescale it in the Hetzner Console, or set the value back"
        )
    for obj, kind in ((volume, "volume"), (ipv4, "primary IP")):
        if obj is not None and obj.location.name != location:
            raise CloudError(
                f"hcloud_location: the {kind} {obj.name} is in {obj.location.name}, the "
                f"inventory says {location}; Hetzner cannot move it: set hcloud_location back"
            )
    if volume is not None and volume.size > volume_size_gb:
        raise CloudError(
            f"hcloud_volume_size_gb: the volume {volume.name} has {volume.size} GB, the inventory "
            f"says {volume_size_gb}; Hetzner volumes only grow: set it to {volume.size} or more"
        )
    if (
        server is not None
        and ipv4 is not None
        and (server.public_net.primary_ipv4 is None or server.public_net.primary_ipv4.id != ipv4.id)
    ):
        raise CloudError(
            f"the server {server.name} does not use the primary IP {ipv4.name}: assign it in the "
            "Hetzner Console (server powered off), or tear down and provision again"
        )


def _monthly_price(known_type: Any, *, server_type: str, location: str) -> str:
    """The server type's monthly price in the location, from Hetzner's price list."""
    for price in known_type.prices or []:
        if price.get("location") == location:
            monthly = price["price_monthly"]
            return (
                f"a {server_type} in {location} costs {float(monthly['net']):.2f} EUR a month "
                f"before VAT ({float(monthly['gross']):.2f} with it), by Hetzner's price list"
            )
    return f"Hetzner lists no price for a {server_type} in {location}"
