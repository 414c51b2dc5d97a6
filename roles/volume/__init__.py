"""The data volume: formatted only when it has no filesystem, mounted at the data root by a
systemd mount unit (by its stable /dev/disk/by-id path), with the appliance's directories."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server, systemd

from roles.ops import beside

FILESYSTEM = "ext4"


class BlockDevice(FactBase[dict[str, str | bool] | None]):
    """Whether `device` is a block device and which filesystem it carries ("" when none)."""

    def command(self, device: str) -> str:
        dev = shlex.quote(device)
        return (
            f"if [ -b {dev} ]; then printf 'block '; blkid -o value -s TYPE {dev} || true; "
            "else echo missing; fi"
        )

    def process(self, output: list[str]) -> dict[str, str | bool] | None:
        words = " ".join(output).split()
        if not words or words[0] != "block":
            return None
        return {"block": True, "fstype": words[1] if len(words) > 1 else ""}


def mount_unit_name(path: str) -> str:
    """systemd's name for the mount unit of `path` (what `systemd-escape -p --suffix=mount` says)."""
    parts = [p for p in path.strip("/").split("/") if p]
    escaped = []
    for part in parts:
        text = "".join(c if c.isalnum() or c in "_." else f"\\x{ord(c):02x}" for c in part)
        if text.startswith("."):
            text = "\\x2e" + text[1:]
        escaped.append(text)
    return "-".join(escaped) + ".mount"


@deploy("Mount the data volume")
def volume(*, device: str, mount_point: str, directories: dict[str, str]) -> None:
    """Mount `device` at `mount_point` (when a device is given), then make `directories`
    (path -> owner) below it."""
    if device:
        found = host.get_fact(BlockDevice, device=device)
        if found is None:
            raise DeployError(
                f"volume_device {device} is not a block device on {host.name}: is the volume "
                "attached (Hetzner: `hcloud volume attach`), and is its id right?"
            )
        fstype = str(found["fstype"])
        if fstype and fstype != FILESYSTEM:
            raise DeployError(
                f"volume_device {device} holds a {fstype} filesystem; this deploy mounts "
                f"{FILESYSTEM} and never reformats a volume that has data"
            )
        if not fstype:
            server.shell(
                name=f"Format the data volume with {FILESYSTEM} (it has no filesystem yet)",
                commands=[f"mkfs.{FILESYSTEM} -q -L appliance-data {shlex.quote(device)}"],
            )
        unit_name = mount_unit_name(mount_point)
        unit = files.template(
            name=f"Describe the mount of the data volume at {mount_point}",
            src=beside(__file__, "data.mount.j2"),
            dest=f"/etc/systemd/system/{unit_name}",
            mode="644",
            device=device,
            mount_point=mount_point,
            fstype=FILESYSTEM,
        )
        systemd.service(
            name="Mount the data volume now and at every boot",
            service=unit_name,
            running=True,
            enabled=True,
            daemon_reload=unit.will_change,
        )
    for path, owner in directories.items():
        files.directory(
            name=f"Create {path} for {owner}",
            path=path,
            user=owner,
            group=owner,
            mode="750",
        )
