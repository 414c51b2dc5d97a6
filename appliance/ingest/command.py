"""`appliance ingest`: its options (which Jetstream URLs, collections and DIDs) and the process
around the `Ingester`: logging, the event loop, the signals that stop it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from appliance.config import Settings
from appliance.ingest.ingester import Ingester
from appliance.ingest.jetstream import SubscriptionError, validate_subscription
from appliance.logs import setup_logging


class _ExtendTuple(argparse.Action):
    """Repeatable flag; each value may also be comma-separated; the result is a tuple."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest) or ()
        parts = tuple(p.strip() for p in str(values).split(",") if p.strip())
        setattr(namespace, self.dest, (*current, *parts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        dest="set_jetstream_urls",
        action=_ExtendTuple,
        metavar="URL",
        help="Jetstream /subscribe URL (repeatable; overrides APPLIANCE_JETSTREAM_URLS)",
    )
    parser.add_argument(
        "--collections",
        dest="set_wanted_collections",
        action=_ExtendTuple,
        metavar="NSID[,NSID]",
        help="wantedCollections (repeatable or comma-separated; prefix.* allowed)",
    )
    parser.add_argument(
        "--dids",
        dest="set_wanted_dids",
        action=_ExtendTuple,
        metavar="DID[,DID]",
        help="wantedDids (repeatable or comma-separated)",
    )


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (it comes with sanic): cheaper socket reads per frame."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(settings: Settings, args: argparse.Namespace) -> int:
    """`appliance ingest`: run until SIGTERM/SIGINT; exit 0 once everything held is written."""
    setup_logging(settings.log_level, settings.log_format)
    try:
        validate_subscription(settings)
    except SubscriptionError as exc:
        print(f"appliance ingest: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        ingester = Ingester(settings)
        loop = runner.get_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, ingester.stop)
        return runner.run(ingester.run())
