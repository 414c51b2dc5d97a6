"""Caddy in front of the API (and Grafana under /grafana/): HTTPS with a Let's Encrypt
certificate for the configured domain, or Caddy's internal CA without one; security headers and
a request size limit. The API and Grafana themselves listen on loopback only."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from roles.ops import beside

CADDYFILE = "/etc/caddy/Caddyfile"
PACKAGES = ["caddy"]


@deploy("Put Caddy in front of the API")
def proxy(
    *,
    site_names: list[str],
    domain: str,
    acme_email: str,
    api_port: int,
    grafana_port: int | None,
    max_request_body: str,
) -> None:
    if not site_names:
        raise ValueError("site_names is empty: Caddy needs a name or address to serve")
    apt.packages(name="Install Caddy", packages=PACKAGES, no_recommends=True)
    config = files.template(
        name="Write the Caddyfile",
        src=beside(__file__, "Caddyfile.j2"),
        dest=CADDYFILE,
        mode="644",
        site_names=site_names,
        domain=domain,
        acme_email=acme_email,
        api_port=api_port,
        grafana_port=grafana_port,
        max_request_body=max_request_body,
    )
    server.shell(
        name="Check the Caddyfile before Caddy loads it",
        commands=[f"caddy validate --adapter caddyfile --config {CADDYFILE}"],
        _if=config.did_change,
    )
    systemd.service(
        name="Run Caddy, reloaded only when its Caddyfile changed",
        service="caddy",
        running=True,
        enabled=True,
        reloaded=config.will_change,
    )
