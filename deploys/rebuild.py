"""Rebuild the appliance's Hetzner server from its image, keeping the data volume and the IP.

    HCLOUD_TOKEN=... pyinfra inventory/cloud.py deploys/rebuild.py -y
    ssh-keygen -R <server address>          # the rebuilt server has new host keys
    make deploy INVENTORY=inventory/hetzner.py

(`make rebuild` runs the three.) The server's disk is replaced by a fresh hcloud_image; the
volume stays attached with its filesystem and data, the primary IPv4 stays. The site deploy
then configures the bare server again and mounts the volume without formatting it.
"""

from __future__ import annotations

from pyinfra import host

from deploys.data import InventoryError, provision_data
from roles.hetzner import rebuild
from roles.hetzner.cloud import Cloud, CloudError, Names

try:
    data = provision_data(host.data)
    names = Names(appliance=data.appliance_name, ssh_key=data.ssh_key_name)
    cloud = Cloud.from_environment(
        poll_interval_s=data.hcloud_poll_interval_s,
        rate_limit_wait_s=data.hcloud_rate_limit_wait_s,
    )
except (InventoryError, CloudError) as exc:
    raise SystemExit(f"rebuild: {exc}") from None
rebuild(
    cloud=cloud,
    names=names,
    image=data.hcloud_image,
    ssh_port=data.ssh_port,
    ssh_wait_s=data.rebuild_ssh_wait_s,
)
