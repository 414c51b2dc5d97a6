"""The appliance's servers, listed from the Hetzner Cloud API by their label.

    HCLOUD_TOKEN=... pyinfra inventory/hetzner.py deploys/site.py

Every server labelled `appliance=<appliance_name>` (as deploys/provision.py labels them) becomes
a host, reached at its public IPv4 as root. HCLOUD_ENDPOINT points at another API endpoint (a test
server speaking the same JSON). The token is read from the environment only.
"""

import os

from hcloud import Client

_NAME = os.environ.get("APPLIANCE_NAME", "bluesky-appliance")


def _servers() -> list[tuple[str, dict[str, object]]]:
    token = os.environ.get("HCLOUD_TOKEN")
    if not token:
        raise SystemExit("inventory/hetzner.py: set HCLOUD_TOKEN (a Hetzner Cloud API token)")
    endpoint = os.environ.get("HCLOUD_ENDPOINT", "https://api.hetzner.cloud/v1")
    client = Client(token=token, api_endpoint=endpoint, application_name=_NAME)
    hosts = []
    for server in client.servers.get_all(label_selector=f"appliance={_NAME}"):
        ipv4 = server.public_net.ipv4.ip if server.public_net and server.public_net.ipv4 else None
        if ipv4 is None:
            continue  # no public address: not reachable for the deploy
        hosts.append(
            (ipv4, {"ssh_user": "root", "hcloud_server": server.name, "hcloud_id": server.id})
        )
    return hosts


appliance = _servers()
