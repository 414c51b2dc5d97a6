"""Narrowing a walk with the token indexes of the posts files it covers: the row groups (formats
2 and 3) or the rows (format 4 on, `query.postings`) that can hold a match, and whether the
postings say a search is rare enough to skip the walk's first window."""

from __future__ import annotations

import logging

import duckdb
import numpy as np
import pyarrow as pa

from appliance import metrics
from appliance.query import postings
from appliance.query.files import LiveFiles
from appliance.query.model import Filters
from appliance.query.planner import narrow_segments
from appliance.query.rows import RowReader
from appliance.query.snapshot import Segment
from appliance.store import textindex

log = logging.getLogger("appliance.query")

# A file's token index is used only when it rules out at least half of the file's row groups;
# a word that common fills a page from the first windows anyway.
INDEX_MAX_FRACTION = 0.5

# Kept segments; per file scanned within its candidate row groups, their time ranges; per file
# read row by row, its candidate rows.
Narrowed = tuple[list[Segment], dict[str, list[tuple[int, int]]], dict[str, np.ndarray]]


def _lookups(
    cur: duckdb.DuckDBPyConnection, filters: Filters, mention: str | None
) -> tuple[list[str], list[tuple[int, str]]]:
    """The text pieces of a search's terms and its filter keys (field, lower-case value)."""
    pieces = list(dict.fromkeys(p for term in filters.include for p in textindex.pieces(cur, term)))
    keys = [
        (field, value)
        for field, value in (
            (textindex.FIELD_LANG, filters.lang),
            *((textindex.FIELD_TAG, tag) for tag in filters.tags),  # each must match
            (textindex.FIELD_DOMAIN, filters.domain),
            (textindex.FIELD_MENTION, mention),
        )
        if value
    ]
    return pieces, keys


class Narrowing:
    """Token-index lookups for one engine's walks."""

    def __init__(self, files: LiveFiles, rows: RowReader, postings_: postings.Postings) -> None:
        self.files = files
        self.rows = rows
        self.postings = postings_

    def narrow(
        self,
        cur: duckdb.DuckDBPyConnection,
        segments: list[Segment],
        filters: Filters,
        author: str | None,
        mention: str | None,
    ) -> tuple[list[Segment], dict[str, list[tuple[int, int]]], dict[str, np.ndarray]] | None:
        """The segments left once token indexes rule row groups out; per narrowed file the time
        ranges of its candidate row groups; and per file whose index lists rows (format
        ROWS_FROM on) its candidate rows. None if no index applies.

        Text pieces and the author narrow through every valid index; the other filters' keys
        only through indexes of format FILTER_KEYS_FROM on (older files narrow without them).
        """
        pieces, keys = _lookups(cur, filters, mention)
        by_file: dict[str, list[Segment]] = {}
        for seg in segments:
            by_file.setdefault(seg.path, []).append(seg)
        formats = {p: self.files.index_format(p) for p in by_file}
        rowwise = [p for p, f in formats.items() if f >= textindex.ROWS_FROM]
        newer = [
            p for p, f in formats.items() if textindex.FILTER_KEYS_FROM <= f < textindex.ROWS_FROM
        ]
        older = [p for p, f in formats.items() if 0 < f < textindex.FILTER_KEYS_FROM]
        found: dict[str, set[int]] = {}
        exact: dict[str, np.ndarray] = {}
        try:
            if rowwise and (lookups := postings.keys_of(cur, pieces, author, keys)):
                exact = self._candidate_rows(cur, rowwise, lookups)
            for paths, lookup in ((newer, keys), (older, [])):
                if not paths or not (pieces or author or lookup):
                    continue  # terms of emoji or punctuation only: nothing to look up
                sidecars = {str(textindex.sidecar_path(p)): p for p in paths}
                looked = textindex.candidate_groups(cur, list(sidecars), pieces, author, lookup)
                if looked is None:
                    metrics.api_text_index.labels("not_selective").inc(len(paths))
                    continue
                found.update((sidecars[s], g) for s, g in looked.items())
        except duckdb.InterruptException:
            raise
        except (duckdb.Error, OSError, pa.ArrowException):
            metrics.api_text_index.labels("error").inc()
            log.exception("token index lookup failed; scanning instead")
            return None
        if not found and not exact:
            return None
        kept, restrict, outcome = narrow_segments(
            {p: segs for p, segs in by_file.items() if p not in exact},
            {p: self.files.row_groups(p) for p in by_file},
            found,
            max_fraction=INDEX_MAX_FRACTION,
        )
        # A file with candidate rows is read row by row, however many of its row groups hold
        # one: the walk reads a row group only when its rows are next in walk order, and reading
        # one costs less than scanning it. It keeps the segments of those row groups.
        for path, rows in exact.items():
            groups = set(self._groups_of(path, rows))
            number = {id(seg): g for g, seg in enumerate(self.files.row_groups(path))}
            kept.extend(seg for seg in by_file[path] if number.get(id(seg)) in groups)
            outcome["narrowed"] += 1
        for label, files in outcome.items():
            metrics.api_text_index.labels(label).inc(files)
        return kept, restrict, exact

    def density(
        self,
        cur: duckdb.DuckDBPyConnection,
        segments: list[Segment],
        filters: Filters,
        author: str | None,
        mention: str | None,
    ) -> float | None:
        """An upper bound of the share of the walk's rows that match, from the row postings of
        the files' indexes (format ROWS_FROM on, all of them): the rows the key that lists
        fewest lists, over the rows of the segments. None if unknown (older or missing indexes,
        no key to look up)."""
        paths = list(dict.fromkeys(seg.path for seg in segments))
        if not paths or any(self.files.index_format(p) < textindex.ROWS_FROM for p in paths):
            return None
        pieces, keys = _lookups(cur, filters, mention)
        lookups = postings.keys_of(cur, pieces, author, keys)
        if not lookups:
            return None
        try:
            fewest = self.postings.smallest(
                [str(textindex.sidecar_path(p)) for p in paths], lookups
            )
        except (OSError, pa.ArrowException):
            return None  # narrow() counts and logs it, if the walk gets there
        rows = sum(seg.rows for seg in segments)
        return fewest / rows if rows else None

    def _candidate_rows(
        self, cur: duckdb.DuckDBPyConnection, paths: list[str], lookups: list[postings.Key]
    ) -> dict[str, np.ndarray]:
        """Per file, its candidate rows from the row postings of its index (none if the keys
        are not selective: the files are then scanned)."""
        sidecars = {str(textindex.sidecar_path(p)): p for p in paths}
        found = self.postings.candidate_rows(list(sidecars), lookups)
        if found is None:
            metrics.api_text_index.labels("not_selective").inc(len(paths))
            return {}
        return {sidecars[s]: rows for s, rows in found.items()}

    def _groups_of(self, path: str, rows: np.ndarray) -> list[int]:
        """The row groups holding the given rows of a file."""
        bounds = self.rows.bounds(path)
        return np.unique(np.searchsorted(bounds, rows, side="right") - 1).tolist()
