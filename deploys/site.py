"""Configure a host into the running, monitored appliance (over SSH; provisioning is separate).

    make wheelhouse
    pyinfra inventory/hosts.py deploys/site.py      # or inventory/hetzner.py

Reads the host's inventory data (defaults: inventory/group_data/all.py), validates it, and applies
the roles in order. Running it again changes nothing unless the code, the inventory or a package
changed; services restart only when something they use changed. The last step runs
`appliance doctor` on the host, so a deploy that leaves a broken server fails.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pyinfra import host

from deploys import checks
from deploys.data import (
    IDENTITY_PORT,
    SECRET_NAMES,
    SECRETS_DIR,
    InventoryError,
    site_data,
    supplied_secrets,
)
from deploys.wheelhouse import WheelhouseError, project_wheel, release_id
from roles.appliance import appliance
from roles.base import base, keep_secrets
from roles.firewall import firewall
from roles.grafana import PORT as GRAFANA_PORT
from roles.grafana import grafana
from roles.monitoring import monitoring, scrape_targets
from roles.ops import SecretText
from roles.proxy import proxy
from roles.redis import redis
from roles.volume import volume

REPO = Path(__file__).resolve().parent.parent

try:
    site = site_data(host.data)
    supplied = supplied_secrets()
    wheel = project_wheel(REPO / site.wheelhouse)  # an absolute wheelhouse path stays as it is
except (InventoryError, WheelhouseError) as exc:
    raise SystemExit(f"{host.name}: {exc}") from None


def _secret(name: str, generate: bool = True) -> str | None:
    """The operator's value, else the host's, else (for a generated secret) a new one."""
    kept = host.get_fact(SecretText, path=f"{SECRETS_DIR}/{name}")
    value = supplied.get(name) or kept
    if value is None and generate:
        value = secrets.token_urlsafe(32)
    return value


secret = {name: str(_secret(name)) for name in SECRET_NAMES}
alert_credential = _secret("alert_credential", generate=False)
kept_secrets = dict(secret)
if alert_credential:
    kept_secrets["alert_credential"] = alert_credential

# Caddy serves these names; localhost lets `appliance doctor` on the host go through Caddy too.
site_names = list(dict.fromkeys([site.domain or host.name, *site.site_addresses, "localhost"]))
public_url = f"https://{site_names[0]}"

base(ssh_port=site.ssh_port, apt_cache_time=site.apt_cache_time)
keep_secrets(directory=SECRETS_DIR, values=kept_secrets)
volume(
    device=site.volume_device,
    mount_point=site.volume_mount,
    directories={site.parquet_dir: "appliance"},
)
firewall(
    admin_addresses=site.admin_ssh_addresses,
    ssh_port=site.ssh_port,
    public_tcp_ports=[80, 443],
)
redis(
    port=site.redis_port,
    password=secret["redis_password"],
    directory=site.redis_dir,
    maxmemory=site.redis_maxmemory,
    mount_point=site.volume_mount,
)
appliance(
    wheelhouse=str(wheel.parent),
    project_wheel=wheel.name,
    release=release_id(wheel),
    environment=site.appliance_environment(),
    secret_environment={
        "APPLIANCE_REDIS_PASSWORD": secret["redis_password"],
        "APPLIANCE_API_CURSOR_SECRET": secret["api_cursor_secret"],
    },
    data_dir=site.parquet_dir,
    mount_point=site.volume_mount,
    keep_releases=site.keep_releases,
)
monitoring(
    instance=host.name,
    targets=scrape_targets(
        ingest_port=site.ingest_port,
        batch_port=site.batch_port,
        api_port=site.api_port,
        identity_port=IDENTITY_PORT,
    ),
    retention=site.prometheus_retention,
    redis_port=site.redis_port,
    redis_password=secret["redis_password"],
    alertmanager=site.alert_receiver.template_variables(),
    alert_credential=alert_credential,
)
if site.grafana_enabled:
    grafana(
        key_fingerprint=site.grafana_apt_key_fingerprint,
        admin_password=secret["grafana_admin_password"],
        root_url=f"{public_url}/grafana/",
    )
proxy(
    site_names=site_names,
    domain=site.domain,
    acme_email=site.acme_email,
    api_port=site.api_port,
    grafana_port=GRAFANA_PORT if site.grafana_enabled else None,
    max_request_body=site.max_request_body,
)
checks.doctor(
    name="Check the whole appliance with `appliance doctor`",
    volume=bool(site.volume_device),
    urls=["https://localhost/ready"],
    prometheus="http://127.0.0.1:9090",
    wait_s=120,
)
