"""What a booted host is made from, built once and cached between runs: a debootstrap rootfs of
bookworm, and a local apt repository of the packages a deploy installs (see booted.py for how
sessions use them)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE_ENV = "BLUESKY_APPLIANCE_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/bluesky-appliance-test")
HOSTNAME = "appliance-test"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("systemd-sysv", "dbus", "openssh-server", "python3", "iproute2", "procps")
# Bump when a build step below changes what ends up in the rootfs or the repository.
RECIPE = 1


class HarnessError(RuntimeError):
    """The booted host could not be built, started or reached."""


def cache_dir() -> Path:
    """Where the rootfs and the apt repositories are kept between runs."""
    value = os.environ.get(CACHE_ENV, "")
    path = Path(value) if value else DEFAULT_CACHE
    if not path.is_absolute():
        raise HarnessError(f"{CACHE_ENV} must be an absolute path, got {value!r}")
    return path


def _run(
    args: Sequence[str],
    *,
    timeout: float = 600,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command; a failure raises with its output so the test log says what broke."""
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise HarnessError(
            f"{shlex.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's build lock (one builder across processes); drop a crashed build's files."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "build.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        for stale in cache.glob("build-*"):
            unmount(stale / "root")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"[booted] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Cached rootfs and local apt repository


def rootfs_key(base_packages: Sequence[str] = BASE_PACKAGES) -> str:
    """Hash of everything that goes into the rootfs."""
    return _digest(RECIPE, SUITE, MIRROR, SECURITY_MIRROR, sorted(base_packages), HOSTNAME)


def ensure_rootfs(cache: Path, base_packages: Sequence[str] = BASE_PACKAGES) -> Path:
    """Return the cached rootfs directory, debootstrapping it when missing.

    Nothing writes to it afterwards: every session boots an overlay with its own upper layer.
    """
    rootfs = cache / f"rootfs-{SUITE}-{rootfs_key(base_packages)}"
    if rootfs.is_dir():
        return rootfs
    with _build_lock(cache):
        if rootfs.is_dir():  # another session built it while we waited
            return rootfs
        _log(f"building {rootfs.name} with debootstrap (1-3 minutes)")
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-rootfs-") as tmp:
            root = Path(tmp) / "root"
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(base_packages)}",
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                timeout=1200,
            )
            _configure_rootfs(root)
            root.rename(rootfs)
    return rootfs


def _configure_rootfs(root: Path) -> None:
    """Settings every session shares; per-session keys and ids are written at boot."""
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    # The normal Debian sources, used only while building the repository; a booted session
    # replaces them with the local repository.
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()


def repo_key(rootfs: Path, packages: Sequence[str]) -> str:
    """Hash of the rootfs the repository extends and the package list it holds."""
    return _digest(RECIPE, rootfs.name, sorted(set(packages)))


def mount_overlay(lower: Path, base: Path) -> Path:
    """Mount a writable overlay of lower at base/root; its changes go to base/upper."""
    merged, upper, work = base / "root", base / "upper", base / "work"
    for path in (merged, upper, work):
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], timeout=30)
    return merged


def unmount(path: Path) -> None:
    if _run(["mountpoint", "-q", str(path)], check=False).returncode == 0:
        _run(["umount", str(path)], timeout=60)


def ensure_apt_repo(cache: Path, rootfs: Path, packages: Sequence[str]) -> Path:
    """Return the cached local apt repository holding packages and their dependencies."""
    for name in packages:
        if not name or not all(c.isalnum() or c in "+-.:=" for c in name):
            raise HarnessError(f"not a Debian package name: {name!r}")
    repo = cache / f"apt-{repo_key(rootfs, packages)}"
    if (repo / "Release").exists():
        return repo
    with _build_lock(cache):
        if (repo / "Release").exists():
            return repo
        _log(f"building local apt repository {repo.name} for {len(packages)} packages")
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-apt-") as tmp:
            partial = Path(tmp) / "repo"
            partial.mkdir(mode=0o755)
            root = mount_overlay(rootfs, Path(tmp))
            try:
                _download_debs(root, packages, partial)
            finally:
                unmount(root)
            index = _run(["apt-ftparchive", "packages", "."], timeout=300, cwd=partial)
            (partial / "Packages").write_text(index.stdout)
            release = _run(["apt-ftparchive", "release", "."], timeout=60, cwd=partial)
            (partial / "Release").write_text(release.stdout)
            partial.chmod(0o755)
            partial.rename(repo)
    return repo


def _download_debs(root: Path, packages: Sequence[str], into: Path) -> None:
    """Let apt in root resolve packages against Debian's sources and move the .debs into into."""
    # nspawn without --boot: host network, its own /proc and /dev, a copy of resolv.conf.
    script = (
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
        "apt-get install -y -qq --download-only --no-install-recommends "
        + shlex.join(sorted(set(packages)))
    )
    _run(
        [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--as-pid2",
            "--resolv-conf=copy-host",
            "--link-journal=no",
            f"--directory={root}",
            "sh",
            "-c",
            script,
        ],
        timeout=1500,
    )
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise HarnessError(f"apt downloaded nothing for {list(packages)}")
    for deb in debs:
        shutil.move(deb, into / deb.name)
