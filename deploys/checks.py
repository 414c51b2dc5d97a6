"""Verification steps of the deploys: operations that check the host and change nothing."""

from __future__ import annotations

import shlex
from collections.abc import Generator
from typing import Any

from pyinfra import host, logger, state
from pyinfra.api import StringCommand, operation
from pyinfra.api.exceptions import OperationError


@operation()
def doctor(
    volume: bool, urls: list[str], prometheus: str, wait_s: int
) -> Generator[Any, None, None]:
    """Run `appliance doctor` on the host when the deploy executes; fail the deploy, naming the
    failing checks, when it does not pass. A check changes nothing, so it yields no command (a
    second run of the deploy still reports no changes)."""
    if not state.is_executing:
        return
    command = ["appliance", "doctor", "--wait", str(wait_s), "--insecure"]
    if volume:
        command.append("--volume")
    for url in urls:
        command += ["--url", url]
    command += ["--prometheus", prometheus]
    ok, output = host.run_shell_command(StringCommand(shlex.join(command)))
    lines = output.stdout_lines + output.stderr_lines
    if not ok:
        raise OperationError("appliance doctor failed:\n" + "\n".join(lines))
    for line in lines:  # the report is the point of this step: show it at any verbosity
        logger.info(f"{host.print_prefix}{line}")
    yield from ()
