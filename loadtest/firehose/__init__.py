"""A deterministic, seeded synthetic Jetstream v1 firehose, and the ground truth to verify it by.

Event `i` of a stream is a pure function of (config, i):

- its time_us is `start_us + i * DAY_US // events_per_day` (strictly increasing, so a cursor
  selects exactly, see `index_at`);
- its "core" (kind, author DID, rkey, CID, bad-frame flag) comes from a 64-bit hash of
  (seed, i), so any event can look at any earlier event's core in O(1): deletes, updates,
  replies, quotes, likes and reposts refer to records "generated earlier" without keeping state;
- its content (text, embeds, ...) comes from a per-block random generator (blocks of
  `BLOCK` events), so seeking costs at most one block of generation.

Deletes are an injective map: the delete at index i targets index `i - M * lag(i mod M)`, so no
record is deleted twice, and `deleted_at(j)` finds the one index that may delete j.

`GroundTruth` accumulates, per (table, day), a count and an order-independent digest of the
natural keys of valid events (see `key_digest`), plus rejection counts and the deleted post URIs,
so a verifier can compare Parquet contents exactly in constant memory.

The modules, in the order they build on each other: `config` (the stream's parameters, kinds,
time and hash), `encoding` (TIDs, CIDs, DIDs, timestamps, damaged frames), `vocabulary` (the
data tables post text is made of), `core` (hashing, cores and references to earlier records),
`records` (post and other record builders), `stream` (frames and the generator functions),
`truth` (ground truth) and `command` (`loadtest generate`). This package re-exports what its
callers use, so `from loadtest.firehose import ...` names are those of the modules.
"""

from appliance.store.layout import DAY_US
from loadtest.firehose.command import (
    add_arguments,
    add_generator_arguments,
    config_from_args,
    main,
    open_output,
    parse_instant,
    render_chunk,
)
from loadtest.firehose.config import (
    ABSENT_WORD,
    BLOCK,
    COMMON_WORD,
    COMMON_WORD_FRACTION,
    DEFAULT_EVENTS_PER_DAY,
    DEFAULT_MIX,
    DEFAULT_START_US,
    KINDS,
    MALFORMED,
    OK,
    OVERSIZED,
    RARE_WORD,
    FirehoseConfig,
    Item,
    index_at,
    time_at,
)
from loadtest.firehose.encoding import iso_ms, tid
from loadtest.firehose.stream import _generator, deleted_at, flag_at, generate, generate_items
from loadtest.firehose.truth import GroundTruth, KeyDigest, ground_truth, key_digest, key_hash
from loadtest.firehose.vocabulary import _bank, _graphemes

__all__ = [
    "ABSENT_WORD",
    "BLOCK",
    "COMMON_WORD",
    "COMMON_WORD_FRACTION",
    "DAY_US",
    "DEFAULT_EVENTS_PER_DAY",
    "DEFAULT_MIX",
    "DEFAULT_START_US",
    "KINDS",
    "MALFORMED",
    "OK",
    "OVERSIZED",
    "RARE_WORD",
    "FirehoseConfig",
    "GroundTruth",
    "Item",
    "KeyDigest",
    "_bank",
    "_generator",
    "_graphemes",
    "add_arguments",
    "add_generator_arguments",
    "config_from_args",
    "deleted_at",
    "flag_at",
    "generate",
    "generate_items",
    "ground_truth",
    "index_at",
    "iso_ms",
    "key_digest",
    "key_hash",
    "main",
    "open_output",
    "parse_instant",
    "render_chunk",
    "tid",
    "time_at",
]
