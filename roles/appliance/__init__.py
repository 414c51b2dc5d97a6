"""The appliance's own services: the code installed from an uploaded wheelhouse into one venv
per release (the previous releases kept for rollback), its settings, and a hardened systemd unit
each for the ingester, the batcher, the API and the identity worker."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from roles.ops import beside, secret_file

HOME = "/opt/appliance"
WHEELHOUSE = f"{HOME}/wheelhouse"
RELEASES = f"{HOME}/releases"
CURRENT = f"{HOME}/current"
ENV_FILE = "/etc/appliance/appliance.env"
SECRETS_ENV_FILE = "/etc/appliance/secrets.env"
# unit -> (appliance subcommand, what it is, seconds it may take to stop)
SERVICES = {
    "appliance-ingest": ("ingest", "Jetstream ingester", 30),
    "appliance-batch": ("batch", "Parquet batcher", 120),
    "appliance-api": ("serve", "REST API", 30),
    "appliance-identity": ("identity", "identity worker (DIDs to handles)", 30),
}


def env_file(environment: dict[str, str]) -> str:
    """An environment file both systemd and sh read the same way: each value single-quoted."""
    lines = ["# Managed by the appliance's pyinfra deploy (roles/appliance)."]
    for name, value in environment.items():
        bad = set(value) & set("'\\\n\r")
        if bad or not name.isidentifier():
            raise ValueError(f"{name}: a value may not contain quotes, backslashes or newlines")
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + "\n"


class Releases(FactBase[list[str]]):
    """Release directories under `path` that finished installing, newest first."""

    default = list

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f"ls -1t {quoted}/*/.installed 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.rsplit("/", 2)[-2] for line in output if line.endswith("/.installed")]


@deploy("Install and run the appliance services")
def appliance(
    *,
    wheelhouse: str,
    project_wheel: str,
    release: str,
    environment: dict[str, str],
    secret_environment: dict[str, str],
    data_dir: str,
    mount_point: str,
    keep_releases: int,
    user: str = "appliance",
) -> None:
    """Install release `release` (the project wheel `project_wheel` of `wheelhouse`), point
    `current` at it, and run the services; they restart only when something they use changed."""
    link = _install_release(wheelhouse=wheelhouse, project_wheel=project_wheel, release=release)
    env, secret_env = _settings(
        environment=environment, secret_environment=secret_environment, user=user
    )
    units = _units(user=user, data_dir=data_dir, mount_point=mount_point)
    shared_change = link.will_change or env.will_change or secret_env.will_change
    unit_change = any(u.will_change for u in units)
    for (unit, (_, what, _)), unit_op in zip(SERVICES.items(), units, strict=True):
        systemd.service(
            name=f"Run the {what}, restarted only when its code, settings or unit changed",
            service=f"{unit}.service",
            running=True,
            enabled=True,
            daemon_reload=unit_change,
            restarted=shared_change or unit_op.will_change,
        )
    _prune(release=release, keep_releases=keep_releases)


def _install_release(*, wheelhouse: str, project_wheel: str, release: str) -> OperationMeta:
    """The release's venv, installed from the uploaded wheelhouse once; `current` pointed at
    it. Returns the link operation."""
    files.directory(name="Create the appliance's home", path=HOME, mode="755")
    files.sync(
        name="Upload the wheelhouse (only wheels not on the host yet)",
        src=wheelhouse,
        dest=WHEELHOUSE,
        mode="644",
        dir_mode="755",
    )
    release_dir = f"{RELEASES}/{release}"
    if host.get_fact(File, path=f"{release_dir}/.installed") is None:
        venv = f"{release_dir}/venv"
        server.shell(
            name=f"Install release {release} into its own venv, from the wheelhouse only",
            commands=[
                f"rm -rf {release_dir}",
                f"python3 -m venv {venv}",
                f"{venv}/bin/pip install --quiet --no-index --find-links {WHEELHOUSE} "
                f"{WHEELHOUSE}/{shlex.quote(project_wheel)}",
                f"touch {release_dir}/.installed",
            ],
        )
    link = files.link(
        name=f"Make release {release} the current one",
        path=CURRENT,
        target=release_dir,
    )
    return link


def _settings(
    *, environment: dict[str, str], secret_environment: dict[str, str], user: str
) -> tuple[OperationMeta, OperationMeta]:
    """The services' settings files and the operators' commands. Returns the two file
    operations (plain and secret settings)."""
    files.directory(name="Create /etc/appliance", path="/etc/appliance", mode="755")
    env = files.put(
        name="Write the services' settings",
        src=StringIO(env_file(environment)),
        dest=ENV_FILE,
        user="root",
        group=user,
        mode="640",
    )
    secret_env = secret_file(
        name="Write the services' secret settings (never printed)",
        dest=SECRETS_ENV_FILE,
        content=env_file(secret_environment),
        user="root",
        group=user,
        mode="640",
    )
    files.template(
        name="Install the `appliance` command for operators (settings loaded, run as the service user)",
        src=beside(__file__, "appliance.sh.j2"),
        dest="/usr/local/bin/appliance",
        mode="755",
        current=CURRENT,
        service_user=user,
        env_files=[ENV_FILE, SECRETS_ENV_FILE],
    )
    files.template(
        name="Install `appliance-rollback`, which returns to the previous release",
        src=beside(__file__, "rollback.sh.j2"),
        dest="/usr/local/sbin/appliance-rollback",
        mode="755",
        releases=RELEASES,
        current=CURRENT,
        units=list(SERVICES),
    )
    return env, secret_env


def _units(*, user: str, data_dir: str, mount_point: str) -> list[OperationMeta]:
    """One hardened systemd unit per service, in the order of SERVICES."""
    units = []
    for unit, (command, what, stop_s) in SERVICES.items():
        units.append(
            files.template(
                name=f"Describe the {what} as the hardened unit {unit}",
                src=beside(__file__, "appliance.service.j2"),
                dest=f"/etc/systemd/system/{unit}.service",
                mode="644",
                description=what,
                command=command,
                stop_timeout_s=stop_s,
                service_user=user,
                current=CURRENT,
                env_files=[ENV_FILE, SECRETS_ENV_FILE],
                data_dir=data_dir,
                mount_point=mount_point,
            )
        )
    return units


def _prune(*, release: str, keep_releases: int) -> None:
    """Remove the releases beyond the newest `keep_releases` (never the one just installed)."""
    installed = host.get_fact(Releases, path=RELEASES)
    stale = [r for r in installed if r != release][max(keep_releases - 1, 0) :]
    if stale:
        server.shell(
            name=f"Remove {len(stale)} old release(s), keeping the newest {keep_releases}",
            commands=[f"rm -rf {RELEASES}/{shlex.quote(r)}" for r in stale],
        )
