"""`loadtest` command line: generate, record, serve, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Sequence

import loadtest.bench


def _bench_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(loadtest.bench.__path__))


def _cmd_bench(argv: Sequence[str]) -> int:
    names = _bench_names()
    parser = argparse.ArgumentParser(
        prog="loadtest bench",
        description="Run a benchmark; readable lines, then one JSON object on the last line.",
    )
    parser.add_argument("name", choices=names)
    if not argv or argv[0] not in names:  # `loadtest bench -h`, or an unknown name
        parser.parse_args(argv[:1])
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"loadtest.bench.{name}")
    sub = argparse.ArgumentParser(prog=f"loadtest bench {name}", description=module.__doc__)
    if hasattr(module, "add_arguments"):
        module.add_arguments(sub)
    args = sub.parse_args(rest)
    figures = module.run(args)
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True))
    return 0


# subcommand -> (module, help). Each module has add_arguments(parser) and main(args) -> int.
COMMANDS = {
    "generate": ("loadtest.firehose.command", "Write synthetic Jetstream events as JSON lines"),
    "serve": ("loadtest.jetstream_server", "Serve Jetstream v1 /subscribe over a websocket"),
    "record": ("loadtest.record", "Capture a live Jetstream into rotating zstd JSONL files"),
    "identity-replay": (
        "loadtest.identity_replay",
        "Replay with the identity worker on PLC fakes; print the share of posts with a handle",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(
        prog="loadtest",
        description="Synthetic firehose, Jetstream replay server and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    command = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.main)
    sub.add_parser("bench", help=f"Run a benchmark: {', '.join(_bench_names()) or 'none yet'}")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
