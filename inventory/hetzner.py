"""The appliance's servers, listed from the Hetzner Cloud API by their label.

    HCLOUD_TOKEN=... pyinfra inventory/hetzner.py deploys/site.py

Every server labelled `appliance=<appliance_name>` (as deploys/provision.py labels them) becomes
a host, reached at its public IPv4 as root, with the device of its data volume (the one named
<appliance_name>-data attached to it) as `volume_device`. appliance_name is the one in
inventory/group_data/all.py, or APPLIANCE_NAME when set. HCLOUD_ENDPOINT points at another API
endpoint (a test server speaking the same JSON). The token is read from the environment only.
"""

import os
import runpy
from pathlib import Path

from hcloud import Client

_DEFAULTS = Path(__file__).resolve().parent / "group_data" / "all.py"
_NAME = os.environ.get("APPLIANCE_NAME") or str(runpy.run_path(str(_DEFAULTS))["appliance_name"])


def _servers() -> list[tuple[str, dict[str, object]]]:
    token = os.environ.get("HCLOUD_TOKEN")
    if not token:
        raise SystemExit("inventory/hetzner.py: set HCLOUD_TOKEN (a Hetzner Cloud API token)")
    endpoint = os.environ.get("HCLOUD_ENDPOINT", "https://api.hetzner.cloud/v1")
    client = Client(token=token, api_endpoint=endpoint, application_name=_NAME)
    selector = f"appliance={_NAME}"
    volumes = {
        volume.server.id: volume.linux_device
        for volume in client.volumes.get_all(label_selector=selector)
        if volume.server is not None and volume.name == f"{_NAME}-data"
    }
    hosts = []
    for server in client.servers.get_all(label_selector=selector):
        ipv4 = server.public_net.ipv4.ip if server.public_net and server.public_net.ipv4 else None
        if ipv4 is None:
            continue  # no public address: not reachable for the deploy
        data: dict[str, object] = {
            "ssh_user": "root",
            "hcloud_server": server.name,
            "hcloud_id": server.id,
        }
        if server.id in volumes:
            data["volume_device"] = volumes[server.id]
        hosts.append((ipv4, data))
    return hosts


appliance = _servers()
