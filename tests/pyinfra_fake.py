"""Run the real deploy code with pyinfra's own machinery against its `@fake` connector.

Nothing touches a host: every command (facts and operations) is recorded and answered from a
table of canned outputs, and every uploaded file is captured, so tests can assert which
operations a role runs, what the files it writes say, and that no secret reaches a command line.
"""

from __future__ import annotations

import re
import runpy
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import IOBase
from pathlib import Path
from typing import Any

from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.operations import run_ops
from pyinfra.connectors.fake import FakeConnector
from pyinfra.context import ctx_host, ctx_state

REPO = Path(__file__).resolve().parent.parent

# What a bare Debian 12 host answers to the facts the roles read; anything else is empty output.
BARE_DEBIAN: dict[str | re.Pattern[str], Any] = {
    re.compile(r"date \+"): "2026-12-02T12:00:00+0000",
    "blkid -o value": "block",
    "uname -s": "Linux",
    "systemd-detect-virt --container": "none",
    re.compile(r"command -v (useradd|groupadd)(?! >)"): "/usr/sbin/useradd",
    "os-release": ["ID=debian", "VERSION_ID=12"],
}


@dataclass
class FakeRun:
    """What one run of deploy code did on the fake host."""

    state: State
    commands: list[str] = field(default_factory=list)
    uploads: dict[str, str] = field(default_factory=dict)

    @property
    def op_names(self) -> list[str]:
        """Every operation's name (its `name=`), in the order they ran."""
        order = self.state.get_op_order()
        return [next(iter(self.state.get_op_meta(h).names)) for h in order]

    @property
    def changes(self) -> int:
        host = next(iter(self.state.inventory))
        return self.state.get_meta_for_host(host).ops_change

    def uploaded(self, dest: str) -> str:
        assert dest in self.uploads, f"{dest} was not uploaded; uploads: {sorted(self.uploads)}"
        return self.uploads[dest]

    def everything_printed(self) -> str:
        """Every command line, operation name and operation argument pyinfra can show."""
        args = [a for h in self.state.get_op_order() for a in self.state.get_op_meta(h).args]
        return "\n".join([*self.commands, *self.op_names, *args])


def run_fake(
    target: Callable[..., Any] | Path,
    *,
    data: Mapping[str, Any],
    responses: Mapping[str | re.Pattern[str], Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    monkeypatch: Any,
) -> FakeRun:
    """Run a role function (with `kwargs`) or a deploy file against one fake host with `data`."""
    canned = dict(responses or {})  # the test's answers first: the first matcher wins
    for matcher, answer in BARE_DEBIAN.items():
        canned.setdefault(matcher, answer)
    host_data = {**data, "fake_responses": canned, "fake_delay": 0, "fake_delay_jitter": 0}
    inventory = Inventory((["@fake/site"], {}), appliance=(["@fake/site"], host_data))
    state = State(inventory=inventory, config=Config())
    run = FakeRun(state)

    original_run = FakeConnector.run_shell_command

    def record_command(self: FakeConnector, command: Any, *args: Any, **kw: Any) -> Any:
        text = command if isinstance(command, str) else command.get_raw_value()
        run.commands.append(text)
        return original_run(self, command, *args, **kw)

    def record_upload(self: FakeConnector, src: str | IOBase, dest: str, *a: Any, **k: Any) -> bool:
        if isinstance(src, str):
            run.uploads[dest] = Path(src).read_text(errors="replace")
        else:
            src.seek(0)
            body = src.read()
            run.uploads[dest] = body.decode(errors="replace") if isinstance(body, bytes) else body
        return True

    monkeypatch.setattr(FakeConnector, "run_shell_command", record_command)
    monkeypatch.setattr(FakeConnector, "put_file", record_upload)
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    connect_all(state)
    host = next(iter(inventory))
    with ctx_state.use(state), ctx_host.use(host):
        if isinstance(target, Path):
            runpy.run_path(str(target), run_name="__pyinfra_deploy__")
        else:
            target(**(kwargs or {}))
    run_ops(state)
    failed = state.failed_hosts
    assert not failed, f"the deploy failed on the fake host: {failed}"
    sys.modules.pop("deploys.site", None)
    return run


def group_defaults() -> dict[str, Any]:
    """inventory/group_data/all.py as a dict: every tunable with its default."""
    values = runpy.run_path(str(REPO / "inventory" / "group_data" / "all.py"))
    return {k: v for k, v in values.items() if not k.startswith("_")}


def make_wheelhouse(directory: Path, marker: str = "1") -> Path:
    """A wheelhouse with one tiny project wheel (its RECORD names the release) and one other."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "bluesky_appliance-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("appliance/__init__.py", f"# {marker}\n")
        archive.writestr(
            "bluesky_appliance-0.1.0.dist-info/RECORD", f"appliance/__init__.py,sha256={marker},4\n"
        )
    (directory / "msgspec-0.19.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"x")
    return directory
