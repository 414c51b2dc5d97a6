"""Operations and facts the roles share, for files that hold secrets.

pyinfra's `files.put` and `files.template` print a file's contents with `--diff`; a file holding a
password must not. `secret_file` uploads like `files.put` (over SFTP, never on a command line),
compares by SHA-1 so a second run changes nothing, and never prints the contents.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Generator
from io import StringIO
from pathlib import Path
from typing import Any

import jinja2
from pyinfra import host
from pyinfra.api import FactBase, FileUploadCommand, operation
from pyinfra.facts.files import File, Sha1File

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def beside(module: str, name: str) -> str:
    """The path of a role's file `name`, next to the role's module (pass `__file__`)."""
    return str(Path(module).resolve().parent / name)


def render(template: str, **values: Any) -> str:
    """Render a role's template (a path below roles/) with exactly the values given."""
    return TEMPLATES.get_template(template).render(**values)


class SecretText(FactBase[str | None]):
    """The one-line contents of a secret file on the host, or None when it is absent."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f"if [ -s {quoted} ]; then cat {quoted}; fi"

    def process(self, output: list[str]) -> str | None:
        text = "\n".join(output).strip()
        return text or None


@operation()
def secret_file(
    dest: str, content: str, user: str = "root", group: str = "root", mode: str = "600"
) -> Generator[Any, None, None]:
    """Upload `content` to `dest` unless it is there already; never shown in any output."""
    digest = hashlib.sha1(content.encode()).hexdigest()
    if host.get_fact(Sha1File, path=dest) != digest:
        yield FileUploadCommand(
            StringIO(content), dest, remote_temp_filename=host.get_temp_filename(dest)
        )
        yield f"chown {shlex.quote(user)}:{shlex.quote(group)} {shlex.quote(dest)}"
        yield f"chmod {mode} {shlex.quote(dest)}"
        return
    info = host.get_fact(File, path=dest)
    if not info or info.get("user") != user or info.get("group") != group:
        yield f"chown {shlex.quote(user)}:{shlex.quote(group)} {shlex.quote(dest)}"
    if not info or str(info.get("mode")) != mode.lstrip("0"):
        yield f"chmod {mode} {shlex.quote(dest)}"
