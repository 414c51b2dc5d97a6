"""Provision the appliance's Hetzner Cloud resources from an empty project (runs on this machine).

    HCLOUD_TOKEN=... pyinfra inventory/cloud.py deploys/provision.py -y     # or: make provision
    HCLOUD_TOKEN=... pyinfra inventory/cloud.py deploys/provision.py --dry  # the plan only

An SSH key, a firewall (SSH from admin_ssh_addresses, 80/443 public), a primary IPv4 that
outlives the server, the server, and the data volume attached to it, all labelled
appliance=<appliance_name> (inventory/hetzner.py lists the servers by that label). A second run
changes nothing. A bigger volume or new admin addresses are applied in place; what Hetzner cannot
change in place (a smaller volume, another location or server type) is refused before anything
changes. Then the site deploy configures the server: make deploy INVENTORY=inventory/hetzner.py.
"""

from __future__ import annotations

from pyinfra import host

from deploys.data import InventoryError, provision_data
from roles.hetzner import provision
from roles.hetzner.cloud import Cloud, CloudError, Names
from roles.hetzner.preflight import preflight

try:
    data = provision_data(host.data)
    public_key = data.public_key()
    names = Names(appliance=data.appliance_name, ssh_key=data.ssh_key_name)
    cloud = Cloud.from_environment(
        poll_interval_s=data.hcloud_poll_interval_s,
        rate_limit_wait_s=data.hcloud_rate_limit_wait_s,
    )
    price = preflight(
        cloud,
        names,
        server_type=data.hcloud_server_type,
        location=data.hcloud_location,
        image=data.hcloud_image,
        volume_size_gb=data.hcloud_volume_size_gb,
    )
except (InventoryError, CloudError) as exc:
    raise SystemExit(f"provision: {exc}") from None
host.log(f"Hetzner: {price}; the volume and the IPv4 cost extra (see docs/operations.md)")
provision(
    cloud=cloud,
    names=names,
    public_key=public_key,
    admin_addresses=data.admin_ssh_addresses,
    ssh_port=data.ssh_port,
    server_type=data.hcloud_server_type,
    location=data.hcloud_location,
    image=data.hcloud_image,
    volume_size_gb=data.hcloud_volume_size_gb,
    ipv6=data.hcloud_ipv6,
)
