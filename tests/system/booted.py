"""A booted Debian 12 to deploy to over SSH: systemd-nspawn in a private network namespace.

What a system test gets (`boot_debian_host()`, or the `debian_host` fixture in conftest.py):

    host.address        the container's IPv4 (e.g. "10.231.0.2"), reachable from this machine only
    host.gateway        this machine's end of the veth pair (e.g. "10.231.0.1"): bind test servers
                        (a replay server, a fake API) here so the container can reach them
    host.ssh_user       "root"
    host.ssh_key        per-session ed25519 private key; its public half is root's authorized_keys
    host.ssh_port       22
    host.known_hosts    known_hosts file holding the container's per-session host keys
    host.volume_device  path INSIDE the container of the loop device standing in for the Hetzner
                        volume: /dev/disk/by-id/scsi-0HC_Volume_4242
    host.loop_device    the same device on this machine (e.g. /dev/loop3)
    host.apt_packages   the packages the local apt repository was built for
    host.ssh(cmd, check=True, timeout=120) -> CompletedProcess[str]   run a shell command inside
    host.reboot()       `systemctl reboot` inside, start the container again, wait until ready
    host.stop()         power off, remove netns, veth, loop device and the session's files
    host.pyinfra_args() the connection arguments for the `pyinfra` CLI (see below)
    host.timings        seconds spent per phase ("rootfs", "apt_repo", "boot", "reboot", ...)

"Ready" means sshd answers with the key and `systemctl is-system-running --wait` said running or
degraded (the state is kept in `host.system_state`).

How it is made (the rootfs and the apt repository are built and cached by images.py):

- Rootfs: `debootstrap --variant=minbase` of bookworm with BASE_PACKAGES, kept as a directory in
  the cache ($BLUESKY_APPLIANCE_TEST_CACHE, default /var/cache/bluesky-appliance-test), named by a
  hash of everything that went into it, built by the first session that misses it and never
  written afterwards. Every session boots an overlayfs over it with an empty upper layer of its own
  (instant, unlike extracting a copy), so a deploy always starts from a bare host.
- Local apt repository: the packages a deploy will install are resolved and downloaded
  (`apt-get install --download-only`, without Recommends) inside a throw-away overlay of the rootfs
  with Debian's normal sources, then indexed with apt-ftparchive; cached, keyed by the rootfs and
  the package list. The container sees it read-only at /srv/local-apt and it is its ONLY apt source
  (`deb [trusted=yes] file:/srv/local-apt ./`), so `apt-get update` / `apt-get install` work for
  real and offline. Packages already in the rootfs are not in the repository; installing them is a
  no-op that succeeds. Recommends are not in it: apt skips unavailable Recommends silently, so a
  deploy with or without `--no-install-recommends` installs the same set here.
- Network: a network namespace `bsat-N` with a veth pair (`bsat-N-h` on this machine, `eth0` in
  the namespace) on 10.231.N.0/30. No default route inside and no forwarding here: the container
  reaches this machine's gateway address and nothing else.
- Boot: `systemd-nspawn -b --register=no --keep-unit --network-namespace-path=/run/netns/bsat-N`
  with CAP_NET_ADMIN (nftables inside), the volume bound at its Hetzner-like path and the repo
  bound read-only. The console goes to `<session dir>/console.log`.
- Sessions: each takes a free slot N (a lock and a state file in <cache>/run/; a slot whose
  addresses are in use, e.g. by a session of another cache, is skipped) so several test runs on
  one machine do not clash; its files live in <cache>/run/slot-N. Leftovers of a crashed run (container process, overlay mount, netns, veth,
  loop device, files) are removed when a later session finds their slot unlocked. Set
  BLUESKY_APPLIANCE_TEST_KEEP=1 to keep a session's files (rootfs upper layer, console.log) after
  it stops.

pyinfra (3.10) against it, strict host key checking with the session's known_hosts:

    pyinfra <host.address> deploys/site.py -y --user root --key <host.ssh_key> \
        --data ssh_known_hosts_file=<host.known_hosts> --data ssh_strict_host_key_checking=yes

(`host.pyinfra_args()` returns exactly these arguments after the address.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tests.system.images import (
    BASE_PACKAGES,
    HOSTNAME,
    HarnessError,
    _log,
    _run,
    cache_dir,
    ensure_apt_repo,
    ensure_rootfs,
    mount_overlay,
    unmount,
)

KEEP_ENV = "BLUESKY_APPLIANCE_TEST_KEEP"

VOLUME_ID = 4242
VOLUME_PATH = f"/dev/disk/by-id/scsi-0HC_Volume_{VOLUME_ID}"
VOLUME_SIZE = 2 * 1024**3
REPO_MOUNT = "/srv/local-apt"
SUBNET = "10.231"  # slot N uses 10.231.N.0/30: .1 this machine, .2 the container
MAX_SLOTS = 64
NSPAWN_REBOOT_EXIT = 133  # systemd-nspawn's exit status when the container asked to reboot


# ---------------------------------------------------------------------------------------------
# Per-session slot: network names, addresses, files; leftovers of crashed runs


class Slot:
    """One concurrent session's names and addresses, held by an flock for its lifetime."""

    def __init__(self, cache: Path, index: int, lock: IO[str]) -> None:
        self.index = index
        self.lock = lock
        self.dir = cache / "run" / f"slot-{index}"  # the session's files (large: keep on disk)
        self.netns = f"bsat-{index}"
        self.veth_host = f"bsat-{index}-h"
        self.veth_container = f"bsat-{index}-c"
        self.gateway = f"{SUBNET}.{index}.1"
        self.address = f"{SUBNET}.{index}.2"
        self.state_file = cache / "run" / f"slot-{index}.json"

    def release(self) -> None:
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def _process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _clean_slot(slot: Slot) -> None:
    """Remove whatever a previous (crashed) session of this slot left behind."""
    if not slot.state_file.exists():
        if slot.dir.exists():  # the lock is ours, so nobody uses these files
            unmount(slot.dir / "root")
            shutil.rmtree(slot.dir)
        return
    state = json.loads(slot.state_file.read_text())
    workdir = Path(state["workdir"])
    rootfs = workdir / "root"
    pid = int(state.get("nspawn_pid", 0))
    cmdline = _process_cmdline(pid) if pid else []
    # Only a systemd-nspawn running this slot's rootfs is ours to stop.
    if cmdline and cmdline[0].endswith("systemd-nspawn") and f"--directory={rootfs}" in cmdline:
        _log(f"stopping leftover container of slot {slot.index} (pid {pid})")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            else:
                continue
            break
    _release_resources(slot, workdir, keep_files=False)


def _release_resources(slot: Slot, workdir: Path, *, keep_files: bool) -> None:
    """Remove network, loop device, overlay and files of the slot's session (in that order)."""
    _remove_network(slot)
    volume = workdir / "volume.img"
    if volume.exists():
        attached = _run(["losetup", "-j", str(volume), "-O", "NAME", "-n"], check=False)
        for device in attached.stdout.split():
            _run(["losetup", "-d", device], check=False)
    unmount(workdir / "root")
    if keep_files:
        _log(f"keeping {workdir} ({KEEP_ENV} is set)")
    elif workdir.exists():
        shutil.rmtree(workdir)
    slot.state_file.unlink(missing_ok=True)


def _remove_network(slot: Slot) -> None:
    if Path(f"/sys/class/net/{slot.veth_host}").exists():
        _run(["ip", "link", "del", slot.veth_host], check=False)
    if Path(f"/run/netns/{slot.netns}").exists():
        _run(["ip", "netns", "del", slot.netns], check=False)


def _address_in_use(slot: Slot) -> bool:
    """True when this machine already has an address or route in the slot's /30."""
    routes = _run(["ip", "-4", "route", "show", "to", "root", f"{SUBNET}.{slot.index}.0/30"])
    return bool(routes.stdout.strip())


def acquire_slot(cache: Path) -> Slot:
    """Take the first free slot, cleaning up the leftovers of every unlocked one on the way."""
    run_dir = cache / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen: Slot | None = None
    for index in range(MAX_SLOTS):
        handle = (run_dir / f"slot-{index}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # a live session holds it
            continue
        slot = Slot(cache, index, handle)
        _clean_slot(slot)
        if chosen is None and not _address_in_use(slot):
            chosen = slot
        else:
            slot.release()
    if chosen is None:
        raise HarnessError(f"no free slot among {MAX_SLOTS} under {run_dir}")
    return chosen


def _create_network(slot: Slot) -> None:
    """netns with eth0 = container address, veth peer on this machine = gateway; nothing else."""
    ns = slot.netns
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", slot.veth_host, "type", "veth", "peer", "name", slot.veth_container],
        ["ip", "link", "set", slot.veth_container, "netns", ns],
        ["ip", "-n", ns, "link", "set", slot.veth_container, "name", "eth0"],
        ["ip", "-n", ns, "addr", "add", f"{slot.address}/30", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{slot.gateway}/30", "dev", slot.veth_host],
        ["ip", "link", "set", slot.veth_host, "up"],
    ]
    for step in steps:
        _run(step, timeout=30)


# ---------------------------------------------------------------------------------------------
# The booted host


class BootedHost:
    """A Debian 12 container booted with systemd, reachable over SSH on a private veth link."""

    ssh_user = "root"
    ssh_port = 22
    volume_device = VOLUME_PATH

    def __init__(self, slot: Slot, repo: Path, packages: Sequence[str]) -> None:
        self._slot = slot
        self.address = slot.address
        self.gateway = slot.gateway
        self.workdir = slot.dir
        self.rootfs = slot.dir / "root"  # overlay: cached rootfs below, slot.dir/upper above
        self.ssh_key = slot.dir / "id_ed25519"
        self.known_hosts = slot.dir / "known_hosts"
        self.console_log = slot.dir / "console.log"
        self.repo = repo
        self.apt_packages = tuple(packages)
        self.loop_device = ""
        self.system_state = ""
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self._stopped = False

    # -- commands inside ---------------------------------------------------------------------

    def ssh_command(self, command: str, *, connect_timeout: float = 5) -> list[str]:
        """The ssh argv that runs command inside (no user config, strict host keys, no prompts)."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={connect_timeout:g}",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.ssh_port),
            f"{self.ssh_user}@{self.address}",
            command,
        ]

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside over SSH; check=True raises with its output on failure."""
        proc = subprocess.run(
            self.ssh_command(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise HarnessError(
                f"inside {self.address}: {command!r} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        return proc

    def pyinfra_args(self) -> list[str]:
        """Arguments after the inventory (the address) for the `pyinfra` CLI."""
        return [
            "--user",
            self.ssh_user,
            "--key",
            str(self.ssh_key),
            "--port",
            str(self.ssh_port),
            "--data",
            f"ssh_known_hosts_file={self.known_hosts}",
            "--data",
            "ssh_strict_host_key_checking=yes",
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    def prepare(self, rootfs: Path) -> None:
        """Fresh rootfs, per-session keys and ids, the volume, the network namespace."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True)
        self._save_state()
        mount_overlay(rootfs, self.workdir)
        root = self.rootfs
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        # Only the local repository: nothing else is reachable from inside anyway.
        (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{REPO_MOUNT} ./\n")
        (root / REPO_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
        # debootstrap copied this machine's resolver, unreachable from the private network.
        (root / "etc/resolv.conf").write_text("# no resolver on the test network\n")

        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "systest",
                "-f",
                str(self.ssh_key),
            ]
        )
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(self.ssh_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        # Fresh host keys per session, pinned in a known_hosts file: strict checking works.
        _run(["ssh-keygen", "-A", "-f", str(root)])
        lines = []
        for pub in sorted((root / "etc/ssh").glob("ssh_host_*_key.pub")):
            key_type, key_body = pub.read_text().split()[:2]
            lines.append(f"{self.address} {key_type} {key_body}\n")
        self.known_hosts.write_text("".join(lines))

        volume = self.workdir / "volume.img"
        with volume.open("wb") as handle:
            handle.truncate(VOLUME_SIZE)
        self.loop_device = _run(["losetup", "-f", "--show", str(volume)]).stdout.strip()
        if not self.loop_device.startswith("/dev/loop"):
            raise HarnessError(f"losetup gave {self.loop_device!r}")

        _create_network(self._slot)
        self._save_state()
        self.timings["prepare"] = time.monotonic() - started

    def _save_state(self) -> None:
        state: dict[str, Any] = {
            "workdir": str(self.workdir),
            "nspawn_pid": self._proc.pid if self._proc else 0,
            "loop_device": self.loop_device,
        }
        self._slot.state_file.write_text(json.dumps(state))

    def _nspawn_argv(self) -> list[str]:
        return [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--directory={self.rootfs}",
            f"--machine={HOSTNAME}",
            f"--network-namespace-path=/run/netns/{self._slot.netns}",
            "--capability=CAP_NET_ADMIN",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=read-only",
            f"--bind={self.loop_device}:{VOLUME_PATH}",
            f"--bind-ro={self.repo}:{REPO_MOUNT}",
        ]

    def start(self) -> None:
        """Boot the container and wait until it is ready."""
        started = time.monotonic()
        self._console = self.console_log.open("ab")
        self._proc = subprocess.Popen(
            self._nspawn_argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
        )
        self._save_state()
        self.wait_ready()
        self.timings.setdefault("boot", time.monotonic() - started)

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait until sshd accepts our key and systemd finished booting."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                raise HarnessError(
                    f"systemd-nspawn exited {code} while booting\n{self.console_tail()}"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.address} not ready after {timeout} s\n{self.console_tail()}"
                )
            try:
                proc = subprocess.run(
                    self.ssh_command("systemctl is-system-running --wait", connect_timeout=2),
                    capture_output=True,
                    text=True,
                    timeout=max(5.0, deadline - time.monotonic()),
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                continue
            state = proc.stdout.strip()
            if proc.returncode != 255 and state in ("running", "degraded"):
                self.system_state = state
                return
            if proc.returncode != 255 and state not in ("initializing", "starting"):
                raise HarnessError(f"system state {state!r} after boot\n{self.console_tail()}")
            time.sleep(0.2)

    def console_tail(self, lines: int = 40) -> str:
        if not self.console_log.exists():
            return ""
        text = self.console_log.read_text(errors="replace").splitlines()
        return "console:\n" + "\n".join(text[-lines:])

    def reboot(self, timeout: float = 120) -> None:
        """`systemctl reboot` inside; nspawn exits 133; boot the same rootfs again and wait."""
        if self._proc is None:
            raise HarnessError("reboot() of a host that is not running")
        started = time.monotonic()
        # The SSH session may be cut while systemd goes down; the exit code of nspawn tells.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ssh("systemctl reboot", check=False, timeout=30)
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"container did not go down in {timeout} s\n{self.console_tail()}"
            ) from exc
        if code != NSPAWN_REBOOT_EXIT:
            raise HarnessError(f"systemd-nspawn exited {code}, not {NSPAWN_REBOOT_EXIT} (reboot)")
        self._close_console()
        self.start()
        self.timings["reboot"] = time.monotonic() - started

    def _close_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def stop(self, timeout: float = 30) -> None:
        """Power off (SIGTERM to nspawn), then remove network, loop device and session files."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._proc is not None and self._proc.poll() is None:
                # systemd-nspawn turns SIGTERM into an orderly poweroff of the container.
                os.kill(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.kill(self._proc.pid, signal.SIGKILL)
                    self._proc.wait(10)
            self._close_console()
            _release_resources(self._slot, self.workdir, keep_files=bool(os.environ.get(KEEP_ENV)))
        finally:
            self._slot.release()


def boot_debian_host(
    packages: Sequence[str],
    *,
    cache: Path | None = None,
    base_packages: Sequence[str] = BASE_PACKAGES,
) -> BootedHost:
    """Build (or reuse) the rootfs and apt repository, then boot a fresh copy and wait for SSH."""
    for tool in (
        "debootstrap",
        "systemd-nspawn",
        "ip",
        "losetup",
        "ssh",
        "ssh-keygen",
        "apt-ftparchive",
    ):
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool} is missing: `make system-deps` installs it")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()
    rootfs = ensure_rootfs(cache, base_packages)
    timings["rootfs"] = time.monotonic() - started
    started = time.monotonic()
    repo = ensure_apt_repo(cache, rootfs, packages)
    timings["apt_repo"] = time.monotonic() - started
    slot = acquire_slot(cache)
    host = BootedHost(slot, repo, packages)
    host.timings.update(timings)
    try:
        host.prepare(rootfs)
        host.start()
    except BaseException:
        host.stop()
        raise
    _log(
        f"booted {host.address} ({host.system_state}) in slot {slot.index}: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in host.timings.items())
    )
    return host
