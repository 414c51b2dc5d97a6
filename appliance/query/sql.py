"""The SQL of a search: candidate-row columns, filter clauses (values only as bound
parameters), and the conversion of a candidate row to a `Post`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.query.model import Filters, Position, Post
from appliance.store import layout, textindex

# The uri is not stored: it is derived from did and rkey (`layout.uri_sql`), everywhere the
# same way, so the keyset order, cursors and the visibility index's hash(uri) agree.
POST_URI = layout.uri_sql("posts")
# Candidate rows are tuples in this column order; the visibility index keys on hash(uri).
COLUMNS = (
    f"{POST_URI} AS uri, did, rev, time_us, epoch_us(created_at) AS created_us, text, langs, "
    "reply_parent, reply_root, quote_uri, embed_kind, external_uri, links, mentions, tags, "
    f"cid, hash({POST_URI}) AS h, hash(did) AS dh"
)
URI, DID, REV, TIME_US, URI_HASH, DID_HASH = 0, 1, 2, 3, 16, 17
_HOST = textindex.HOST_SQL  # the token index keys domains by this same expression


def _text_clause(term_param: str, exact: bool) -> str:
    # contains() is a plain substring test: %, _ and \ in a term match themselves, no escaping.
    if exact:
        return f"contains(text, {term_param})"
    return f"contains(lower(text), lower({term_param}))"


def filter_sql(
    filters: Filters, author_did: str | None, mention_did: str | None
) -> tuple[list[str], dict[str, Any]]:
    """WHERE conjuncts and their bound parameters for the filters (time bounds excluded).

    Every user value is a named parameter; the SQL text depends only on which filters are set.
    """
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for i, term in enumerate(filters.include):
        params[f"inc{i}"] = term
        clauses.append(_text_clause(f"$inc{i}", filters.exact))
    for i, term in enumerate(filters.exclude):
        params[f"exc{i}"] = term
        clauses.append(f"NOT coalesce({_text_clause(f'$exc{i}', filters.exact)}, false)")
    if author_did is not None:
        params["author"] = author_did
        clauses.append("did = $author")
    if mention_did is not None:
        params["mention"] = mention_did
        clauses.append("list_contains(mentions, $mention)")
    if filters.lang is not None:
        params["lang"], params["lang_prefix"] = filters.lang, filters.lang + "-"
        clauses.append(
            "len(list_filter(langs, lambda x: lower(x) = $lang "
            "OR starts_with(lower(x), $lang_prefix))) > 0"
        )
    for i, tag in enumerate(filters.tags):
        params[f"tag{i}"] = tag
        clauses.append(f"list_contains(list_transform(tags, lambda x: lower(x)), $tag{i})")
    if filters.url is not None:
        params["url"] = filters.url
        clauses.append("(external_uri = $url OR list_contains(links, $url))")
    if filters.domain is not None:
        params["domain"], params["subdomain"] = filters.domain, "." + filters.domain
        host = _HOST.format(u="x")
        # the cheap substring test first; the host parse only for rows that pass it
        clauses.append(
            "(contains(lower(coalesce(external_uri, '')), $domain) "
            "OR contains(lower(array_to_string(links, ' ')), $domain))"
        )
        clauses.append(
            "len(list_filter(list_append(coalesce(links, []), external_uri), "
            f"lambda x: {host} = $domain OR ends_with({host}, $subdomain))) > 0"
        )
    return clauses, params


def row_to_post(row: Sequence[Any]) -> Post:
    (uri, did, _rev, time_us, created_us, text, langs, parent, root, quote, embed, external,
     links, mentions, tags, cid, _hash, _did_hash) = row  # fmt: skip
    return Post(
        uri=uri,
        did=did,
        cid=cid,
        text=text,
        created_at=utc(created_us) if created_us is not None else None,
        indexed_at=utc(time_us),
        langs=langs or [],
        reply_parent=parent,
        reply_root=root,
        quote=quote,
        embed_kind=embed,
        external_uri=external,
        links=links or [],
        mentions=mentions or [],
        tags=tags or [],
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def window_where(
    clauses: list[str],
    params: dict[str, Any],
    lo: int,
    hi: int,
    after: Position | None,
    latest: bool,
) -> tuple[list[str], dict[str, Any]]:
    """The WHERE conjuncts of a window [lo, hi) past a cursor's position, and their parameters."""
    where = ["time_us >= $lo", "time_us < $hi", *clauses]
    bound = dict(params, lo=lo, hi=hi)
    if after is not None:
        op = "<" if latest else ">"
        where.append(f"(time_us {op} $kt OR (time_us = $kt AND {POST_URI} {op} $ku))")
        bound.update(kt=after.time_us, ku=after.uri)
    return where, bound


def order_sql(latest: bool) -> str:
    order = "DESC" if latest else "ASC"
    return f"ORDER BY time_us {order}, {POST_URI} {order}"


def rows_sql(
    source: str,
    clauses: list[str],
    params: dict[str, Any],
    lo: int,
    hi: int,
    after: Position | None,
    latest: bool,
) -> tuple[str, dict[str, Any]]:
    """SQL and parameters of the rows of `source` (a relation with the posts columns) passing
    the filters in the window [lo, hi), in walk order."""
    where, bound = window_where(clauses, params, lo, hi, after, latest)
    return f"SELECT {COLUMNS} FROM {source} WHERE {' AND '.join(where)} {order_sql(latest)}", bound


def candidates_sql(
    files: list[str],
    clauses: list[str],
    params: dict[str, Any],
    lo: int,
    hi: int,
    after: Position | None,
    latest: bool,
    fetch: int,
    restrict: dict[str, list[tuple[int, int]]] | None,
) -> tuple[str, dict[str, Any]] | None:
    """SQL and parameters of the first `fetch` candidate rows of the window [lo, hi) in walk
    order (None if no file is left to read). Files in `restrict` are read only within the time
    ranges of their candidate row groups."""
    where, bound = window_where(clauses, params, lo, hi, after, latest)
    bound["fetch"] = fetch
    tail = f"{order_sql(latest)} LIMIT $fetch"
    restrict = restrict or {}
    narrowed = [f for f in files if f in restrict]
    plain = [f for f in files if f not in restrict]
    parts = []
    if plain:
        bound["files"] = plain
        parts.append(f"SELECT {COLUMNS} FROM read_parquet($files) WHERE {' AND '.join(where)}")
    if narrowed:
        ranges = sorted({(a, b) for f in narrowed for a, b in restrict[f] if b >= lo and a < hi})
        # integers from our own file metadata, not user input
        within = " OR ".join(f"time_us BETWEEN {int(a)} AND {int(b)}" for a, b in ranges)
        bound["nfiles"] = narrowed
        parts.append(
            f"SELECT {COLUMNS} FROM read_parquet($nfiles) "
            f"WHERE {' AND '.join(where)} AND ({within or 'false'})"
        )
    if not parts:
        return None
    if len(parts) == 1:
        sql = f"{parts[0]} {tail}"
    else:
        order = "DESC" if latest else "ASC"
        sql = (
            f"SELECT * FROM (({parts[0]} {tail}) UNION ALL ({parts[1]} {tail})) "
            f"ORDER BY time_us {order}, uri {order} LIMIT $fetch"
        )
    return sql, bound
