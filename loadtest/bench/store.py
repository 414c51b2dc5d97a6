"""The month store the query and load benchmarks run over, built once and cached.

A store laid out as the compactor leaves a closed day: a few large Parquet files per day, sorted
by time_us, registered in the manifest, each posts file with its token index; posts with realistic
word frequencies (a common word in a few % of posts, a rare word about 1 in 100k, an absent word,
a two-word phrase), languages, tags, links and mentions, deletes and identities beside them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from appliance.store import compact, layout, textindex
from appliance.store.manifest import read_manifest, update_manifest
from appliance.store.writer import write_atomic, writer_options

if TYPE_CHECKING:
    import duckdb


COMMON_WORD = "today"
RARE_WORD = "quokkanaut"
ABSENT_WORD = "zyxwvqjkp"
PHRASE = "good morning"
PROBES = {"common": COMMON_WORD, "rare": RARE_WORD, "absent": ABSENT_WORD, "phrase": PHRASE}
COMMON_RATE = 0.03
RARE_RATE = 1e-5
PHRASE_RATE = 0.004
STORE_FORMAT = 2  # bump when the generated layout changes, so an old cached store is rebuilt
START_DAY = datetime(2026, 6, 1, tzinfo=UTC)
TID_ALPHABET = np.frombuffer(b"234567abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
B32_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz234567", dtype=np.uint8)
LANGS = [["en"], ["ja"], ["pt"], ["de"], ["en", "es"], ["fr"]]
LANG_WEIGHTS = [0.55, 0.2, 0.1, 0.05, 0.05, 0.05]
DOMAINS = ["youtube.com", "www.youtube.com", "nytimes.com", "example.org", "bsky.app", "github.com"]


@dataclass(frozen=True)
class StoreSpec:
    posts: int
    days: int
    files_per_day: int
    row_group_size: int
    zstd_level: int
    seed: int = 7

    def key(self) -> dict[str, int]:
        return {
            "format": STORE_FORMAT,
            "posts": self.posts,
            "days": self.days,
            "files_per_day": self.files_per_day,
            "row_group_size": self.row_group_size,
            "zstd_level": self.zstd_level,
            "seed": self.seed,
        }


def _b32(rng: np.random.Generator, n: int, width: int, alphabet: np.ndarray) -> pa.Array:
    """n random strings of `width` characters from `alphabet`, built without a Python loop."""
    codes = alphabet[rng.integers(0, len(alphabet), size=(n, width))]
    return pa.array(codes.view(f"S{width}").ravel()).cast(pa.string())


def _tids(micros: np.ndarray, clock: np.ndarray) -> pa.Array:
    """atproto TIDs (13 base32-sortable chars) for timestamps: string order = time order."""
    value = (micros.astype(np.uint64) << np.uint64(10)) | clock.astype(np.uint64)
    shifts = np.arange(12, -1, -1, dtype=np.uint64) * np.uint64(5)
    codes = TID_ALPHABET[((value[:, None] >> shifts[None, :]) & np.uint64(31)).astype(np.intp)]
    return pa.array(np.ascontiguousarray(codes).view("S13").ravel()).cast(pa.string())


def _vocabulary(rng: np.random.Generator) -> tuple[pa.Array, np.ndarray]:
    """Filler words with Zipf-like weights; none contains a probe word or the phrase's words."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zu", "pi", "da", "fe", "gu",
                 "ho", "ji", "be", "ci", "ly", "wo", "xe", "an", "or", "is", "el", "um"]  # fmt: skip
    words: set[str] = set()
    while len(words) < 20_000:
        n = int(rng.integers(1, 5))
        words.add("".join(syllables[int(i)] for i in rng.integers(0, len(syllables), size=n)))
    words |= {"the", "a", "and", "is", "of", "to", "in", "it", "for", "on", "this", "that",
              "café", "naïve", "日本語", "こんにちは", "🦋", "😂", "straße", "ação", "Ünïcode"}  # fmt: skip
    banned = {COMMON_WORD, RARE_WORD, ABSENT_WORD, *PHRASE.split()}
    ordered = sorted(w for w in words if not any(b in w.lower() for b in banned))
    rng.shuffle(ordered)
    weights = 1.0 / np.arange(1, len(ordered) + 1) ** 1.05
    return pa.array(ordered), weights / weights.sum()


def _with_probe(text: pa.Array, mask: np.ndarray, word: str, rng: np.random.Generator) -> pa.Array:
    """Put `word` (in a random casing) at the start or end of the texts selected by mask."""
    if not mask.any():
        return text
    casing = [word, word.capitalize(), word.upper()]
    variant = pa.array([casing[int(i)] for i in rng.choice(3, size=len(text), p=[0.7, 0.2, 0.1])])
    front = pc.binary_join_element_wise(variant, text, " ")
    back = pc.binary_join_element_wise(text, variant, " ")
    placed = pc.if_else(pa.array(rng.random(len(text)) < 0.5), front, back)
    return pc.if_else(pa.array(mask), placed, text)


def _lists(rng: np.random.Generator, n: int, share: float, pool: pa.Array) -> pa.Array:
    """A list<string> column: `share` of rows hold one or two values from pool, the rest empty."""
    sizes = np.where(rng.random(n) < share, rng.integers(1, 3, size=n), 0)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    values = pool.take(pa.array(rng.integers(0, len(pool), size=int(offsets[-1]))))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class _Pools:
    """Authors (with Zipf-like activity), their handles, and the filler vocabulary."""

    def __init__(self, rng: np.random.Generator, authors: int) -> None:
        self.dids = pc.binary_join_element_wise(
            "did:plc:", _b32(rng, authors, 24, B32_ALPHABET), ""
        )
        activity = 1.0 / np.arange(1, authors + 1) ** 0.9
        self.author_weights = activity / activity.sum()
        self.handles = pc.binary_join_element_wise(
            pc.binary_join_element_wise("user", pa.array(np.arange(authors).astype(str)), ""),
            ".bsky.social",
            "",
        )
        self.vocab, self.vocab_weights = _vocabulary(rng)
        kana = [chr(c) for c in range(0x3041, 0x3094)] + list("日本語今日天気映画音楽写真猫犬")
        self.cjk = pa.array(
            [
                "".join(
                    kana[int(i)] for i in rng.integers(0, len(kana), size=int(rng.integers(2, 5)))
                )
                for _ in range(5000)
            ]
        )
        self.tags = pa.array(["art", "news", "Photography", "bluesky", "gaming", "science"])
        self.domains = pa.array(DOMAINS)


def _day_posts(rng: np.random.Generator, pools: _Pools, day: int, n: int) -> pa.Table:
    """One day's posts, sorted by time_us, as the compactor writes them."""
    start = int((START_DAY + timedelta(days=day)).timestamp() * 1_000_000)
    time_us = np.sort(rng.integers(start, start + layout.DAY_US, size=n))
    author = rng.choice(len(pools.dids), size=n, p=pools.author_weights)
    did = pools.dids.take(pa.array(author))
    rkey = _tids(time_us - rng.integers(0, 2_000_000, size=n), rng.integers(0, 1024, size=n))
    rev = _tids(time_us, rng.integers(0, 1024, size=n))
    uri = pc.binary_join_element_wise(did, rkey, "/app.bsky.feed.post/")
    uri = pc.binary_join_element_wise("at://", uri, "")
    # text: a Zipf mix of filler words, ~16 words on average, some capitalised
    lengths = np.clip(rng.geometric(1 / 16, size=n), 1, 60)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    words = pools.vocab.take(
        pa.array(rng.choice(len(pools.vocab), size=int(offsets[-1]), p=pools.vocab_weights))
    )
    words = pc.if_else(pa.array(rng.random(len(words)) < 0.08), pc.utf8_capitalize(words), words)
    text = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), words), " ")
    text = text.cast(pa.string())
    # Japanese posts (a fifth of the firehose) are written in CJK characters: lower() is not ASCII
    langs_idx = rng.choice(len(LANGS), size=n, p=LANG_WEIGHTS)
    is_ja = langs_idx == LANGS.index(["ja"])
    cjk_words = pools.cjk.take(pa.array(rng.integers(0, len(pools.cjk), size=int(offsets[-1]))))
    cjk = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets // 2), cjk_words), "")
    text = pc.if_else(pa.array(is_ja), cjk.cast(pa.string()), text)
    text = _with_probe(text, rng.random(n) < COMMON_RATE, COMMON_WORD, rng)
    text = _with_probe(text, rng.random(n) < RARE_RATE, RARE_WORD, rng)
    text = _with_probe(text, rng.random(n) < PHRASE_RATE, PHRASE, rng)
    is_reply = rng.random(n) < 0.3
    parent = pa.array(np.where(is_reply, np.arange(n) - 1, 0).clip(0))
    reply = pc.if_else(pa.array(is_reply), uri.take(parent), pa.nulls(n, pa.string()))
    langs = pa.array(LANGS, pa.list_(pa.string())).take(pa.array(langs_idx))
    has_external = rng.random(n) < 0.1
    domain = pools.domains.take(pa.array(rng.integers(0, len(pools.domains), size=n)))
    external = pc.binary_join_element_wise(
        "https://", domain, pa.array(np.arange(n).astype(str)), ""
    )
    external = pc.if_else(pa.array(has_external), external, pa.nulls(n, pa.string()))
    embed = pc.if_else(pa.array(has_external), "external", pa.nulls(n, pa.string()))
    columns: dict[str, pa.Array] = {  # the post's own uri is derived, not stored
        "did": did,
        "rkey": rkey,
        "rev": rev,
        "cid": pa.nulls(n, pa.string()),  # store_cids defaults to false: CIDs are not stored
        "operation": pa.array(["create"] * n),
        "time_us": pa.array(time_us),
        "created_at": pa.array(time_us - 1_000_000, pa.timestamp("us", tz="UTC")),
        "text": text,
        "langs": langs,
        "reply_root": reply,
        "reply_parent": reply,
        "quote_uri": pa.nulls(n, pa.string()),
        "embed_kind": embed,
        "external_uri": external,
        "mentions": _lists(rng, n, 0.05, pools.dids),
        "links": _lists(rng, n, 0.05, external.drop_null()),
        "tags": _lists(rng, n, 0.08, pools.tags),
    }
    schema = layout.SCHEMAS["posts"]
    return pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)


def _day_deletes(rng: np.random.Generator, posts: pa.Table, pools: _Pools) -> pa.Table:
    """Delete rows for the day: ~1% of the day's posts, and 40x as many deletes of likes."""
    n_posts = posts.num_rows
    victims = np.flatnonzero(rng.random(n_posts) < 0.01)
    n_likes = n_posts * 40 // 100
    time_us = posts.column("time_us").to_numpy()
    post_t = time_us[victims] + rng.integers(1, 600_000_000, size=len(victims))
    like_t = rng.integers(int(time_us[0]), int(time_us[-1]) + 1, size=n_likes)
    like_did = pools.dids.take(pa.array(rng.integers(0, len(pools.dids), size=n_likes)))
    like_rkey = _tids(like_t - 5_000_000, rng.integers(0, 1024, size=n_likes))
    take = pa.array(victims)
    table = pa.table(
        {
            "did": pa.concat_arrays([posts.column("did").take(take).combine_chunks(), like_did]),
            "collection": pa.array(
                ["app.bsky.feed.post"] * len(victims) + ["app.bsky.feed.like"] * n_likes
            ),
            "rkey": pa.concat_arrays([posts.column("rkey").take(take).combine_chunks(), like_rkey]),
            "rev": _tids(np.concatenate([post_t, like_t]), np.zeros(len(victims) + n_likes)),
            "time_us": pa.array(np.concatenate([post_t, like_t])),
        }
    )
    table = table.sort_by("time_us")
    schema = layout.SCHEMAS["deletes"]
    return pa.table([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def _identities(pools: _Pools) -> pa.Table:
    n = len(pools.dids)
    t0 = int(START_DAY.timestamp() * 1_000_000)
    time_us = t0 + np.arange(n, dtype=np.int64)
    schema = layout.SCHEMAS["identities"]
    columns = {
        "did": pools.dids,
        "seq": pa.array(np.arange(n, dtype=np.int64)),
        "time_us": pa.array(time_us),
        "time": pa.array(time_us, pa.timestamp("us", tz="UTC")),
        "handle": pools.handles,
    }
    return pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)


def _reusable(store: Path, spec: StoreSpec) -> dict[str, Any] | None:
    """The metadata of a complete store with the same spec under `store`, or None if `store` is
    empty or absent; anything else there stops the run."""
    meta_path = store / "bench.json"
    if meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if meta.get("spec") == spec.key():
            print(f"store: reusing {store} ({meta['posts']:,} posts)", flush=True)
            return meta
        raise SystemExit(
            f"{store} holds a store built with {meta.get('spec')}; use another --store"
        )
    if store.exists() and any(store.iterdir()):
        raise SystemExit(f"{store} is not empty and has no bench.json; use another --store")
    return None


def _write_day(
    store: Path,
    spec: StoreSpec,
    table_name: str,
    table: pa.Table,
    date: str,
    indexer: duckdb.DuckDBPyConnection,
    index_days: list[dict[str, Any]],
) -> list[str]:
    """One day of a table as `files_per_day` compacted files (posts with their token index, its
    figures appended to `index_days`); returns the files' paths relative to the store."""
    written: list[str] = []
    directory = layout.partition_dir(store, table_name, date)
    time_col = table.schema.get_field_index("time_us")
    sorting = [pq.SortingColumn(time_col)]
    bounds = np.linspace(0, table.num_rows, spec.files_per_day + 1).astype(int)
    for part in range(spec.files_per_day):
        chunk = table.slice(bounds[part], bounds[part + 1] - bounds[part])
        path = write_atomic(
            chunk,
            directory,
            f"{layout.COMPACTED_PREFIX}{part:02d}",
            sorting_columns=sorting,
            row_group_size=(
                spec.row_group_size if table_name == "posts" else compact.ROW_GROUP_ROWS
            ),
            zstd_level=spec.zstd_level,
        )
        written.append(str(path.relative_to(store)))
        if table_name == "posts":
            built = compact.index_posts_file(indexer, path)
            if built is None:
                raise SystemExit(f"the token index of {path} failed; see the log")
            index_days.append(
                {
                    "day": date,
                    "seconds": round(built.seconds, 2),
                    "index_bytes": built.bytes,
                    "data_bytes": path.stat().st_size,
                    "tokens": built.tokens,
                }
            )
    return written


def build_store(store: Path, spec: StoreSpec) -> dict[str, Any]:
    """Build the store under `store` unless a complete one with the same spec is there."""
    meta_path = store / "bench.json"
    reused = _reusable(store, spec)
    if reused is not None:
        return reused
    import duckdb

    rng = np.random.default_rng(spec.seed)
    pools = _Pools(rng, authors=max(1000, spec.posts // 50))
    indexer = duckdb.connect(config={"threads": 2})  # as the compactor's connection
    index_days: list[dict[str, Any]] = []
    began = time.perf_counter()
    files: dict[str, list[str]] = {"posts": [], "deletes": [], "identities": []}
    counts = dict.fromkeys(PROBES, 0)
    per_day = spec.posts // spec.days
    posts_written = 0
    for day in range(spec.days):
        n = per_day if day < spec.days - 1 else spec.posts - posts_written
        posts = _day_posts(rng, pools, day, n)
        deletes = _day_deletes(rng, posts, pools)
        date = layout.day_of(int(posts.column("time_us")[0].as_py()))
        lowered = pc.utf8_lower(posts.column("text"))
        for name, word in PROBES.items():
            counts[name] += int(pc.sum(pc.match_substring(lowered, word)).as_py() or 0)
        for table_name, table in (("posts", posts), ("deletes", deletes)):
            files[table_name] += _write_day(
                store, spec, table_name, table, date, indexer, index_days
            )
        posts_written += n
        print(
            f"store: day {day + 1}/{spec.days} ({date}) {n:,} posts, "
            f"{time.perf_counter() - began:.0f} s",
            flush=True,
        )
    ident_dir = layout.partition_dir(
        store, "identities", layout.day_of(int(START_DAY.timestamp() * 1e6))
    )
    path = write_atomic(_identities(pools), ident_dir, f"{layout.COMPACTED_PREFIX}00")
    files["identities"].append(str(path.relative_to(store)))
    with update_manifest(store) as manifest:
        for table_name, paths in files.items():
            manifest.files[table_name] = paths
        manifest.last_batch = {"time": time.time(), "events": spec.posts, "source": "bench"}
    # the bench author: active enough to fill a page, far from the most active
    author_index = min(len(pools.dids) - 1, 200)
    meta = {
        "spec": spec.key(),
        "posts": spec.posts,
        "probe_counts": counts,
        "author_did": pools.dids[author_index].as_py(),
        "author_handle": pools.handles[author_index].as_py(),
        "first_day": START_DAY.strftime("%Y-%m-%d"),
        "last_day": (START_DAY + timedelta(days=spec.days - 1)).strftime("%Y-%m-%d"),
        "build_s": round(time.perf_counter() - began, 1),
        "index_days": index_days,
    }
    meta["index_format"] = textindex.FORMAT
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"store: built in {meta['build_s']} s: {json.dumps(counts)}", flush=True)
    return meta


def reindex_store(source: Path, store: Path, row_group_size: int | None = None) -> dict[str, Any]:
    """A copy of the store at `source` (hard links: no data is copied) whose posts files get
    token indexes of the current format, so an old store can be measured with new indexes
    beside the old one (the data files, and so the answers, are the same). With a
    `row_group_size` other than the source's, the posts files are rewritten with row groups of
    that size (the same rows in the same order, written the way the compactor writes them)."""
    meta_path = source / "bench.json"
    if not meta_path.exists():
        raise SystemExit(f"no store in {source} to re-index")
    done = store / "bench.json"
    if done.exists():
        meta: dict[str, Any] = json.loads(done.read_text())
        if (
            meta.get("reindexed_from") == str(source)
            and meta.get("index_format") == textindex.FORMAT
            and meta["spec"].get("row_group_size")
            == (row_group_size or meta["spec"].get("row_group_size"))
        ):
            print(f"store: reusing {store}, re-indexed from {source}", flush=True)
            return meta
    if store.exists() and any(store.iterdir()):
        raise SystemExit(f"{store} is not empty; re-index into a new directory")
    import duckdb

    meta = json.loads(meta_path.read_text())
    regroup = row_group_size not in (None, meta["spec"].get("row_group_size"))
    began = time.perf_counter()
    indexer = duckdb.connect(config={"threads": 2})  # as the compactor's connection
    index_days: list[dict[str, Any]] = []
    posts = set(read_manifest(source).table_files("posts"))
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path.suffix == textindex.SUFFIX:
            continue
        relative = path.relative_to(source)
        target = store / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if regroup and str(relative) in posts:
            assert row_group_size is not None
            _regroup(path, target, row_group_size, meta["spec"]["zstd_level"])
        else:
            os.link(path, target)
    for rel in read_manifest(store).table_files("posts"):
        built = compact.index_posts_file(indexer, store / rel)
        if built is None:
            raise SystemExit(f"the token index of {rel} failed; see the log")
        index_days.append(
            {
                "day": rel.split("/")[1].removeprefix("date="),
                "seconds": round(built.seconds, 2),
                "index_bytes": built.bytes,
                "data_bytes": (store / rel).stat().st_size,
                "tokens": built.tokens,
            }
        )
        print(f"store: re-indexed {rel} in {built.seconds:.1f} s", flush=True)
    if regroup:
        meta["spec"]["row_group_size"] = row_group_size
    meta.update(index_days=index_days, index_format=textindex.FORMAT, reindexed_from=str(source))
    (store / "bench.json").unlink()  # a hard link to the source's: replace, never write through
    (store / "bench.json").write_text(json.dumps(meta, indent=2))
    print(f"store: re-indexed in {time.perf_counter() - began:.0f} s", flush=True)
    return meta


def _regroup(source: Path, target: Path, row_group_size: int, zstd_level: int) -> None:
    """Rewrite a posts file with row groups of `row_group_size` rows (same rows, same order)."""
    table = pq.read_table(source, schema=layout.SCHEMAS["posts"])
    schema = layout.SCHEMAS["posts"]
    with pq.ParquetWriter(
        target,
        schema,
        sorting_columns=[pq.SortingColumn(schema.get_field_index("time_us"))],
        **writer_options(schema, zstd_level),
    ) as writer:
        writer.write_table(table, row_group_size=row_group_size)
    print(f"store: rewrote {target.name} with row groups of {row_group_size}", flush=True)
