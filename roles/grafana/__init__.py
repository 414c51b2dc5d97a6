"""Grafana from its own apt repository (signing key pinned by fingerprint), provisioned with the
repository's datasource and dashboards, the admin password from the secret, anonymous access
off, listening on loopback for Caddy to publish under /grafana/."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server, systemd

from roles.monitoring import MONITORING, PROMETHEUS_PORT
from roles.ops import beside, secret_file

KEY_URL = "https://apt.grafana.com/gpg.key"
KEYRING = "/etc/apt/keyrings/grafana.gpg"
REPO = f"deb [signed-by={KEYRING}] https://apt.grafana.com stable main"
PORT = 3000
# From Debian, to fetch and check the key of Grafana's own repository (grafana comes from there).
PACKAGES = ["gnupg", "curl", "ca-certificates"]
DASHBOARDS = "/var/lib/grafana/dashboards"
ADMIN_PASSWORD_FILE = "/etc/grafana/admin_password"


@deploy("Set up Grafana")
def grafana(*, key_fingerprint: str, admin_password: str, root_url: str) -> None:
    apt.packages(
        name="Install what fetches and checks Grafana's signing key",
        packages=PACKAGES,
        no_recommends=True,
    )
    if host.get_fact(File, path=KEYRING) is None:
        server.shell(
            name=f"Add Grafana's signing key, only if its fingerprint is {key_fingerprint}",
            commands=[
                "install -d -m 755 /etc/apt/keyrings",
                f"curl -fsSL {KEY_URL} -o /tmp/grafana.key",
                # --with-colons prints "fpr:::::::::<FINGERPRINT>:" for each key and subkey.
                "gpg --show-keys --with-colons /tmp/grafana.key | grep -q "
                f"'^fpr:*{key_fingerprint}:' || {{ echo 'Grafana key fingerprint mismatch' >&2; "
                "rm -f /tmp/grafana.key; exit 1; }",
                f"gpg --dearmor < /tmp/grafana.key > {KEYRING}.tmp && mv {KEYRING}.tmp {KEYRING}",
                "rm -f /tmp/grafana.key",
            ],
        )
    repo = apt.repo(name="Add Grafana's apt repository", src=REPO, filename="grafana")
    apt.update(name="Refresh the package index with Grafana's repository", _if=repo.did_change)
    apt.packages(name="Install Grafana", packages=["grafana"], no_recommends=True)
    password = secret_file(
        name="Give Grafana its admin password (never printed)",
        dest=ADMIN_PASSWORD_FILE,
        content=admin_password,
        group="grafana",
        mode="640",
    )
    provisioning = [
        files.put(
            name="Provision the Prometheus datasource",
            src=str(MONITORING / "grafana/provisioning/datasources/prometheus.yml"),
            dest="/etc/grafana/provisioning/datasources/appliance.yml",
            group="grafana",
            mode="640",
        ),
        files.put(
            name="Provision the dashboard folder",
            src=str(MONITORING / "grafana/provisioning/dashboards/appliance.yml"),
            dest="/etc/grafana/provisioning/dashboards/appliance.yml",
            group="grafana",
            mode="640",
        ),
    ]
    files.sync(
        name="Install the dashboards (Grafana picks up changes by itself)",
        src=str(MONITORING / "dashboards"),
        dest=DASHBOARDS,
        user="grafana",
        group="grafana",
        mode="644",
        dir_mode="755",
        delete=True,
    )
    dropin = files.template(
        name="Loopback only, served under /grafana/, no anonymous access, no sign-up",
        src=beside(__file__, "grafana-server.dropin.j2"),
        dest="/etc/systemd/system/grafana-server.service.d/appliance.conf",
        mode="644",
        port=PORT,
        root_url=root_url,
        admin_password_file=ADMIN_PASSWORD_FILE,
        prometheus_url=f"http://127.0.0.1:{PROMETHEUS_PORT}",
    )
    systemd.service(
        name="Run Grafana, restarted only when its settings or provisioning changed",
        service="grafana-server",
        running=True,
        enabled=True,
        daemon_reload=dropin.will_change,
        restarted=dropin.will_change
        or password.will_change
        or any(p.will_change for p in provisioning),
    )
