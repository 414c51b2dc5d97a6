"""The part of a window a search reads row by row: files whose token index named the candidate
rows (`query.postings`). Their row groups are visited in walk order, a chunk of candidates at a
time; each chunk's rows are read (`query.rows.RowReader`) and filtered by the window's own SQL,
run by DuckDB over the rows read, so the answer is the one a scan of the files would give.

Row groups of different files may overlap in time. A chunk therefore takes, besides the groups it
needs, every later group whose time range overlaps the chunk's; a row is final once no group left
can hold a row before it in walk order, and rows not final yet wait for the next chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from appliance.query.model import Position
from appliance.query.rows import RowReader
from appliance.query.snapshot import Segment
from appliance.query.sql import TIME_US, URI, rows_sql

_VIEW = "_candidate_rows"


@dataclass(frozen=True)
class Group:
    """A row group of a file with the candidate rows (row numbers in the file) it holds."""

    path: str
    min_t: int
    max_t: int
    rows: np.ndarray


def window_groups(
    exact: dict[str, np.ndarray],
    files: list[str],
    segments_of: Callable[[str], list[Segment]],
    reader: RowReader,
    lo: int,
    hi: int,
    after: Position | None,
    latest: bool,
) -> list[Group]:
    """The row groups of `files` that hold candidates and may hold rows of the window [lo, hi)
    past the cursor's position, in walk order (newest first when `latest`)."""
    out: list[Group] = []
    for path in files:
        rows = exact.get(path)
        if rows is None or len(rows) == 0:
            continue
        segments = segments_of(path)
        bounds = reader.bounds(path)
        of_row = np.searchsorted(bounds, rows, side="right") - 1
        groups, firsts = np.unique(of_row, return_index=True)
        ends = np.append(firsts[1:], len(rows))
        for g, a, b in zip(groups.tolist(), firsts.tolist(), ends.tolist(), strict=True):
            seg = segments[g]
            if seg.max_t < lo or seg.min_t >= hi:
                continue
            if after is not None and (
                seg.min_t > after.time_us if latest else seg.max_t < after.time_us
            ):
                continue
            out.append(Group(path, seg.min_t, seg.max_t, rows[a:b]))
    out.sort(key=lambda g: -g.max_t if latest else g.min_t)
    return out


def _walk_key(row: tuple[Any, ...]) -> tuple[int, str]:
    return row[TIME_US], row[URI]


class ExactWindow:
    """Reads the candidate rows of one window that pass its filters, in walk order."""

    def __init__(
        self,
        cur: duckdb.DuckDBPyConnection,
        reader: RowReader,
        clauses: list[str],
        params: dict[str, Any],
        latest: bool,
    ) -> None:
        self.cur = cur
        self.reader = reader
        self.clauses = clauses
        self.params = params
        self.latest = latest
        self.rows_read = 0

    def first(
        self, groups: list[Group], lo: int, hi: int, after: Position | None, fetch: int
    ) -> list[tuple[Any, ...]]:
        """The first `fetch` rows of the groups that pass the filters in [lo, hi) past `after`."""
        latest = self.latest
        final: list[tuple[Any, ...]] = []
        pending: list[tuple[Any, ...]] = []
        chunk = fetch + fetch // 2 + 8
        i = 0
        while i < len(groups) and len(final) < fetch:
            j, taken = i, 0
            while j < len(groups) and (taken < chunk or j == i):
                taken += len(groups[j].rows)
                j += 1
            j = _close_overlaps(groups, i, j, latest)
            rows = self._filtered(groups[i:j], lo, hi, after)
            pending = sorted([*pending, *rows], key=_walk_key, reverse=latest)
            if j == len(groups):
                final.extend(pending)
                pending = []
            else:
                edge = groups[j].max_t if latest else groups[j].min_t  # no later row beyond it
                done = [r for r in pending if (r[TIME_US] > edge if latest else r[TIME_US] < edge)]
                final.extend(done)
                pending = pending[len(done) :]
            i = j
        return final[:fetch]

    def _filtered(
        self, groups: list[Group], lo: int, hi: int, after: Position | None
    ) -> list[tuple[Any, ...]]:
        by_file: dict[str, list[np.ndarray]] = {}
        for g in groups:
            by_file.setdefault(g.path, []).append(g.rows)
        tables = []
        for path, parts in by_file.items():
            rows = np.sort(np.concatenate(parts))
            self.rows_read += len(rows)
            tables.append(self.reader.read(path, rows))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        sql, bound = rows_sql(_VIEW, self.clauses, self.params, lo, hi, after, self.latest)
        self.cur.register(_VIEW, table)
        try:
            return self.cur.execute(sql, bound).fetchall()
        finally:
            self.cur.unregister(_VIEW)


def _close_overlaps(groups: list[Group], i: int, j: int, latest: bool) -> int:
    """Extend groups[i:j] by every later group overlapping its time span; the new end."""
    if latest:
        span = min(g.min_t for g in groups[i:j])
        while j < len(groups) and groups[j].max_t >= span:
            span = min(span, groups[j].min_t)
            j += 1
    else:
        span = max(g.max_t for g in groups[i:j])
        while j < len(groups) and groups[j].min_t <= span:
            span = max(span, groups[j].max_t)
            j += 1
    return j
