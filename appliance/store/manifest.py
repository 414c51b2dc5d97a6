"""The manifest: which complete Parquet files are live, changed atomically under a lock.

Readers (the query engine) take the list of live files from <data_dir>/_manifest.json, not
from a glob, so a compaction swaps a partition's files in one atomic rename of the manifest:
a query that started on the old file set keeps reading files that still exist (replaced files
are deleted only after a grace period), and a new query sees only the new set. The version
number also keys the query cache: any batch or compaction bumps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from appliance.store.writer import fsync_dir

MANIFEST = "_manifest.json"
_LOCK = ".manifest.lock"


class Manifest(msgspec.Struct, kw_only=True):
    version: int = 0
    # table -> paths relative to data_dir ("posts/date=2026-07-04/<name>.parquet"), sorted
    files: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # files taken out of `files`, with the unix time they were retired; deleted after a grace
    retired: list[tuple[str, float]] = msgspec.field(default_factory=list)
    # what the last successful batch wrote (for /v1/stats): free-form, small
    last_batch: dict[str, Any] = msgspec.field(default_factory=dict)

    def table_files(self, table: str, days: Iterable[str] | None = None) -> list[str]:
        """Live files of a table, optionally only those of the given days."""
        paths = self.files.get(table, [])
        if days is None:
            return list(paths)
        wanted = {f"date={d}" for d in days}
        return [p for p in paths if p.split("/")[1] in wanted]


def read_manifest(data_dir: str | Path) -> Manifest:
    """The current manifest (an empty one before the first batch)."""
    try:
        raw = (Path(data_dir) / MANIFEST).read_bytes()
    except FileNotFoundError:
        return Manifest()
    return msgspec.json.decode(raw, type=Manifest)


@contextlib.contextmanager
def update_manifest(data_dir: str | Path) -> Iterator[Manifest]:
    """Lock, read, let the caller change, then atomically replace the manifest (version + 1).

    Writers (batcher, compactor) serialise on an flock; readers never lock.
    """
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(root)
        yield manifest
        manifest.version += 1
        for table in manifest.files:
            manifest.files[table] = sorted(set(manifest.files[table]))
        tmp = root / f".{MANIFEST}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.encode(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / MANIFEST)
        fsync_dir(root)
