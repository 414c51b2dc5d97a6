"""A per-file token index for compacted posts files: which row groups can hold a word or author.

A search for a rare or absent word would otherwise decompress and match every day's text. The
compactor writes, beside each posts file `<name>.parquet`, a sidecar `<name>.tidx` (a Parquet file
no `*.parquet` glob matches) that maps

- every token of the lower-cased text (runs of letters and digits, `[\\p{L}\\p{N}]+`; in
  scripts written without spaces -- Han, kana, Thai, ... -- each character), and
- every author DID (a stable 64-bit hash of it: a collision only adds candidates), and
- the values the other filters compare with equality: each language tag and its `-` prefixes
  (`pt-br` gives `pt` and `pt-br`), each hashtag, each link host and its parent domains
  (`m.youtube.com` gives `youtube.com` and `com`), each mentioned DID (hashed), all lower-cased
  exactly as the filters lower them,

to the sorted list of the file's row groups that contain it. The query engine turns a search into
candidate row groups and reads only those (by their time_us ranges, which DuckDB prunes on).

Why the index can only narrow, never change, an answer: a row matches a term when lower(term) is
a substring of lower(text). Split lower(term) by the same rule into pieces; each piece is a run
of letters/digits (or one character of a spaceless script) inside lower(text), so it lies inside
one token of that row. The candidates
of a term are therefore the row groups of every token containing each piece (a substring scan of
the vocabulary), intersected over pieces, terms and the author. Classification is per code point
and DuckDB's lower() is per code point too, so a case-sensitive search (exact=true) uses the
lower-case index as a superset. A term without letters or digits (emoji, punctuation) gives no
piece and no narrowing. The exact predicate is applied to the candidate rows as before.

The filter keys narrow for the same reason: a row passes `lang=L` only if one of its language
tags, lower-cased, is L or starts with `L-`, so L is that tag or one of its `-` prefixes, a key
of the row's group; a row passes `domain=D` only if a host of its links is D or ends with `.D`, so
D is that host or one of its `.` suffixes; `tag` and `mention` are equalities on a list element.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from appliance.store.writer import fsync_dir

log = logging.getLogger("appliance.textindex")

SUFFIX = ".tidx"
FORMAT = "4"
# Token separators: everything but letters and digits (RE2 Unicode classes, as DuckDB runs them).
SEPARATORS = r"[^\p{L}\p{N}]+"
# Scripts written without spaces: each of their characters is a token of its own, or a
# Japanese post would be one huge token and the vocabulary as large as the text.
SINGLE_CHARS = r"([\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}])"
# DIDs are kept as a stable 64-bit hash (md5), sorted: a lookup reads one small row group.
DID_HASH = "(md5_number({}) >> 64)::UBIGINT"


def tokens_sql(expr: str) -> str:
    """SQL splitting the text expression `expr` into tokens, exactly as the index does."""
    spaced = f"regexp_replace(lower({expr}), '{SINGLE_CHARS}', ' \\1 ', 'g')"
    return f"regexp_split_to_array({spaced}, '{SEPARATORS}')"


FIELD_TOKEN = 0
MAX_ENTRIES_PER_FILE = 1000  # vocabulary entries a piece may match and still be looked up
FIELD_DID = 1
# Filter keys (format 3 on): equality lookups, like the DID.
FIELD_LANG = 2
FIELD_TAG = 3
FIELD_DOMAIN = 4
FIELD_MENTION = 5  # hashed like the author DID
KEY_FIELDS = frozenset({FIELD_LANG, FIELD_TAG, FIELD_DOMAIN})
HASH_FIELDS = frozenset({FIELD_DID, FIELD_MENTION})
# Formats a reader accepts; the filter keys exist from format 3 on (a format 2 index narrows by
# text and author only until its day is compacted again).
FILTER_KEYS_FROM = 3
# Row postings (`n`, `rows`) exist from format 4 on.
ROWS_FROM = 4
READABLE = frozenset({"2", "3", FORMAT})
# The host of a URI, lower-cased: the `domain` filter compares exactly this, so the index keys
# and the filter must use this one expression.
HOST_SQL = "lower(regexp_extract({u}, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?([^/?#:]+)', 1))"


def _prefixes_sql(value: str, sep: str, suffixes: bool = False) -> str:
    """SQL listing `value` and its parts cut at `sep`: prefixes (a-b-c: a, a-b, a-b-c) or
    suffixes (a.b.c: a.b.c, b.c, c)."""
    parts = f"string_split({value}, '{sep}')"
    cut = f"{parts}[i:]" if suffixes else f"{parts}[1:i]"
    return f"list_transform(range(1, len({parts}) + 1), lambda i: array_to_string({cut}, '{sep}'))"


# Per row: the keys of each filter field (lists; flattened and grouped by the index builder).
LANG_KEYS_SQL = (
    f"flatten(list_transform(coalesce(langs, []), lambda l: {_prefixes_sql('lower(l)', '-')}))"
)
TAG_KEYS_SQL = "list_transform(coalesce(tags, []), lambda t: lower(t))"
DOMAIN_KEYS_SQL = (
    "flatten(list_transform(list_filter(list_append(coalesce(links, []), external_uri), "
    "lambda u: u IS NOT NULL), "
    f"lambda u: {_prefixes_sql(HOST_SQL.format(u='u'), '.', suffixes=True)}))"
)


# Row groups of a sidecar: at most this many entries, or entries listing this many rows.
MAX_GROUP_ENTRIES = 4096
MAX_GROUP_POSTINGS = 65_536
# Per key: how many rows hold it, which rows (row numbers within the file, ascending), and the row
# groups they are in. Written with Parquet V2 encodings: the ascending row numbers take about 1.6
# bytes each (delta encoding) instead of 3.3.
_POSTINGS = (
    "count(*)::UINTEGER AS n, list(r ORDER BY r) AS rows, "
    "list_sort(list_distinct(list(g))) AS groups"
)


def sidecar_path(data_file: str | Path) -> Path:
    """The index of a data file: the same name with .tidx instead of .parquet."""
    path = Path(data_file)
    return path.with_name(path.name.removesuffix(".parquet") + SUFFIX)


def data_path(sidecar: str | Path) -> Path:
    """The data file an index belongs to."""
    path = Path(sidecar)
    return path.with_name(path.name.removesuffix(SUFFIX) + ".parquet")


@dataclass
class Built:
    path: Path
    bytes: int
    tokens: int
    seconds: float


def build(con: duckdb.DuckDBPyConnection, data_file: str | Path) -> Built:
    """Write the sidecar index of a posts file, atomically (temp name, fsync, rename, dir fsync).

    Run by the compactor for every posts file it writes (and by the query benchmark's store
    builder, so that it measures what production does). Uses the caller's DuckDB connection
    (its threads and memory limit).
    """
    began = time.perf_counter()
    data_file = Path(data_file)
    meta = pq.read_metadata(data_file)
    starts, acc = [], 0
    for i in range(meta.num_row_groups):
        starts.append(acc)
        acc += meta.row_group(i).num_rows
    final = sidecar_path(data_file)
    tmp = final.with_name(f".{final.name}.tmp")  # neither *.parquet nor *.tidx
    params: dict[str, Any] = {"file": str(data_file), "starts": starts or [0]}
    # Row number -> row group through an ASOF join on the groups' first rows.
    sql = f"""
            WITH grp AS (
                SELECT unnest(range(len($starts))) AS g, unnest($starts) AS start
            ),
            src AS (
                SELECT s.file_row_number::UINTEGER AS r, grp.g::USMALLINT AS g, s.text, s.did,
                       s.langs, s.tags, s.links, s.external_uri, s.mentions
                FROM read_parquet($file, file_row_number = true, hive_partitioning = false) s
                ASOF JOIN grp ON s.file_row_number >= grp.start
            ),
            tokens AS (
                SELECT DISTINCT r, g, unnest({tokens_sql("text")}) AS key
                FROM src WHERE text IS NOT NULL
            ),
            keyed AS (
                SELECT DISTINCT r, g, {FIELD_LANG} AS field, unnest({LANG_KEYS_SQL}) AS key
                FROM src
                UNION ALL
                SELECT DISTINCT r, g, {FIELD_TAG}, unnest({TAG_KEYS_SQL}) FROM src
                UNION ALL
                SELECT DISTINCT r, g, {FIELD_DOMAIN}, unnest({DOMAIN_KEYS_SQL}) FROM src
            ),
            mentioned AS (
                SELECT DISTINCT r, g, unnest(mentions) AS m FROM src
            )
            SELECT {FIELD_TOKEN}::UTINYINT AS field, key, NULL::UBIGINT AS h, {_POSTINGS}
            FROM tokens WHERE key <> '' GROUP BY key
            UNION ALL
            SELECT {FIELD_DID}::UTINYINT, NULL, {DID_HASH.format("did")}, {_POSTINGS}
            FROM src GROUP BY {DID_HASH.format("did")}
            UNION ALL
            SELECT field::UTINYINT, key, NULL, {_POSTINGS}
            FROM keyed WHERE key IS NOT NULL AND key <> '' GROUP BY field, key
            UNION ALL
            SELECT {FIELD_MENTION}::UTINYINT, NULL, {DID_HASH.format("m")}, {_POSTINGS}
            FROM mentioned WHERE m IS NOT NULL GROUP BY {DID_HASH.format("m")}
            ORDER BY field, key, h
    """
    if meta.num_row_groups > 65_535:
        raise ValueError(f"{data_file}: too many row groups for the index")
    try:
        table = con.sql(sql, params=params).to_arrow_table()
        write_sidecar(table, tmp, identity(data_file, meta))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    tokens = pq.read_metadata(final).num_rows
    return Built(final, final.stat().st_size, tokens, time.perf_counter() - began)


def write_sidecar(table: pa.Table, path: Path, kv: dict[str, str]) -> None:
    """Write an index table (sorted by field, key, h) to `path` and fsync it.

    A row group ends after MAX_GROUP_ENTRIES entries or once its entries list
    MAX_GROUP_POSTINGS rows, so a lookup of a rare key decompresses the postings of a few
    thousand rows, not those of the common keys beside it (a common key gets a group of its
    own). Row numbers are delta-encoded (ascending within an entry: about 1.6 bytes each).
    """
    counts = table.column("n").to_numpy()
    cuts, entries, postings = [0], 0, 0
    for i, n in enumerate(counts.tolist()):
        if entries and (entries >= MAX_GROUP_ENTRIES or postings + n > MAX_GROUP_POSTINGS):
            cuts.append(i)
            entries, postings = 0, 0
        entries += 1
        postings += n
    cuts.append(len(counts))
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in kv.items()})
    with pq.ParquetWriter(
        path,
        table.schema,
        compression="zstd",
        use_dictionary=["key"],
        column_encoding={"rows.list.element": "DELTA_BINARY_PACKED"},
        data_page_version="2.0",
        write_statistics=["field", "key", "h"],
    ) as writer:
        for a, b in itertools.pairwise(cuts):
            if b > a:
                writer.write_table(table.slice(a, b - a), row_group_size=b - a)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def identity(data_file: str | Path, meta: pq.FileMetaData | None = None) -> dict[str, str]:
    """What ties an index to its data file: name, size, rows, row groups, time_us range."""
    path = Path(data_file)
    meta = meta if meta is not None else pq.read_metadata(path)
    column = meta.schema.names.index("time_us")
    times = [
        (stats.min, stats.max)
        for i in range(meta.num_row_groups)
        if (stats := meta.row_group(i).column(column).statistics) is not None and stats.has_min_max
    ]
    return {
        "textindex": FORMAT,
        "file": "".join(c for c in path.name if c.isalnum() or c in "-_."),
        "bytes": str(path.stat().st_size),
        "rows": str(meta.num_rows),
        "row_groups": str(meta.num_row_groups),
        "time_us": f"{min(t[0] for t in times)}-{max(t[1] for t in times)}" if times else "",
    }


def valid_for(sidecar: str | Path, data_file: str | Path) -> bool:
    """True if the sidecar is a readable index of exactly this data file.

    Raises FileNotFoundError if there is no sidecar; False if it is unreadable, not an index, or
    the index of another (or an older) file.
    """
    return format_for(sidecar, data_file) is not None


def format_for(sidecar: str | Path, data_file: str | Path) -> int | None:
    """The format of the sidecar if it is a readable index of exactly this data file, else None.

    Raises FileNotFoundError if there is no sidecar.
    """
    try:
        kv = pq.read_metadata(sidecar).metadata or {}
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    version = kv.get(b"textindex", b"").decode(errors="replace")
    if version not in READABLE:
        return None
    want = identity(data_file)
    want.pop("textindex")
    if not all(kv.get(k.encode()) == v.encode() for k, v in want.items()):
        return None
    return int(version)


def pieces(con: duckdb.DuckDBPyConnection, term: str) -> list[str]:
    """The letter/digit runs of lower(term), split exactly as the index splits text."""
    rows = con.execute(
        f"SELECT list_filter({tokens_sql('$t')}, lambda x: x <> '')", {"t": term}
    ).fetchall()  # all: an unfinished result would block the connection's next use
    return list(rows[0][0]) if rows and rows[0][0] else []


def candidate_groups(
    con: duckdb.DuckDBPyConnection,
    sidecars: list[str],
    term_pieces: list[str],
    did: str | None = None,
    keys: Sequence[tuple[int, str]] = (),
) -> dict[str, set[int]] | None:
    """Row groups per sidecar that can hold a row containing every piece, by `did`, and with
    every (field, value) of `keys` (a DID for FIELD_MENTION, a lower-case key otherwise).

    A piece found in too many vocabulary entries (a letter or two, a common syllable) is left
    out: its groups would be nearly all, and collecting them costs more than it saves. Leaving a
    piece out only widens the candidates. None if nothing selective is left to look up.

    Tokens and keys are looked up in separate scans: each filters on `field` first, so DuckDB
    skips the rest of the (field, key)-sorted sidecar by its statistics, and an equality lookup
    reads a single row group per file. A sidecar with no candidate maps to an empty set. Filter
    keys exist only in indexes of format FILTER_KEYS_FROM on: give them only such sidecars.
    """
    lookups = [(FIELD_DID, did)] if did is not None else []
    lookups += [(f, v) for f, v in keys if v]
    if not term_pieces and not lookups:
        raise ValueError("nothing to look up")
    source = "read_parquet($files, filename = true, hive_partitioning = false)"
    found: list[dict[str, set[int]]] = []
    if term_pieces:
        term_pieces = _selective(con, sidecars, term_pieces)
    if not term_pieces and not lookups:
        return None
    if term_pieces:
        params: dict[str, Any] = {"files": sidecars}
        aggregates, any_piece = [], []
        for i, piece in enumerate(term_pieces):
            params[f"p{i}"] = piece
            any_piece.append(f"contains(key, $p{i})")
            aggregates.append(f"flatten(list(groups) FILTER (WHERE contains(key, $p{i})))")
        sql = (
            f"SELECT filename, {', '.join(aggregates)} FROM {source} "
            f"WHERE field = {FIELD_TOKEN} AND ({' OR '.join(any_piece)}) GROUP BY filename"
        )
        found.append(_per_file(con.execute(sql, params).fetchall()))
    if lookups:
        found.extend(_equalities(con, source, sidecars, lookups))
    return {path: set.intersection(*(f.get(path, set()) for f in found)) for path in sidecars}


def _equalities(
    con: duckdb.DuckDBPyConnection, source: str, sidecars: list[str], lookups: list[tuple[int, str]]
) -> list[dict[str, set[int]]]:
    """Per lookup, filename -> the row groups holding that key (one scan, a branch each)."""
    params: dict[str, Any] = {"files": sidecars}
    branches = []
    for i, (field, value) in enumerate(lookups):
        if field not in HASH_FIELDS and field not in KEY_FIELDS:
            raise ValueError(f"not a key field: {field}")
        params[f"v{i}"] = value
        match = f"h = {DID_HASH.format(f'$v{i}')}" if field in HASH_FIELDS else f"key = $v{i}"
        branches.append(
            f"SELECT {i} AS i, filename, groups FROM {source} WHERE field = {field} AND {match}"
        )
    out: list[dict[str, set[int]]] = [{} for _ in lookups]
    for i, filename, groups in con.execute(" UNION ALL ".join(branches), params).fetchall():
        out[i].setdefault(filename, set()).update(groups or ())
    return out


def _selective(con: duckdb.DuckDBPyConnection, sidecars: list[str], pieces: list[str]) -> list[str]:
    """The pieces that match at most MAX_ENTRIES_PER_FILE vocabulary entries per file."""
    params: dict[str, Any] = {"files": sidecars}
    counts = []
    for i, piece in enumerate(pieces):
        params[f"p{i}"] = piece
        counts.append(f"count(*) FILTER (WHERE contains(key, $p{i}))")
    sql = (
        f"SELECT {', '.join(counts)} FROM read_parquet($files, hive_partitioning = false) "
        f"WHERE field = {FIELD_TOKEN}"
    )
    row = con.execute(sql, params).fetchone()
    limit = MAX_ENTRIES_PER_FILE * len(sidecars)
    return [p for p, n in zip(pieces, row or (), strict=True) if n <= limit]


def _per_file(rows: list[tuple[Any, ...]]) -> dict[str, set[int]]:
    """filename -> the row groups holding every looked-up key (one list per key in a row)."""
    return {row[0]: set.intersection(*(set(g or ()) for g in row[1:])) for row in rows}
