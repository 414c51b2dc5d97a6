"""How a walk is planned, as pure functions of the row-group statistics and the tuning values the
engine passes in (how many rows the first window covers, how fast windows grow, when the token
indexes are worth consulting and when an index rules out enough of a file): the walk's time
range, its windows, and the row groups left once the indexes have been looked up."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterator

from appliance.query.model import Position
from appliance.query.snapshot import Segment


def walk_bounds(
    since_us: int | None, until_us: int | None, after: Position | None, latest: bool
) -> tuple[int | None, int | None]:
    """The time range [lo, hi) a walk covers: the filters' instants, moved up to a cursor's
    position (whose own instant stays in: rows of one time_us are ordered by uri)."""
    lo_bound, hi_bound = since_us, until_us
    if after is not None:
        if latest:
            hi_bound = after.time_us + 1 if hi_bound is None else min(hi_bound, after.time_us + 1)
        else:
            lo_bound = after.time_us if lo_bound is None else max(lo_bound, after.time_us)
    return lo_bound, hi_bound


def worth_narrowing(remaining: int, scanned: float, hits: int, *, narrow_rows: int) -> bool:
    """Whether the rest of a page, at the hit rate seen so far, needs more than `narrow_rows`
    rows: only then is a token-index lookup cheaper than walking on."""
    return remaining > 0 and (hits == 0 or remaining * scanned / hits > narrow_rows)


def narrow_segments(
    by_file: dict[str, list[Segment]],
    row_groups: dict[str, list[Segment]],
    groups: dict[str, set[int]],
    *,
    max_fraction: float,
) -> tuple[list[Segment], dict[str, list[tuple[int, int]]], collections.Counter[str]]:
    """The segments a walk keeps once token indexes named each file's candidate row groups.

    `by_file` holds the walk's segments per file, `row_groups` every row group of a file by
    number, `groups` the candidate row-group numbers per indexed file. A file keeps all its
    segments when it has no candidates or more than `max_fraction` of its row groups are
    candidates. Returns the kept segments, per narrowed file the time ranges of its candidate
    row groups (adjacent groups merged), and how many files were "narrowed" or "not_selective".
    """
    kept: list[Segment] = []
    restrict: dict[str, list[tuple[int, int]]] = {}
    outcome: collections.Counter[str] = collections.Counter()
    for path, segs in by_file.items():
        candidates = groups.get(path)
        every = row_groups.get(path, [])
        if candidates is None or len(candidates) > max_fraction * len(every):
            if candidates is not None:
                outcome["not_selective"] += 1
            kept.extend(segs)
            continue
        outcome["narrowed"] += 1
        wanted = {id(s) for s in segs}
        ranges: list[tuple[int, int]] = []
        previous = -2
        for g in sorted(candidates):
            if g >= len(every) or id(every[g]) not in wanted:
                continue
            seg = every[g]
            kept.append(seg)
            if g == previous + 1:  # adjacent row groups: one range
                ranges[-1] = (ranges[-1][0], seg.max_t)
            else:
                ranges.append((seg.min_t, seg.max_t))
            previous = g
        restrict[path] = ranges
    return kept, restrict, outcome


def next_target(
    target: float, remaining: int, scanned: float, hits: int, *, first_rows: int, growth: int
) -> float:
    """Rows the next window should cover: `growth`-fold, or less once matches have been seen.

    With a hit rate to go by, aim at the rows the rest of the page needs plus half again, so a
    page that is nearly full does not scan a window four times larger than the last.
    """
    grown = target * growth
    if hits == 0:
        return grown
    needed = remaining * scanned / hits * 1.5
    return min(grown, max(needed, first_rows))


class WindowPlanner:
    """Cuts the time range of a walk into disjoint windows [lo, hi), in walk order.

    Rows are assumed spread evenly over each row group's time range, which gives an estimate of
    the rows before any instant; each window's far edge is placed so that it holds the rows
    asked for. DuckDB applies the time bounds inside the scan, so a window narrower than a row
    group still spares the text matching of the rows outside it. A window larger than a couple of
    row groups ends on a row-group boundary, so no row group is decompressed twice.
    """

    def __init__(
        self, segments: list[Segment], latest: bool, lo_bound: int | None, hi_bound: int | None
    ) -> None:
        self.segments = segments
        self.latest = latest
        if not segments:
            self.lo_edge = self.hi_edge = self.edge = 0
            return
        self.lo_edge = min(s.min_t for s in segments) if lo_bound is None else lo_bound
        self.hi_edge = max(s.max_t for s in segments) + 1 if hi_bound is None else hi_bound
        self.estimate = RowEstimate(segments, self.lo_edge, min(self.hi_edge, 2**62))
        self.total = self.estimate.rows_before(self.hi_edge)
        self.done = 0.0  # estimated rows behind the current edge
        self.edge = self.hi_edge if latest else self.lo_edge
        # where windows may end to coincide with row groups; a typical row group's size
        starts = {s.min_t if latest else s.max_t + 1 for s in segments}
        self.boundaries = sorted(t for t in starts if self.lo_edge < t < self.hi_edge)
        self.group_rows = sorted(s.rows for s in segments)[len(segments) // 2]

    def next(self, rows: float) -> tuple[int, int, list[str], float] | None:
        """The next window, about `rows` rows wide: (lo, hi, files overlapping, estimated rows)."""
        if self.lo_edge >= self.hi_edge or self.edge == (
            self.lo_edge if self.latest else self.hi_edge
        ):
            return None
        wanted = self.done + max(rows, 1.0)
        if wanted >= self.total:
            far = self.lo_edge if self.latest else self.hi_edge
        else:
            # rows before an instant, counted from the walk's starting edge
            far = self.estimate.instant_with(self.total - wanted if self.latest else wanted)
            if rows >= 2 * self.group_rows:
                far = self._snap(far)
            far = max(far, self.lo_edge) if self.latest else min(far, self.hi_edge)
            if far == self.edge:  # narrower than a microsecond: take one
                far = self.edge - 1 if self.latest else self.edge + 1
        lo, hi = (far, self.edge) if self.latest else (self.edge, far)
        before = self.done
        self.done = (
            self.total - self.estimate.rows_before(far)
            if self.latest
            else self.estimate.rows_before(far)
        )
        self.edge = far
        files = list(dict.fromkeys(s.path for s in self.segments if s.max_t >= lo and s.min_t < hi))
        return lo, hi, files, self.done - before

    def rest(self, segments: list[Segment]) -> WindowPlanner:
        """A planner for the part of this walk not yet planned, over `segments` only."""
        if self.latest:
            return WindowPlanner(segments, True, self.lo_edge, self.edge)
        return WindowPlanner(segments, False, self.edge, self.hi_edge)

    def _snap(self, instant: int) -> int:
        """The row-group boundary nearest to instant that still moves the edge forward."""
        i = bisect.bisect_left(self.boundaries, instant)
        near = [b for b in self.boundaries[max(i - 1, 0) : i + 1]]
        if self.latest:
            near = [b for b in near if b < self.edge]
        else:
            near = [b for b in near if b > self.edge]
        return min(near, key=lambda b: abs(b - instant)) if near else instant


def windows(
    segments: list[Segment],
    latest: bool,
    lo_bound: int | None,
    hi_bound: int | None,
    *,
    first_rows: int,
    growth: int,
) -> Iterator[tuple[int, int, list[str]]]:
    """The windows of a walk that finds nothing: `growth`-fold from `first_rows` rows."""
    planner = WindowPlanner(segments, latest, lo_bound, hi_bound)
    target = float(first_rows)
    while (window := planner.next(target)) is not None:
        yield window[:3]
        target *= growth


class RowEstimate:
    """Estimated rows before an instant, from row-group time ranges (piecewise linear)."""

    def __init__(self, segments: list[Segment], lo: int, hi: int) -> None:
        changes: dict[int, float] = {lo: 0.0, hi: 0.0}
        for seg in segments:
            start, stop = seg.min_t, seg.max_t + 1
            density = seg.rows / (stop - start)
            start, stop = max(start, lo), min(stop, hi)
            if start >= stop:
                continue
            changes[start] = changes.get(start, 0.0) + density
            changes[stop] = changes.get(stop, 0.0) - density
        self.points = sorted(changes)
        self.rows: list[float] = []
        self.density: list[float] = []  # rows per microsecond after each point
        acc, density, previous = 0.0, 0.0, self.points[0]
        for point in self.points:
            acc += density * (point - previous)
            density += changes[point]
            self.rows.append(acc)
            self.density.append(density)
            previous = point

    def rows_before(self, instant: int) -> float:
        i = bisect.bisect_right(self.points, instant) - 1
        return self.rows[i] + self.density[i] * (instant - self.points[i])

    def instant_with(self, rows: float) -> int:
        """The earliest instant with about `rows` estimated rows before it."""
        i = max(bisect.bisect_left(self.rows, rows) - 1, 0)
        while i + 1 < len(self.points) and self.rows[i + 1] < rows:
            i += 1
        if self.density[i] <= 0:
            return self.points[min(i + 1, len(self.points) - 1)]
        return min(self.points[i] + int((rows - self.rows[i]) / self.density[i]), self.points[-1])
