"""The wheelhouse the site deploy uploads: the project's wheel and every dependency's, built on
the operator's machine (`make wheelhouse`), so the host installs with no package index."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

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


def build(wheelhouse: Path, project: Path = REPO) -> Path:
    """Build the project's wheel and every dependency's into `wheelhouse`; return the project
    wheel. Dependency wheels already there are reused; the project wheel is always rebuilt."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for old in wheelhouse.glob(f"{PROJECT}-*.whl"):
        old.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--find-links",
            str(wheelhouse),
            "--wheel-dir",
            str(wheelhouse),
            str(project),
        ],
        check=True,
    )
    return project_wheel(wheelhouse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploys.wheelhouse",
        description="Build the wheelhouse the site deploy uploads (no package index on the host).",
    )
    parser.add_argument("directory", type=Path, help="where the wheels go, e.g. dist/wheelhouse")
    args = parser.parse_args(argv)
    wheel = build(args.directory)
    count = len(list(args.directory.glob("*.whl")))
    print(f"{args.directory}: {count} wheels; release {release_id(wheel)} ({wheel.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
