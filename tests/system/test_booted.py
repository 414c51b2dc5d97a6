"""The harness itself: a booted Debian 12 reached over SSH, offline apt, the volume, reboots.

These tests use their own host (module scope) so that `debian_host` stays bare for the deploy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.booted import REPO_MOUNT, VOLUME_PATH, BootedHost, acquire_slot
from tests.system.conftest import DEPLOY_PACKAGES
from tests.system.images import _run, cache_dir

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def host(boot_host: Callable[[], BootedHost]) -> Iterator[BootedHost]:
    booted = boot_host()
    yield booted
    booted.stop()


def test_boots_debian_12_reachable_over_ssh_on_a_private_link(host: BootedHost) -> None:
    assert host.system_state in ("running", "degraded")
    assert host.ssh("cat /etc/debian_version").stdout.startswith("12.")
    assert host.ssh("systemctl is-active ssh").stdout.strip() == "active"
    assert host.ssh("id -un").stdout.strip() == host.ssh_user
    # The container reaches this machine's end of the veth pair and nothing beyond it.
    routes = host.ssh("ip -4 route show").stdout
    assert "default" not in routes
    outside = host.ssh("ip route get 1.1.1.1", check=False)
    assert outside.returncode != 0
    assert "unreachable" in outside.stderr


def test_a_server_bound_on_the_gateway_is_reachable_from_inside(host: BootedHost) -> None:
    with socket.create_server((host.gateway, 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, peer = server.accept()
            with conn:
                conn.sendall(f"hello {peer[0]}".encode())

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        script = (
            "import socket; "
            f"s = socket.create_connection(({host.gateway!r}, {port}), timeout=10); "
            "print(s.recv(100).decode())"
        )
        out = host.ssh(f"python3 -c {script!r}", timeout=30).stdout.strip()
        thread.join(10)
    assert out == f"hello {host.address}"


def test_apt_installs_for_real_and_offline_from_the_local_repository(host: BootedHost) -> None:
    sources = host.ssh("cat /etc/apt/sources.list; ls /etc/apt/sources.list.d").stdout
    assert sources.strip() == f"deb [trusted=yes] file:{REPO_MOUNT} ./"
    host.ssh("apt-get update -q", timeout=120)
    policy = host.ssh("apt-cache policy nftables").stdout
    assert f"file:{REPO_MOUNT} ./ Packages" in policy
    host.ssh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables", timeout=300)
    assert host.ssh("dpkg-query -W -f '${Status}' nftables").stdout == "install ok installed"
    # The container runs its own firewall (CAP_NET_ADMIN in its private namespace): a drop
    # policy that admits SSH from the gateway only keeps this session reachable.
    ruleset = (
        "table inet systest {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
        "  iif lo accept\n  ct state established,related accept\n"
        f"  ip saddr {host.gateway} tcp dport 22 ct state new limit rate 10/second accept\n"
        " }\n}\n"
    )
    host.ssh(f"nft -f - <<'EOF'\n{ruleset}EOF")
    assert "policy drop" in host.ssh("nft list ruleset").stdout
    host.ssh("nft delete table inet systest")
    # Packages already in the rootfs install as a no-op; anything outside the repo cannot.
    host.ssh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 python3")
    missing = host.ssh("apt-get install -y -q nginx-light", check=False)
    assert missing.returncode != 0


def test_volume_formats_mounts_by_unit_and_is_mounted_again_after_reboot(
    host: BootedHost,
) -> None:
    assert host.ssh(f"test -b {VOLUME_PATH} && echo block").stdout.strip() == "block"
    host.ssh(f"mkfs.ext4 -q -F -L appliance {VOLUME_PATH}", timeout=120)
    host.ssh(f"mount {VOLUME_PATH} /mnt && touch /mnt/probe && umount /mnt")
    unit = (
        "[Unit]\nDescription=Appliance data volume\n\n"
        f"[Mount]\nWhat={VOLUME_PATH}\nWhere=/srv/appliance\nType=ext4\nOptions=defaults,nofail\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    host.ssh(f"cat > /etc/systemd/system/srv-appliance.mount <<'EOF'\n{unit}EOF")
    host.ssh("systemctl daemon-reload && systemctl enable --now srv-appliance.mount")
    host.ssh("echo kept > /srv/appliance/marker && sync")
    # The host sees the filesystem the container made on the loop device.
    blkid = _run(["blkid", "-o", "value", "-s", "TYPE", host.loop_device])
    assert blkid.stdout.strip() == "ext4"

    host.reboot()

    assert host.system_state in ("running", "degraded")
    mounted = host.ssh("findmnt -n -o SOURCE,FSTYPE /srv/appliance").stdout.split()
    assert mounted == [VOLUME_PATH, "ext4"]
    assert host.ssh("cat /srv/appliance/marker").stdout.strip() == "kept"
    assert host.ssh("test -e /srv/appliance/probe && echo yes").stdout.strip() == "yes"
    assert host.ssh("systemctl is-active ssh").stdout.strip() == "active"


def test_pyinfra_connects_with_the_documented_arguments(host: BootedHost) -> None:
    pyinfra = Path(sys.executable).with_name("pyinfra")
    proc = subprocess.run(
        [str(pyinfra), host.address, *host.pyinfra_args(), "exec", "--", "cat /etc/debian_version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[{host.address}] 12." in proc.stdout + proc.stderr


CRASHING_SESSION = """
import json, os, sys
from tests.system.booted import boot_debian_host
host = boot_debian_host(json.loads(sys.argv[1]))
print(json.dumps({"slot": host._slot.index, "loop": host.loop_device,
                  "pid": host._proc.pid, "workdir": str(host.workdir)}), flush=True)
os._exit(1)  # die without stop(): container, netns, veth, loop device and files are left
"""


def test_a_crashed_session_is_cleaned_up_by_the_next_one() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SESSION, json.dumps(list(DEPLOY_PACKAGES))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout.strip(), f"the crashing session did not boot:\n{proc.stderr[-3000:]}"
    left = json.loads(proc.stdout.strip().splitlines()[-1])
    netns = Path(f"/run/netns/bsat-{left['slot']}")
    assert Path(f"/proc/{left['pid']}").exists()  # the container outlived its session
    assert netns.exists()

    slot = acquire_slot(cache_dir())
    slot.release()

    assert not Path(f"/proc/{left['pid']}").exists()
    assert not netns.exists()
    assert not Path(left["workdir"]).exists()
    attached = _run(["losetup", "-n", "-O", "BACK-FILE", left["loop"]], check=False)
    assert "volume.img" not in attached.stdout
