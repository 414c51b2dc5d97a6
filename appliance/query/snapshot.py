"""The snapshot of live files a query runs on: the manifest's files by table and day, and the
row-group time ranges (segments) the planner places its windows with."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.store.manifest import Manifest


@dataclass(frozen=True)
class Segment:
    """A row group of a live file, with its time_us range (from Parquet statistics)."""

    path: str
    min_t: int
    max_t: int
    rows: int


@dataclass
class Snapshot:
    """The live files of one manifest version, grouped by table and day."""

    manifest: Manifest
    days: dict[str, dict[str, list[str]]]  # table -> day -> absolute paths

    @property
    def version(self) -> int:
        return self.manifest.version

    def files(
        self, table: str, first_day: str | None = None, last_day: str | None = None
    ) -> list[str]:
        by_day = self.days.get(table, {})
        return [
            path
            for day in sorted(by_day)
            if (first_day is None or day >= first_day) and (last_day is None or day <= last_day)
            for path in by_day[day]
        ]
