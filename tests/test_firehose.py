"""The synthetic firehose: valid, deterministic, seekable, realistic in mix and shape."""

from __future__ import annotations

import collections
import hashlib
import itertools
import random
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import msgspec
import pytest
import zstandard

from appliance import events as ev
from appliance.store.layout import NaturalKey, at_uri, natural_key, table_for
from loadtest import firehose as fh
from loadtest.sources import read_items

N = 30_000
CFG = fh.FirehoseConfig(seed=11, events=N)
NOW = 1_900_000_000_000_000  # well after the generated instants

# Kind of each decoded event, named as in fh.DEFAULT_MIX.
_COLLECTION_KIND = {
    "app.bsky.feed.like": "like",
    "app.bsky.graph.follow": "follow",
    "app.bsky.feed.post": "post",
    "app.bsky.feed.repost": "repost",
    "app.bsky.graph.listitem": "listitem",
    "app.bsky.graph.block": "block",
    "app.bsky.actor.profile": "profile",
    "app.bsky.feed.threadgate": "threadgate",
    "app.bsky.feed.postgate": "postgate",
}


def kind_name(event: ev.Event) -> str:
    if isinstance(event, ev.IdentityEvent):
        return "identity"
    if isinstance(event, ev.AccountEvent):
        return "account"
    c = event.commit
    if c.operation == "delete":
        return "delete"
    if c.collection == "app.bsky.feed.post" and c.operation == "update":
        return "post_update"
    if c.collection in _COLLECTION_KIND:
        return _COLLECTION_KIND[c.collection]
    return "other_bsky" if c.collection.startswith(("app.bsky.", "chat.bsky.")) else "unknown"


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    return list(fh.generate(CFG))


@pytest.fixture(scope="module")
def events(frames: list[bytes]) -> list[ev.Event]:
    return [ev.decode(f, now=NOW) for f in frames]


def test_every_event_decodes_and_time_strictly_increases(
    frames: list[bytes], events: list[ev.Event]
) -> None:
    assert len(events) == N
    times = [e.time_us for e in events]
    assert all(a < b for a, b in itertools.pairwise(times))
    assert times[0] == CFG.start_us
    # 8.1M/day -> N events span N / 8.1M of a day
    assert times[-1] - times[0] == pytest.approx(N / 8_100_000 * fh.DAY_US, rel=1e-3)
    # field order as the real Jetstream
    for frame in frames[:50]:
        assert frame.startswith(b'{"did":"did:plc:')
        assert re.match(rb'\{"did":"[^"]+","time_us":\d+,"kind":"(commit|identity|account)"', frame)


def test_deterministic_for_a_seed_and_different_across_seeds(frames: list[bytes]) -> None:
    assert list(fh.generate(fh.FirehoseConfig(seed=11, events=2000))) == frames[:2000]
    other = list(fh.generate(fh.FirehoseConfig(seed=12, events=2000)))
    assert sum(a == b for a, b in zip(other, frames, strict=False)) == 0


# SHA-256 of the frames (each followed by a newline) as the generator wrote them when these
# digests were taken: a change that makes the generator faster or moves its code around must
# leave every byte of every event as it was for the same seed.
PINNED = {
    "seed 11, defaults": "00e8a1b855f16f668f292283bd8397e902e8b31b906937e2efb7dcf1b81771f1",
    "seed 7, bad frames": "f3f1ed0a19a6ed16d21a66804cce90fd73ad230a24a6c9f554829ee9c2587c3c",
}


def _sha256(frames: Iterable[bytes]) -> str:
    return hashlib.sha256(b"".join(f + b"\n" for f in frames)).hexdigest()


def test_the_same_seed_gives_byte_identical_events(frames: list[bytes]) -> None:
    assert _sha256(frames) == PINNED["seed 11, defaults"]
    bad = fh.FirehoseConfig(
        seed=7,
        events=5000,
        malformed_fraction=0.02,
        oversized_fraction=0.002,
        oversized_bytes=2048,
        events_per_day=50_000,
        population=300,
    )
    assert _sha256(fh.generate(bad)) == PINNED["seed 7, bad frames"]


@pytest.mark.parametrize("start", [1, 1023, 1024, 21_500, N - 1])
def test_seeking_yields_the_same_frames(frames: list[bytes], start: int) -> None:
    assert (
        list(itertools.islice(fh.generate(CFG, start_index=start), 1500)) == frames[start:][:1500]
    )


def test_index_at_selects_exactly() -> None:
    rng = random.Random(3)
    for cfg in (CFG, fh.FirehoseConfig(seed=1, events=1000, events_per_day=86_400)):
        for _ in range(300):
            t = rng.randrange(cfg.start_us - 10_000, cfg.end_us + 10_000)
            i = fh.index_at(cfg, t)
            assert 0 <= i <= cfg.events
            if 0 < i < cfg.events:
                assert fh.time_at(cfg, i) >= t > fh.time_at(cfg, i - 1)
        assert fh.index_at(cfg, fh.time_at(cfg, 17)) == 17
        assert fh.index_at(cfg, 0) == 0
        assert fh.index_at(cfg, cfg.end_us + 1) == cfg.events


def test_mix_matches_the_configured_one(events: list[ev.Event]) -> None:
    counts = collections.Counter(kind_name(e) for e in events)
    assert set(counts) == set(fh.DEFAULT_MIX)
    for kind, expected in fh.DEFAULT_MIX.items():
        sigma = (expected * (1 - expected) / N) ** 0.5
        assert abs(counts[kind] / N - expected) < 4 * sigma + 0.002, kind


def test_size_distribution(frames: list[bytes], events: list[ev.Event]) -> None:
    sizes = [len(f) for f in frames]
    mean = sum(sizes) / len(sizes)
    assert 380 < mean < 700  # real Jetstream: ~520 B on average
    post_sizes = [len(f) for f, e in zip(frames, events, strict=True) if kind_name(e) == "post"]
    assert max(post_sizes) > 1500 and min(post_sizes) < 600
    graphemes = []
    for e in events:
        if kind_name(e) == "post":
            text = msgspec.json.decode(e.commit.record)["text"]
            graphemes.append(fh._graphemes(text))
            assert len(text.encode()) <= 3000
    assert max(graphemes) <= 300
    assert sum(g > 200 for g in graphemes) > 0.05 * len(graphemes)
    assert sum(g < 60 for g in graphemes) > 0.2 * len(graphemes)


def test_identifiers_have_the_real_shapes(events: list[ev.Event]) -> None:
    tid = re.compile(r"[234567abcdefghij][234567a-z]{12}")
    revs: dict[str, str] = {}
    for e in events:
        assert re.fullmatch(r"did:plc:[a-z2-7]{24}", e.did)
        if isinstance(e, ev.CommitEvent):
            c = e.commit
            assert tid.fullmatch(c.rev)
            assert c.rkey == "self" or tid.fullmatch(c.rkey)
            if c.operation != "delete":
                assert c.cid is not None and len(c.cid) == 59 and c.cid.startswith("bafyrei")
            # revs increase per DID
            assert c.rev > revs.get(e.did, "")
            revs[e.did] = c.rev
        elif isinstance(e, ev.IdentityEvent):
            assert e.identity.did == e.did
        else:
            assert e.account.did == e.did


def test_activity_is_heavy_tailed(events: list[ev.Event]) -> None:
    per_did = collections.Counter(e.did for e in events)
    ranked = sorted(per_did.values(), reverse=True)
    top = ranked[: max(1, len(ranked) // 100)]
    assert sum(top) > 0.05 * N  # the top 1% of accounts make 5x their share or more
    assert ranked[0] > 30
    assert len(per_did) > N // 4  # yet many events come from a long tail


def test_deletes_and_updates_refer_to_earlier_records(events: list[ev.Event]) -> None:
    created: dict[tuple[str, str, str], str] = {}  # (did, collection, rkey) -> create rev
    in_stream = deleted_twice = 0
    deleted: set[tuple[str, str, str]] = set()
    for e in events:
        if not isinstance(e, ev.CommitEvent):
            continue
        c = e.commit
        key = (e.did, c.collection, c.rkey)
        if c.operation == "create" and c.rkey != "self":
            created.setdefault(key, c.rev)
        elif c.operation == "delete":
            assert key not in deleted
            deleted.add(key)
            if key in created:
                in_stream += 1
                assert c.rev > created[key]
            # a delete never precedes its create
        elif c.operation == "update" and key in created:
            assert c.rev > created[key]
    assert in_stream > 50
    assert deleted_twice == 0
    # fh.deleted_at names the delete of an in-stream create
    for j in range(2000):
        i = fh.deleted_at(CFG, j)
        if i is not None and kind_name(events[j]) in ("like", "follow", "post", "repost"):
            d = events[i]
            assert isinstance(d, ev.CommitEvent) and d.commit.operation == "delete"
            assert (d.did, d.commit.rkey) == (events[j].did, events[j].commit.rkey)  # type: ignore[union-attr]


def test_posts_are_realistic(events: list[ev.Event]) -> None:
    posts = [
        (e, msgspec.json.decode(e.commit.record))
        for e in events
        if isinstance(e, ev.CommitEvent) and kind_name(e) == "post"
    ]
    earlier: set[str] = set()
    langs: collections.Counter[str] = collections.Counter()
    features: collections.Counter[str] = collections.Counter()
    embeds: collections.Counter[str] = collections.Counter()
    replies = replies_in_stream = quotes_in_stream = common = 0
    for e, record in posts:
        uri = at_uri(e.did, "app.bsky.feed.post", e.commit.rkey)
        text = record["text"]
        raw = text.encode()
        langs.update(record.get("langs", []))
        for facet in record.get("facets", []):
            start, end = facet["index"]["byteStart"], facet["index"]["byteEnd"]
            piece = raw[start:end].decode()  # offsets fall on character boundaries
            feature = facet["features"][0]
            kind = feature["$type"].rsplit("#", 1)[1]
            features[kind] += 1
            if kind == "tag":
                assert piece == "#" + feature["tag"]
            elif kind == "mention":
                assert piece.startswith("@") and feature["did"].startswith("did:plc:")
            else:
                assert feature["uri"].startswith("https://")
                assert feature["uri"][8:].startswith(piece.removesuffix("..."))
        if "reply" in record:
            replies += 1
            parent = record["reply"]["parent"]["uri"]
            replies_in_stream += parent in earlier
            assert record["reply"]["root"]["uri"].startswith("at://did:plc:")
        embed = record.get("embed")
        if embed:
            embeds[embed["$type"]] += 1
            if embed["$type"] == "app.bsky.embed.record":
                quotes_in_stream += embed["record"]["uri"] in earlier
            if embed["$type"] == "app.bsky.embed.images":
                assert all("alt" in image for image in embed["images"])
        common += fh.COMMON_WORD in text.lower()
        assert fh.ABSENT_WORD not in text.lower()
        earlier.add(uri)
    n = len(posts)
    assert {"en", "ja", "pt", "de", "es", "ko"} <= set(langs)
    assert langs["en"] > 0.4 * n
    assert set(features) == {"tag", "mention", "link"}
    assert {
        "app.bsky.embed.images",
        "app.bsky.embed.external",
        "app.bsky.embed.record",
        "app.bsky.embed.recordWithMedia",
        "app.bsky.embed.video",
    } <= set(embeds)
    assert 0.25 * n < replies < 0.45 * n
    assert replies_in_stream > 0.2 * replies
    assert quotes_in_stream > 0
    assert 0.015 * n < common < 0.05 * n


def test_rare_word_frequency_is_configurable() -> None:
    cfg = fh.FirehoseConfig(seed=11, events=20_000, rare_word_every=50)
    texts = [
        msgspec.json.decode(f)["commit"]["record"]["text"]
        for f in fh.generate(cfg)
        if b'"collection":"app.bsky.feed.post","rkey"' in f and b'"operation":"create"' in f
    ]
    rare = sum(fh.RARE_WORD in t for t in texts)
    assert 0.5 * len(texts) / 50 < rare < 1.6 * len(texts) / 50


def test_malformed_and_oversized_frames_are_flagged_and_counted() -> None:
    cfg = fh.FirehoseConfig(seed=4, events=4000, malformed_fraction=0.02, oversized_fraction=0.005)
    truth = fh.GroundTruth()
    flags = collections.Counter()
    reasons = collections.Counter()
    for item in fh.generate_items(cfg):
        assert fh.flag_at(cfg, item.position) == item.flag
        flags[item.flag] += 1
        truth.add(item.frame, now=NOW)
        if item.flag == fh.OK:
            ev.decode(item.frame, now=NOW)
            continue
        with pytest.raises(ev.Rejected) as caught:
            ev.decode(item.frame, now=NOW)
        reasons[caught.value.reason] += 1
        if item.flag == fh.OVERSIZED:
            assert caught.value.reason == "oversized"
            assert len(item.frame) > 1_100_000
            ev.decode(item.frame, now=NOW, max_bytes=2_000_000)  # valid apart from its size
        else:
            assert caught.value.reason != "oversized"
    assert 40 < flags[fh.MALFORMED] < 130 and 5 < flags[fh.OVERSIZED] < 45
    assert truth.malformed == flags[fh.MALFORMED]
    assert truth.oversized == flags[fh.OVERSIZED]
    assert truth.count() == flags[fh.OK]
    assert len(reasons) >= 5  # several kinds of damage


def test_ground_truth_digest_is_order_independent(events: list[ev.Event]) -> None:
    truth = fh.ground_truth(fh.FirehoseConfig(seed=11, events=5000))
    sample = events[:5000]
    assert truth.count() == 5000
    by_table: dict[str, list[NaturalKey]] = collections.defaultdict(list)
    for e in sample:
        by_table[table_for(e)].append(natural_key(e))
    for table, keys in by_table.items():
        random.Random(1).shuffle(keys)
        digest = fh.key_digest(keys)
        days = truth.tables[table]
        assert digest.count == sum(d.count for d in days.values())
        assert digest.digest == sum(d.digest for d in days.values()) % 2**64
        # one key missing or changed is seen
        assert fh.key_digest(keys[1:]).digest != digest.digest
    deleted_posts = {
        at_uri(e.did, e.commit.collection, e.commit.rkey)
        for e in sample
        if isinstance(e, ev.CommitEvent)
        and e.commit.operation == "delete"
        and e.commit.collection == "app.bsky.feed.post"
    }
    assert truth.deleted_post_uris == deleted_posts
    assert truth.deleted_posts.count == len(deleted_posts)


def test_ground_truth_splits_days() -> None:
    cfg = fh.FirehoseConfig(seed=2, events=3000, events_per_day=1000)
    truth = fh.ground_truth(cfg)
    days = {day for per_day in truth.tables.values() for day in per_day}
    assert days == {"2026-07-01", "2026-07-02", "2026-07-03"}
    assert sum(d.count for t in truth.tables.values() for d in t.values()) == 3000


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="events_per_day"):
        fh.FirehoseConfig(events_per_day=0)
    with pytest.raises(ValueError, match="start_us"):
        fh.FirehoseConfig(start_us=1_782_864_000)  # seconds by mistake
    with pytest.raises(ValueError, match="malformed"):
        fh.FirehoseConfig(malformed_fraction=1.5)


def test_cli_generate_writes_plain_zstd_and_truth(tmp_path: Path) -> None:
    expected = list(fh.generate(fh.FirehoseConfig(seed=9, events=500)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "generate",
            "--events",
            "500",
            "--seed",
            "9",
            "--out",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert out.split(b"\n")[:-1] == expected
    zst = tmp_path / "x.jsonl.zst"
    truth = tmp_path / "truth.json"
    subprocess.run(
        [
            sys.executable, "-m", "loadtest", "generate", "--events", "500", "--seed", "9",
            "--out", str(zst), "--truth", str(truth),
        ],
        check=True,
    )  # fmt: skip
    data = zstandard.ZstdDecompressor().stream_reader(zst.open("rb")).read()
    assert data.split(b"\n")[:-1] == expected
    decoded = msgspec.json.decode(truth.read_bytes(), type=fh.GroundTruth)
    assert decoded.frames == 500 and decoded.count() == 500
    # in parallel: chunks (one zstd frame each) in order, the same bytes and the same truth
    parallel, parallel_truth = tmp_path / "p.jsonl.zst", tmp_path / "p.json"
    subprocess.run(
        [
            sys.executable, "-m", "loadtest", "generate", "--events", "500", "--seed", "9",
            "--out", str(parallel), "--truth", str(parallel_truth), "--jobs", "2", "--chunk", "150",
        ],
        check=True,
    )  # fmt: skip
    reader = zstandard.ZstdDecompressor().stream_reader(
        parallel.open("rb"), read_across_frames=True
    )
    assert reader.read().split(b"\n")[:-1] == expected
    assert parallel_truth.read_bytes() == truth.read_bytes()
    assert [i.frame for i in read_items([parallel])] == expected  # the server reads all frames
    bad = subprocess.run(
        [sys.executable, "-m", "loadtest", "generate", "--events", "5", "--malformed", "2"],
        capture_output=True,
    )
    assert bad.returncode == 2 and b"--malformed" in bad.stderr
