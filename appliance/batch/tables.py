"""Turning decoded Jetstream events into Arrow tables with the storage schemas.

Events are appended as row tuples (one tuple per event, fields in schema order) and converted
column-wise every `chunk_rows` rows: `pa.array(list, type=...)` per column is several times
faster than building from row dicts, and converting in chunks bounds the Python objects alive at
once. Record fields the researcher filters on (post text, langs, reply, quote, embed, facets)
are extracted with typed msgspec Structs; a record whose fields have unexpected types falls back
to a lenient walk over plain JSON values, so one odd record never fails a batch.

Duplicates inside a builder are dropped by natural key as they arrive; duplicates against
earlier batches are removed later (`files.py`) against the stored key columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from msgspec import Struct, field

from appliance import events
from appliance.batch.decode import Envelope
from appliance.events import CommitEvent, Event, IdentityEvent
from appliance.store.layout import SCHEMAS, TABLES, commit_table, key_array

# --- record shapes we read (everything else in a record is skipped by the decoder) -----------


class _Ref(Struct):
    uri: str | None = None
    cid: str | None = None


class _SubjectRecord(Struct):
    """like / repost: a strong reference to the subject."""

    subject: _Ref | None = None
    created_at: str | None = field(name="createdAt", default=None)


class _DidSubjectRecord(Struct):
    """follow / block: the subject is a DID."""

    subject: str | None = None
    created_at: str | None = field(name="createdAt", default=None)


class _AnyRecord(Struct):
    """Any other collection: only createdAt is typed."""

    created_at: Any = field(name="createdAt", default=None)


class _Reply(Struct):
    root: _Ref | None = None
    parent: _Ref | None = None


class _Feature(Struct):
    type: str = field(name="$type", default="")
    did: Any = None
    uri: Any = None
    tag: Any = None


class _Facet(Struct):
    features: list[_Feature] = []


class _EmbedRecord(Struct):
    uri: str | None = None
    record: _Ref | None = None  # recordWithMedia nests the strong ref one level deeper


class _External(Struct):
    uri: str | None = None


class _Media(Struct):
    type: str = field(name="$type", default="")
    external: _External | None = None


class _Embed(Struct):
    type: str = field(name="$type", default="")
    record: _EmbedRecord | None = None
    external: _External | None = None
    media: _Media | None = None


class _PostRecord(Struct):
    text: str | None = None
    langs: list[str] | None = None
    reply: _Reply | None = None
    embed: _Embed | None = None
    facets: list[_Facet] | None = None
    tags: list[str] | None = None
    created_at: str | None = field(name="createdAt", default=None)


_decode_subject = msgspec.json.Decoder(_SubjectRecord).decode
_decode_did_subject = msgspec.json.Decoder(_DidSubjectRecord).decode
_decode_any = msgspec.json.Decoder(_AnyRecord).decode
_decode_post = msgspec.json.Decoder(_PostRecord).decode
_decode_json = msgspec.json.Decoder().decode

EMBED_KINDS = {
    "app.bsky.embed.images": "images",
    "app.bsky.embed.video": "video",
    "app.bsky.embed.external": "external",
    "app.bsky.embed.record": "record",
    "app.bsky.embed.recordWithMedia": "record_with_media",
}
_MENTION = "app.bsky.richtext.facet#mention"
_LINK = "app.bsky.richtext.facet#link"
_TAG = "app.bsky.richtext.facet#tag"

# (langs, reply_root, reply_parent, quote_uri, embed_kind, external_uri, mentions, links, tags)
PostFields = tuple[
    list[str] | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    list[str] | None,
    list[str] | None,
    list[str] | None,
]


def _tags(facet_tags: list[str], record_tags: list[str] | None) -> list[str] | None:
    out: list[str] = []
    for tag in facet_tags + (record_tags or []):
        tag = tag.lstrip("#")
        if tag and tag not in out:
            out.append(tag)
    return out or None


def post_fields(rec: _PostRecord) -> PostFields:
    """The typed post columns (after text) from a decoded post record."""
    reply = rec.reply
    root = reply.root.uri if reply and reply.root else None
    parent = reply.parent.uri if reply and reply.parent else None
    quote = kind = external = None
    embed = rec.embed
    if embed is not None:
        kind = EMBED_KINDS.get(embed.type, "other")
        if kind == "record" and embed.record is not None:
            quote = embed.record.uri
        elif kind == "record_with_media":
            if embed.record is not None and embed.record.record is not None:
                quote = embed.record.record.uri
            if embed.media is not None and embed.media.external is not None:
                external = embed.media.external.uri
        elif kind == "external" and embed.external is not None:
            external = embed.external.uri
    mentions: list[str] = []
    links: list[str] = []
    facet_tags: list[str] = []
    for facet in rec.facets or ():
        for feat in facet.features:
            if feat.type == _MENTION and isinstance(feat.did, str):
                mentions.append(feat.did)
            elif feat.type == _LINK and isinstance(feat.uri, str):
                links.append(feat.uri)
            elif feat.type == _TAG and isinstance(feat.tag, str):
                facet_tags.append(feat.tag)
    return (
        rec.langs or None,
        root,
        parent,
        quote,
        kind,
        external,
        mentions or None,
        links or None,
        _tags(facet_tags, rec.tags) if facet_tags or rec.tags else None,
    )


# --- the lenient path: a record with unexpected types, walked as plain JSON values -------------


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _str(obj: Any) -> str | None:
    return obj if isinstance(obj, str) else None


def _strs(obj: Any) -> list[str] | None:
    if not isinstance(obj, list):
        return None
    return [x for x in obj if isinstance(x, str)] or None


def lenient_post(record: Any) -> tuple[str | None, str | None, PostFields]:
    """(text, createdAt, post fields) from a post record of any shape, keeping what is well-typed."""
    if not isinstance(record, dict):
        return None, None, (None,) * 9
    embed = record.get("embed")
    embed_struct = None
    if isinstance(embed, dict):
        rec = _get(embed, "record")
        media = _get(embed, "media")
        embed_struct = _Embed(
            type=_str(embed.get("$type")) or "",
            record=_EmbedRecord(
                uri=_str(_get(rec, "uri")), record=_Ref(uri=_str(_get(rec, "record", "uri")))
            )
            if isinstance(rec, dict)
            else None,
            external=_External(uri=_str(_get(embed, "external", "uri"))),
            media=_Media(
                type=_str(_get(media, "$type")) or "",
                external=_External(uri=_str(_get(media, "external", "uri"))),
            )
            if isinstance(media, dict)
            else None,
        )
    facets = []
    for facet in record.get("facets") or () if isinstance(record.get("facets"), list) else ():
        features = _get(facet, "features")
        if isinstance(features, list):
            facets.append(
                _Facet(
                    features=[
                        _Feature(
                            type=_str(f.get("$type")) or "",
                            did=f.get("did"),
                            uri=f.get("uri"),
                            tag=f.get("tag"),
                        )
                        for f in features
                        if isinstance(f, dict)
                    ]
                )
            )
    reply = record.get("reply")
    typed = _PostRecord(
        langs=_strs(record.get("langs")),
        reply=_Reply(
            root=_Ref(uri=_str(_get(reply, "root", "uri"))),
            parent=_Ref(uri=_str(_get(reply, "parent", "uri"))),
        )
        if isinstance(reply, dict)
        else None,
        embed=embed_struct,
        facets=facets,
        tags=_strs(record.get("tags")),
    )
    return _str(record.get("text")), _str(record.get("createdAt")), post_fields(typed)


# --- timestamps ----------------------------------------------------------------------------

_TS_TYPE = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time_us(value: str) -> int | None:
    """Microseconds since the epoch of an ISO-8601 date-time, leniently; None if unparseable.

    A value without a zone is taken as UTC (records are written by many clients; some omit it).
    """
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return (parsed - _EPOCH) // _ONE_US
    except OverflowError:
        return None


_ONE_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH


def timestamps(values: list[str | None]) -> tuple[pa.Array, int]:
    """(timestamp[us, UTC] array, number of present but unparseable values).

    Arrow's vectorised ISO-8601 cast is the fast path; if any value in the chunk defeats it
    (no zone, odd precision, garbage), the chunk is parsed value by value with
    `parse_time_us`, which accepts everything Arrow does and more.
    """
    strings = pa.array(values, type=pa.string())
    try:
        return pc.cast(strings, _TS_TYPE), 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    parsed = [None if v is None else parse_time_us(v) for v in values]
    bad = sum(1 for v, p in zip(values, parsed, strict=True) if v is not None and p is None)
    return pa.array(parsed, type=pa.int64()).cast(_TS_TYPE), bad


# --- the builder ---------------------------------------------------------------------------

# Position of created_at/time in each table's row tuple (parsed column-wise at conversion).
_TIME_COLUMN = {
    name: schema.get_field_index("created_at" if "created_at" in schema.names else "time")
    for name, schema in SCHEMAS.items()
    if "created_at" in schema.names or "time" in schema.names
}

Row = tuple[Any, ...]
Mark = dict[str, int]
Counters = tuple[int, int, int]


class TableBuilder:
    """Accumulates events of one batch as rows per table; `tables()` returns the Arrow tables.

    `mark()` / `rollback(mark)` undo the rows of a stream entry whose transformation failed part
    way, so one bad entry never leaves half its events in the batch. Duplicates (same natural
    key) are removed column-wise in `tables()`, keeping the first copy: a hash pass over the
    key column costs far less than a Python set of keys, and memory stays in Arrow buffers.
    """

    def __init__(
        self,
        chunk_rows: int = 65_536,
        max_bytes: int = events.MAX_EVENT_BYTES,
        store_cids: bool = False,
    ) -> None:
        self.chunk_rows = chunk_rows
        self.max_bytes = max_bytes  # frames larger than this are rejected as oversized
        self.store_cids = store_cids  # else cid / subject_cid are stored as null
        self.rows: dict[str, list[Row]] = {t: [] for t in TABLES}
        self.chunks: dict[str, list[pa.RecordBatch]] = {t: [] for t in TABLES}
        self.converted: dict[str, int] = dict.fromkeys(TABLES, 0)  # rows already in chunks
        self.duplicates: dict[str, int] = {}  # per table: in-batch duplicates (set by tables())
        self.bad_created_at = 0  # present but unparseable createdAt / time values
        self.lenient_records = 0  # records that needed the lenient path
        self.unstorable_values = 0  # values that Arrow refused, stored as null
        self._tables: dict[str, pa.Table] | None = None

    @property
    def events(self) -> int:
        """Events added (duplicates included until `tables()` removes them)."""
        return sum(self.routed().values()) - sum(self.duplicates.values())

    def routed(self) -> dict[str, int]:
        """Events routed to each table, duplicates included."""
        out = {t: self.converted[t] + len(self.rows[t]) for t in TABLES}
        return {t: n for t, n in out.items() if n}

    # -- entry-level transactions -------------------------------------------------------

    def mark(self) -> Mark:
        """A point to roll back to (call between stream entries)."""
        return {t: len(r) for t, r in self.rows.items()}

    def rollback(self, mark: Mark) -> None:
        """Forget every row added since `mark`."""
        for table, n in mark.items():
            del self.rows[table][n:]

    def commit_entry(self) -> None:
        """Convert full row lists to Arrow chunks (only between entries, never inside one)."""
        full = [t for t, rows in self.rows.items() if len(rows) >= self.chunk_rows]
        # Convert everything first: if a conversion raises, nothing has changed yet and the
        # caller's rollback(mark) is still exact.
        converted = {t: self._convert(t, self.rows[t]) for t in full}
        for table, chunk in converted.items():
            self.chunks[table].append(chunk)
            self.converted[table] += chunk.num_rows
            self.rows[table] = []

    def flush_rows(self) -> None:
        """Convert every pending row to Arrow chunks."""
        converted = {t: self._convert(t, rows) for t, rows in self.rows.items() if rows}
        for table, chunk in converted.items():
            self.chunks[table].append(chunk)
            self.converted[table] += chunk.num_rows
            self.rows[table] = []

    def take_chunks(self) -> dict[str, list[pa.RecordBatch]]:
        """Every row added so far as Arrow chunks, handed over (a worker's result)."""
        self.flush_rows()
        out = {t: c for t, c in self.chunks.items() if c}
        self.chunks = {t: [] for t in TABLES}
        return out

    def add_chunks(self, chunks: dict[str, list[pa.RecordBatch]], counters: Counters) -> None:
        """Append rows converted elsewhere (a worker process), after the rows added so far."""
        self.flush_rows()  # keeps arrival order: first copies win the dedupe in tables()
        for table, batches in chunks.items():
            self.chunks[table].extend(batches)
            self.converted[table] += sum(b.num_rows for b in batches)
        bad, lenient, unstorable = counters
        self.bad_created_at += bad
        self.lenient_records += lenient
        self.unstorable_values += unstorable

    def counters(self) -> Counters:
        """(bad created_at values, lenient records, unstorable values) so far."""
        return self.bad_created_at, self.lenient_records, self.unstorable_values

    # -- adding events ------------------------------------------------------------------

    def add(self, event: Event) -> None:
        """Add one decoded event."""
        if type(event) is CommitEvent:
            self._add_commit(event)
        elif type(event) is IdentityEvent:
            i = event.identity
            self.rows["identities"].append((event.did, i.seq, event.time_us, i.time, i.handle))
        else:
            a = event.account  # type: ignore[union-attr]
            row = (event.did, a.seq, event.time_us, a.time, a.active, a.status)
            self.rows["accounts"].append(row)

    def add_events(self, decoded: list[Event]) -> None:
        """Add decoded (and validated) events."""
        add = self.add
        for event in decoded:
            add(event)

    def add_unchecked(self, decoded: list[Any]) -> None:
        """Add what `decode_joined_unchecked` returned (commits as envelopes)."""
        add_commit = self._add_commit
        add = self.add
        for event in decoded:
            if type(event) is Envelope:
                # An envelope of kind "commit" has every attribute _add_commit reads.
                add_commit(cast(CommitEvent, event))
            else:
                add(event)

    def _add_commit(self, ev: CommitEvent) -> None:
        c = ev.commit
        table = commit_table(c.collection, c.operation)
        if table == "deletes":
            self.rows["deletes"].append((ev.did, c.collection, c.rkey, c.rev, ev.time_us))
            return
        raw = c.record
        store_cids = self.store_cids
        # A post's own cid is always kept: XRPC's PostView requires it (app.bsky.feed.defs).
        cid = c.cid if store_cids or table == "posts" else None
        row: Row
        head = (ev.did, c.rkey, c.rev, cid)
        if table == "likes" or table == "reposts":
            try:
                r = _decode_subject(raw)
                subject = r.subject
                created = r.created_at
                subject_uri = subject.uri if subject else None
                subject_cid = subject.cid if subject else None
            except msgspec.ValidationError:
                self.lenient_records += 1
                rec = _decode_json(raw)
                created = _str(_get(rec, "createdAt"))
                subject_uri = _str(_get(rec, "subject", "uri"))
                subject_cid = _str(_get(rec, "subject", "cid"))
            row = (
                *head,
                c.operation,
                ev.time_us,
                created,
                subject_uri,
                subject_cid if store_cids else None,
            )
        elif table == "posts":
            try:
                p = _decode_post(raw)
                text, created, fields = p.text, p.created_at, post_fields(p)
            except msgspec.ValidationError:
                self.lenient_records += 1
                text, created, fields = lenient_post(_decode_json(raw))
            row = (*head, c.operation, ev.time_us, created, text, *fields)
        elif table == "follows" or table == "blocks":
            try:
                f = _decode_did_subject(raw)
                row = (*head, c.operation, ev.time_us, f.created_at, f.subject)
            except msgspec.ValidationError:
                self.lenient_records += 1
                rec = _decode_json(raw)
                row = (
                    *head,
                    c.operation,
                    ev.time_us,
                    _str(_get(rec, "createdAt")),
                    _str(_get(rec, "subject")),
                )
        else:
            created = _decode_any(raw).created_at
            row = (
                *head,
                c.collection,
                c.operation,
                ev.time_us,
                created if isinstance(created, str) else None,
                bytes(raw).decode("utf-8", "replace"),
            )
        self.rows[table].append(row)

    # -- conversion -----------------------------------------------------------------------

    def _convert(self, table: str, rows: list[Row]) -> pa.RecordBatch:
        schema = SCHEMAS[table]
        columns = list(zip(*rows, strict=True))
        arrays = []
        time_col = _TIME_COLUMN.get(table)
        for i, f in enumerate(schema):
            if i == time_col:
                arr, bad = timestamps(list(columns[i]))
                self.bad_created_at += bad
            else:
                try:
                    arr = pa.array(columns[i], type=f.type)
                except (pa.ArrowException, TypeError, ValueError, OverflowError):
                    if not f.nullable:
                        raise
                    # Defence in depth (decoding guarantees types): one bad value must not fail
                    # the thousands of rows converted with it; it is stored as null and counted.
                    arr = self._convert_leniently(columns[i], f.type)
            arrays.append(arr)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def _convert_leniently(self, values: tuple[Any, ...], type_: pa.DataType) -> pa.Array:
        out = []
        for value in values:
            try:
                pa.array([value], type=type_)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                self.unstorable_values += 1
                value = None
            out.append(value)
        return pa.array(out, type=type_)

    def tables(self) -> dict[str, pa.Table]:
        """Every non-empty table of the batch, in arrival order, without duplicate keys."""
        if self._tables is not None:
            return self._tables
        out = {}
        for table in TABLES:
            if self.rows[table]:
                self.chunks[table].append(self._convert(table, self.rows[table]))
                self.converted[table] += len(self.rows[table])
                self.rows[table] = []
            if self.chunks[table]:
                data = pa.Table.from_batches(self.chunks[table], schema=SCHEMAS[table])
                self.chunks[table] = []
                # The small chunks of a batch (one per read) carry their own dictionaries,
                # which cost Parquet ~0.3% in size (measured); one shared dictionary per column
                # costs almost nothing (combine_chunks() would copy the whole table).
                data = data.unify_dictionaries()
                data, dropped = first_of_each_key(table, data)
                if dropped:
                    self.duplicates[table] = dropped
                out[table] = data
        self._tables = out
        return out


def first_of_each_key(table: str, data: pa.Table) -> tuple[pa.Table, int]:
    """`data` keeping only the first row of each natural key; and how many rows were dropped."""
    keys = key_array(table, data)
    if pc.count_distinct(keys).as_py() == data.num_rows:
        return data, 0
    index = pa.table({"key": keys, "i": pa.array(range(data.num_rows), pa.int64())})
    first = index.group_by("key", use_threads=False).aggregate([("i", "min")])["i_min"]
    keep = pc.sort_indices(first)
    data = data.take(pc.take(first, keep))
    return data, index.num_rows - data.num_rows
