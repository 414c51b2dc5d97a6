"""A static inventory for any host reachable over SSH (a Hetzner server, another VPS, a test VM).

    APPLIANCE_HOSTS=203.0.113.10 pyinfra inventory/hosts.py deploys/site.py

APPLIANCE_HOSTS is a comma-separated list of addresses or names, each optionally `user@host` and
`host:port` (SSH user root and port 22 by default). Per-host data beyond the defaults of
inventory/group_data/all.py goes into a group_data file of your own, or copy this file and list
the hosts with their data as pyinfra inventories do: `appliance = [("203.0.113.10", {...})]`.
"""

import os
import re

_HOST = re.compile(
    r"^(?:(?P<user>[a-z_][a-z0-9_-]*)@)?(?P<host>[A-Za-z0-9.:-]+?)(?::(?P<port>\d+))?$"
)


def _hosts(spec: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _HOST.match(item)
        if match is None:
            raise SystemExit(
                f"inventory/hosts.py: APPLIANCE_HOSTS: {item!r} is not [user@]host[:port]"
            )
        data: dict[str, object] = {"ssh_user": match["user"] or "root"}
        if match["port"]:
            data["ssh_port"] = int(match["port"])
        out.append((match["host"], data))
    if not out:
        raise SystemExit(
            "inventory/hosts.py: APPLIANCE_HOSTS is empty: name the host(s) to deploy, "
            "e.g. make deploy HOSTS=203.0.113.10"
        )
    return out


appliance = _hosts(os.environ.get("APPLIANCE_HOSTS", ""))
