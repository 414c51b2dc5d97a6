"""Delete the appliance's Hetzner Cloud resources; the data volume only when asked separately.

    HCLOUD_TOKEN=... pyinfra inventory/cloud.py deploys/teardown.py -y \\
        --data teardown_confirm=<appliance_name>
    # and, to delete the data volume as well:
        --data teardown_confirm=<appliance_name> --data teardown_volume=<appliance_name>

Without teardown_confirm naming the appliance, nothing is deleted. Deletes the server, the
firewall, the primary IPv4 and the SSH key it uploaded (only resources labelled
appliance=<appliance_name>); the volume stays, detached, with the data, unless teardown_volume
names the appliance too.
"""

from __future__ import annotations

from pyinfra import host

from deploys.data import InventoryError, provision_data
from roles.hetzner import teardown
from roles.hetzner.cloud import Cloud, CloudError, Names

try:
    data = provision_data(host.data)
    names = Names(appliance=data.appliance_name, ssh_key=data.ssh_key_name)
    confirm = str(host.data.get("teardown_confirm") or "")
    delete_volume = str(host.data.get("teardown_volume") or "")
    if confirm != names.appliance:
        raise InventoryError(
            f"nothing deleted; to delete {names.appliance}'s server, firewall, primary IP and "
            f"SSH key run again with --data teardown_confirm={names.appliance}"
        )
    if delete_volume and delete_volume != names.appliance:
        raise InventoryError(
            f"nothing deleted; teardown_volume={delete_volume!r} does not name this appliance: "
            f"to delete the data volume too, give --data teardown_volume={names.appliance}"
        )
    cloud = Cloud.from_environment(
        poll_interval_s=data.hcloud_poll_interval_s,
        rate_limit_wait_s=data.hcloud_rate_limit_wait_s,
    )
except (InventoryError, CloudError) as exc:
    raise SystemExit(f"teardown: {exc}") from None
teardown(cloud=cloud, names=names, delete_volume=bool(delete_volume))
if not delete_volume:
    host.log(
        f"Hetzner: the volume {names.volume} and its data are kept; to delete it too, run again "
        f"with --data teardown_volume={names.appliance}"
    )
