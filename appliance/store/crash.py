"""Named crash points: where `APPLIANCE_BATCH_CRASH_AT` makes a writer SIGKILL itself.

Crash tests only. The batcher and the compactor both call `crash_point`, so it lives below them
in the store (the compactor used to import the batcher for it: a circle).
"""

from __future__ import annotations

import logging
import os
import signal

from appliance.config import Settings

log = logging.getLogger("appliance.batch")

CRASH_POINTS = (
    "before_write",  # the batch is transformed; no file written yet
    "mid_write",  # one file renamed, the next one half written under its temporary name
    "after_rename",  # every file renamed and fsynced; manifest not updated
    "after_manifest",  # files in the manifest; entries not acknowledged
    "compact_mid",  # compaction: one output file renamed, manifest not swapped
    "compact_after_swap",  # compaction: manifest swapped, old files not yet deleted
)


def crash_point(settings: Settings, name: str) -> None:
    """SIGKILL this process if the tests asked for a crash at `name` (no cleanup runs)."""
    if settings.batch_crash_at == name:
        log.warning("crashing on purpose", extra={"crash_point": name})
        os.kill(os.getpid(), signal.SIGKILL)
