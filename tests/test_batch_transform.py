"""Stream entries → a batch's rows: the unchecked fast path with column-wise validation, and
the optional worker processes (APPLIANCE_BATCH_WORKERS), against event-by-event decoding."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from appliance import buffer, events
from appliance.batch import transform
from appliance.batch.decode import check_storable, columns_valid
from appliance.batch.tables import TableBuilder
from appliance.store import layout
from loadtest.firehose import FirehoseConfig, generate
from tests.helpers import DID, T0, commit

GOOD = commit({"text": "fine", "createdAt": "2026-07-04T00:00:00Z"}, rkey="3aaaaaaaaaaa2")

# One frame per check events.validate makes (and the fast path must not let through).
BAD = [
    commit({"text": "x"}, did="did:plc:short"),
    commit({"text": "x"}, did="did:web:" + "a" * 254),
    commit({"text": "x"}, rkey=".."),
    commit({"text": "x"}, rkey="."),
    commit({"text": "x"}, rkey="a" * 513),
    commit({"text": "x"}, rkey="has space"),
    commit({"text": "x"}, rkey="ünïcode"),
    commit({"text": "x"}, rev="1mptbypcq372f"),
    commit({"text": "x"}, rev="3mptbypcq372"),
    commit({"text": "x"}, collection="not an nsid"),
    commit({"text": "x"}, collection="fm.teal.has space"),
    commit({"text": "x"}, time_us=1_000),
    commit({"text": "x"}, time_us=events.now_us() + 3600 * 1_000_000),
    commit(None, operation="create"),
    json.dumps(
        {
            "did": DID,
            "time_us": T0,
            "kind": "identity",
            "identity": {"did": "did:plc:" + "b" * 24, "seq": 1, "time": "x"},
        }
    ).encode(),
    json.dumps(
        {
            "did": DID,
            "time_us": T0,
            "kind": "account",
            "account": {"active": True, "did": DID, "seq": 2**64, "time": "x"},
        }
    ).encode(),
]
# Valid corner cases the column checks must accept.
EDGE = [
    commit({"text": "x"}, did="did:web:" + "a" * 253, rkey="a" * 512),
    commit({"name": "x"}, collection="fm.teal.alpha.actor.status", rkey="self"),
    commit({"text": "x"}, rkey="a.b:c~d-e_f"),
    commit(None, operation="delete", collection="com.example.thing", rkey="3bbbbbbbbbbb2"),
]


def expected_reasons(frames: list[bytes]) -> list[str | None]:
    out: list[str | None] = []
    for frame in frames:
        try:
            event = events.decode(frame)
            if type(event) is not events.CommitEvent:
                check_storable(event)
        except events.Rejected as exc:
            out.append(exc.reason)
            continue
        out.append(None)
    return out


@pytest.fixture(scope="module", params=[0, 1], ids=["in-process", "one-worker"])
def pool(request: pytest.FixtureRequest) -> Iterator[transform.TransformPool | None]:
    if not request.param:
        yield None
        return
    p = transform.TransformPool(request.param)
    p.start()
    yield p
    p.close()


def entries_of(frames: list[bytes], per_entry: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
    return [
        (f"1-{i}", buffer.pack(frames[i : i + per_entry])) for i in range(0, len(frames), per_entry)
    ]


def rows_by_key(batch: transform.Batch) -> dict[str, set[str]]:
    return {t: set(layout.key_array(t, data).to_pylist()) for t, data in batch.tables().items()}


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_each_invalid_frame_is_rejected_with_its_reason_and_the_rest_kept(
    bad: bytes, pool: transform.TransformPool | None
) -> None:
    # One invalid frame per batch: the fast path must catch each on its own.
    frames = [GOOD, *EDGE, bad, commit({"text": "ok"}, rkey="3ccccccccc222")]
    batch = transform.Batch("new", pool=pool)
    batch.add_entries(entries_of(frames, 2))
    reasons = expected_reasons(frames)
    assert [(r.frame, r.reason) for r in batch.rejected] == [
        (f, r) for f, r in zip(frames, reasons, strict=True) if r is not None
    ]
    # The valid frames, and only they, are rows: the same as decoding event by event.
    reference = transform.Batch("new")
    for frame, reason in zip(frames, reasons, strict=True):
        if reason is None:
            reference.builder.add(events.decode(frame))
    assert rows_by_key(batch) == rows_by_key(reference)
    assert batch.frames == len(frames) and not batch.failed


def test_valid_corner_cases_pass_the_column_checks() -> None:
    builder = TableBuilder()
    for frame in [GOOD, *EDGE]:
        builder.add(events.decode(frame))
    now = events.now_us()
    for table, chunks in builder.take_chunks().items():
        assert all(columns_valid(table, chunk, now) for chunk in chunks), table


def test_parts_keep_stream_order_and_isolate_a_bad_entry(
    pool: transform.TransformPool | None,
) -> None:
    frames = list(generate(FirehoseConfig(seed=5, events=3_000)))
    entries = entries_of(frames, 100)
    entries.insert(7, ("1-torn", {buffer.FIELD_COUNT: b"5", buffer.FIELD_DATA: b"{}\n{}"}))
    entries.insert(20, ("1-gone", None))
    batch = transform.Batch("new", pool=pool)
    batch.add_entries(entries[:15])
    batch.add_entries(entries[15:])
    assert set(batch.failed) == {"1-torn", "1-gone"}
    assert batch.ok == [e for e, _ in entries if e not in batch.failed]
    reference = transform.Batch("new")
    reference.add_entries([e for e in entries if e[0] not in batch.failed])
    for table, data in reference.tables().items():
        # same rows in the same (stream) order
        assert batch.tables()[table].to_pylist() == data.to_pylist(), table


def test_a_dead_worker_costs_nothing_but_time() -> None:
    frames = list(generate(FirehoseConfig(seed=6, events=2_000)))
    pool = transform.TransformPool(1)
    try:
        pool.start()
        for pid in pool.pids():
            os.kill(pid, signal.SIGKILL)
        # The broken pool is noticed on submit or on the result: either the part is redone
        # in-process or fresh workers take it; the next read uses fresh workers.
        batch = transform.Batch("new", pool=pool)
        batch.add_entries(entries_of(frames, 100))
        again = transform.Batch("new", pool=pool)
        again.add_entries(entries_of(frames, 100))
        assert pool.pids()
    finally:
        pool.close()
    reference = transform.Batch("new")
    reference.add_entries(entries_of(frames, 100))
    for b in (batch, again):
        assert b.frames == len(frames) and not b.failed
        assert rows_by_key(b) == rows_by_key(reference)
