"""`appliance` command line: one subcommand per service, all reading the same Settings."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from appliance import config


def _cmd_config(settings: config.Settings, args: argparse.Namespace) -> int:
    """Print the effective settings (secrets masked) and where each comes from."""
    if args.markdown:
        print(config.markdown_table())
        return 0
    if args.metrics_markdown:
        print(metrics_markdown_table())
        return 0
    values = config.masked(settings)
    width = max(len(name) for name, _, _ in config.describe())
    for env_name, help_text, default in config.describe():
        value = values[env_name.removeprefix(config.PREFIX).lower()]
        shown = ",".join(value) if isinstance(value, tuple) else value
        marker = " " if value == default else "*"
        print(f"{env_name:<{width}} {marker} {shown}")
        if args.verbose:
            print(f"{'':<{width}}     {help_text}")
    print("\n* = set from the environment or flags", file=sys.stderr)
    return 0


def metrics_markdown_table() -> str:
    """Every metric of every service as a Markdown table (docs/operations.md keeps a copy)."""
    from appliance import metrics  # prometheus_client only for this

    rows = ["| service | metric | type | labels | what |", "|---|---|---|---|---|"]
    for service, registry in (("ingester", metrics.INGEST), ("batcher", metrics.BATCH),
                              ("API", metrics.API), ("identity", metrics.IDENTITY)):  # fmt: skip
        found = []
        for collector in list(registry._collector_to_names):
            name = getattr(collector, "_name", None)
            kind = getattr(collector, "_type", None)
            if name is None or kind is None:
                continue
            shown = f"{name}_total" if kind == "counter" else name
            labels = ", ".join(getattr(collector, "_labelnames", ()))
            found.append((shown, kind, labels, getattr(collector, "_documentation", "")))
        for shown, kind, labels, text in sorted(found):
            rows.append(f"| {service} | `{shown}` | {kind} | {labels} | {text} |")
    return "\n".join(rows)


# subcommand -> (module, help). Each module has `main(settings, args) -> int`.
SERVICES = {
    "up": ("appliance.supervisor", "Run the whole stack: redis-server, ingester, batcher, API"),
    "ingest": ("appliance.ingest.command", "Jetstream websocket -> Redis Stream buffer"),
    "batch": ("appliance.batch.batcher", "Redis Stream buffer -> date-partitioned Parquet"),
    "compact": (
        "appliance.store.compact",
        "Merge a day's small Parquet files into large sorted ones",
    ),
    "serve": ("appliance.api.app", "The REST API over DuckDB"),
    "identity": (
        "appliance.identity.worker",
        "Resolve post authors' DIDs to verified handles in the background",
    ),
    "doctor": ("appliance.doctor", "Check an installed appliance end to end; name what fails"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen service's module is imported (sanic, duckdb load slowly)."""
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Bluesky post explorer appliance. Settings come from APPLIANCE_* variables; "
        "see `appliance config -v`. Flags override them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="Print the effective settings (secrets masked)")
    p.add_argument("-v", "--verbose", action="store_true", help="show each setting's help")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the defaults as the settings table of docs/operations.md",
    )
    p.add_argument(
        "--metrics-markdown", action="store_true", help="print every metric as the docs' table"
    )
    p.set_defaults(func=_cmd_config)
    for name, (module, help_text) in SERVICES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    # Flags declared with dest="set_<field>" override the matching setting.
    overrides = {
        key.removeprefix("set_"): value
        for key, value in vars(args).items()
        if key.startswith("set_") and value is not None
    }
    try:
        settings = config.load_settings(**overrides)
    except config.ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        code = int(args.func(settings, args) or 0)
        sys.stdout.flush()  # a pipe's buffer: the write that can fail happens here
        return code
    except BrokenPipeError:
        # The reader stopped early (`appliance config | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
