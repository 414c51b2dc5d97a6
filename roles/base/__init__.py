"""The base system: packages, unattended security upgrades, time sync, SSH hardening, the
`appliance` system user, and the secrets directory."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, server, systemd

from roles.ops import beside, secret_file

PACKAGES = [
    "ca-certificates",
    "chrony",
    "curl",
    "e2fsprogs",
    "python3-venv",
    "unattended-upgrades",
    "util-linux",
]
SSHD_DROPIN = "/etc/ssh/sshd_config.d/10-appliance.conf"
SERVICE_USER = "appliance"


@deploy("Prepare the base system")
def base(*, ssh_port: int, apt_cache_time: int) -> None:
    apt.update(name="Refresh the package index", cache_time=apt_cache_time)
    apt.packages(
        name="Install the base packages",
        packages=PACKAGES,
        no_recommends=True,
    )
    files.put(
        name="Turn on unattended security upgrades",
        src=beside(__file__, "20auto-upgrades"),
        dest="/etc/apt/apt.conf.d/20auto-upgrades",
        mode="644",
    )
    # chrony's unit needs CAP_SYS_TIME: in a container it is skipped (the container shares the
    # machine's clock), so there it is only enabled, never counted as "to start" on every run.
    in_container = host.get_fact(Command, "systemd-detect-virt --container || true") != "none"
    systemd.service(
        name="Keep the clock in sync with chrony"
        + (" (enabled only: a container keeps its machine's clock)" if in_container else ""),
        service="chrony",
        running=not in_container,
        enabled=True,
    )
    sshd = files.template(
        name="Allow SSH logins by key only",
        src=beside(__file__, "sshd.conf.j2"),
        dest=SSHD_DROPIN,
        mode="644",
        ssh_port=ssh_port,
    )
    server.shell(
        name="Check the SSH configuration before reloading it",
        commands=["sshd -t"],
        _if=sshd.did_change,
    )
    systemd.service(
        name="Reload sshd with the hardened configuration",
        service="ssh",
        running=True,
        reloaded=True,
        _if=sshd.did_change,
    )
    server.user(
        name="Add the appliance system user",
        user=SERVICE_USER,
        system=True,
        home="/var/lib/appliance",
        shell="/usr/sbin/nologin",
        ensure_home=False,
    )


@deploy("Keep the secrets on the host")
def keep_secrets(*, directory: str, values: dict[str, str]) -> None:
    """Write each secret to its own root-only file, so a later run finds the same values."""
    files.directory(
        name="Create the secrets directory, readable by root only",
        path=directory,
        user="root",
        group="root",
        mode="700",
    )
    for secret, value in sorted(values.items()):
        secret_file(
            name=f"Keep the secret {secret} on the host",
            dest=f"{directory}/{secret}",
            content=value,
        )
