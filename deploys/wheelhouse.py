"""The wheelhouse the site deploy uploads: the project's wheel and every dependency's, built on
the operator's machine (`make wheelhouse`), so the host installs with no package index."""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "bluesky_appliance"
REPO = Path(__file__).resolve().parent.parent


class WheelhouseError(RuntimeError):
    """The wheelhouse is missing or does not hold exactly one project wheel."""


def project_wheel(wheelhouse: Path) -> Path:
    """The one wheel of this project in `wheelhouse`."""
    if not wheelhouse.is_dir():
        raise WheelhouseError(f"no wheelhouse at {wheelhouse}: run `make wheelhouse` first")
    wheels = sorted(wheelhouse.glob(f"{PROJECT}-*.whl"))
    if len(wheels) != 1:
        raise WheelhouseError(
            f"{wheelhouse} holds {len(wheels)} {PROJECT} wheels, not one: run `make wheelhouse`"
        )
    return wheels[0]


def release_id(wheel: Path) -> str:
    """A release's name: a digest of the wheel's RECORD, the hashes of every file it installs.

    The same code gives the same release whenever and wherever the wheel was built (the zip's
    timestamps do not count); any change of code or metadata gives a new one."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        lines = sorted(archive.read(record).decode().splitlines())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


# The host: Debian 12's CPython. Wheels are chosen for it, not for the machine that builds the
# wheelhouse (which may be another Python, another OS): pip evaluates environment markers against
# its own interpreter, so a dependency needed only on the host's Python (e.g. redis's
# async-timeout on Python < 3.11.3) is found by evaluating the markers for the host here.
TARGET_PYTHON = "3.11.2"
TARGET_GLIBC_MINOR = 36


def target_environment(arch: str) -> dict[str, str]:
    """PEP 508 marker values of the host's interpreter."""
    return {
        "python_version": TARGET_PYTHON.rsplit(".", 1)[0],
        "python_full_version": TARGET_PYTHON,
        "implementation_name": "cpython",
        "implementation_version": TARGET_PYTHON,
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": arch,
    }


def _platform_args(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(TARGET_GLIBC_MINOR, 16, -1)]
    tags += [f"manylinux2014_{arch}"]
    if arch == "x86_64":
        tags += [f"manylinux_2_{minor}_{arch}" for minor in range(16, 4, -1)]
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    args = ["--only-binary=:all:", "--implementation", "cp", "--abi", "cp311"]
    args += ["--python-version", TARGET_PYTHON]
    for tag in tags:
        args += ["--platform", tag]
    return args


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.BytesParser().parsebytes(archive.read(name))


def missing_requirements(wheelhouse: Path, arch: str) -> list[Requirement]:
    """Requirements the host's interpreter needs that no wheel in `wheelhouse` satisfies."""
    environment = target_environment(arch)
    present: dict[str, Version] = {}
    requires: dict[str, list[Requirement]] = {}
    for wheel in wheelhouse.glob("*.whl"):
        meta = _metadata(wheel)
        name = canonicalize_name(meta["Name"])
        present[name] = Version(meta["Version"])
        requires[name] = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    wanted: dict[str, set[str]] = {canonicalize_name(PROJECT): {""}}
    missing: list[Requirement] = []
    todo = [canonicalize_name(PROJECT)]
    while todo:
        name = todo.pop()
        for requirement in requires.get(name, []):
            extras = wanted[name]
            marker = requirement.marker
            if marker and not any(marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            dep = canonicalize_name(requirement.name)
            version = present.get(dep)
            if version is None or version not in requirement.specifier:
                missing.append(requirement)
                continue
            new = {"", *requirement.extras} - wanted.get(dep, set())
            if new:
                wanted.setdefault(dep, set()).update(new)
                todo.append(dep)
    return missing


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"], check=True)


def build(wheelhouse: Path, arch: str = "x86_64", project: Path = REPO) -> Path:
    """Build the project's wheel and fetch every dependency's for the host (Debian 12, `arch`)
    into `wheelhouse`; return the project wheel. Wheels already there are reused."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for old in wheelhouse.glob(f"{PROJECT}-*.whl"):
        old.unlink()
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheelhouse), str(project))
    wheel = project_wheel(wheelhouse)
    platform = _platform_args(arch)
    _pip(
        "download",
        *platform,
        "--find-links",
        str(wheelhouse),
        "--dest",
        str(wheelhouse),
        str(wheel),
    )
    for _ in range(10):  # each round adds what the previous round's wheels need on the host
        missing = missing_requirements(wheelhouse, arch)
        if not missing:
            return wheel
        _pip(
            "download",
            *platform,
            "--find-links",
            str(wheelhouse),
            "--dest",
            str(wheelhouse),
            *(str(r).split(";")[0] for r in missing),
        )
    raise WheelhouseError(f"requirements still missing after 10 rounds: {missing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploys.wheelhouse",
        description="Build the wheelhouse the site deploy uploads (no package index on the host).",
    )
    parser.add_argument("directory", type=Path, help="where the wheels go, e.g. dist/wheelhouse")
    parser.add_argument(
        "--arch",
        default="x86_64",
        choices=["x86_64", "aarch64"],
        help="the host's CPU (Hetzner CX/CPX: x86_64, CAX: aarch64)",
    )
    args = parser.parse_args(argv)
    wheel = build(args.directory, args.arch)
    count = len(list(args.directory.glob("*.whl")))
    print(f"{args.directory}: {count} wheels; release {release_id(wheel)} ({wheel.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
