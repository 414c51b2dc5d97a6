"""The replay's report: `report.json` (every figure), `report.md` (the same, readable) and PNG
charts (matplotlib, from the `loadtest` extra): throughput, ingest lag, Redis memory, batch
durations, process RSS and query latencies."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from loadtest.replay.monitor import Sample
from loadtest.replay.source import Expectation

MB = 2**20


def _batch_lines(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return out
    for line in lines:
        if b'"batch written"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _gap_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.split("INFO ", 1)[-1] for line in text.splitlines() if "compressed a gap" in line]


def _flatness(samples: list[Sample], until_s: float) -> dict[str, Any]:
    """Soak: median of each series in the second quarter vs the last quarter of the replay
    (until every event was stored; the verification after it is left out)."""
    samples = [s for s in samples if s.t <= until_s]
    n = len(samples)
    if n < 8:
        return {}
    early, late = samples[n // 4 : n // 2], samples[3 * n // 4 :]
    out: dict[str, Any] = {}
    for name in samples[-1].rss:
        a = statistics.median(s.rss.get(name, 0) for s in early) / MB
        b = statistics.median(s.rss.get(name, 0) for s in late) / MB
        out[f"rss_mb.{name}"] = {"second_quarter": round(a, 1), "last_quarter": round(b, 1)}
    for field in ("stream_entries", "redis_memory", "pending"):
        a = statistics.median(getattr(s, field) for s in early)
        b = statistics.median(getattr(s, field) for s in late)
        out[field] = {"second_quarter": round(a, 1), "last_quarter": round(b, 1)}
    return out


def build(
    args: argparse.Namespace,
    events: int,
    expect: Expectation,
    prep: dict[str, Any],
    run: dict[str, Any],
    data_dir: Path,
) -> dict[str, Any]:
    v = run["verification"]
    batches = _batch_lines(run["batch_log"])
    raw = expect.raw_bytes
    wall = run["wall_s"]
    figures: dict[str, Any] = {
        "scale": args.scale,
        "events": events,
        "source": expect.source,
        "path": run["path"],
        "speed": "max" if args.speed is None else args.speed,
        "seed": args.seed,
        "faults_spec": args.faults,
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "prepare": prep,
        "events_generated": expect.frames,
        "events_valid": expect.truth.count(),
        "events_stored": v.events_stored,
        "lost": v.lost,
        "duplicates": v.duplicates,
        "verified": v.verified,
        "problems": v.problems,
        "wall_s": round(wall, 2),
        "events_per_s": round(expect.frames / wall) if wall else None,
        "processes": {
            name: {
                "peak_rss_mb": round(p.peak_rss / MB, 1),
                "cpu_s": round(p.cpu_s, 1),
                "restarts_by_faults": p.restarts,
                "unexpected_exits": p.unexpected_exits,
            }
            for name, p in run["procs"].items()
        },
        "parquet_bytes": run["parquet_bytes"],
        "raw_json_bytes": raw,
        "saving": round(1 - run["parquet_bytes"] / raw, 4) if raw else None,
        "parquet_bytes_per_event": round(run["parquet_bytes"] / max(v.events_stored, 1), 1),
        "batches": len(batches),
        "batch_seconds_median": round(statistics.median(b["seconds"] for b in batches), 3)
        if batches
        else None,
        "compact_s": round(run["compact_s"], 2),
        # answered from the compacted store (the state a day is in once closed)
        "query_latencies": latencies(v.searches_compacted),
        "query_latencies_batch_files": latencies(v.searches),
        "faults": [msgspec.to_builtins(f) for f in run["faults"]],
        "rejects": {"expected": v.rejects_expected, "found": v.rejects_found},
        "deleted_posts_checked": v.deleted_checked,
        "deleted_posts_visible": len(v.deleted_visible),
        "stats_endpoint_ok": v.stats_ok,
        "tables": [msgspec.to_builtins(t) for t in v.tables],
        "gaps_compressed": _gap_lines(run["server_log"]),
        "ingest_lag": _lag_figures(run["samples"], wall),
    }
    if args.soak is not None:
        figures["soak"] = {"seconds": args.soak, **_flatness(run["samples"], wall)}
    return figures


def latencies(searches: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "query": s.name,
            "params": s.params,
            "expected": s.expected,
            "search_s": s.search_s,
            "took_ms": s.search_took_ms,
            "export_s": s.export_s,
            "export_rows": s.export_rows,
            "ok": s.page_ok and s.export_ok,
        }
        for s in searches
    ]


def write(out: Path, figures: dict[str, Any], samples: list[Sample], batch_log: Path) -> None:
    (out / "report.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    (out / "samples.json").write_bytes(msgspec.json.encode(samples))
    charts = draw(out, figures, samples, _batch_lines(batch_log))
    (out / "report.md").write_text(markdown(figures, charts))


def markdown(f: dict[str, Any], charts: list[str]) -> str:
    problems = f["problems"]
    more = f" (and {len(problems) - 3} more in report.json)" if len(problems) > 3 else ""
    ok = "**passed**" if f["verified"] else "**FAILED**: " + "; ".join(problems[:3]) + more
    lines = [
        f"# Replay: {f['scale']} ({f['events']:,} events), {f['path']} path",
        "",
        f"Verification {ok}. Source: {f['source']}; speed {f['speed']}; seed {f['seed']}; "
        f"faults: {f['faults_spec'] or 'none'}. Finished {f['finished_at']} on {f['cpus']} "
        f"cores, 1-minute load average {f['load_average_1m_end']} at the end.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events generated / valid / stored | {f['events_generated']:,} / "
        f"{f['events_valid']:,} / {f['events_stored']:,} |",
        f"| lost / stored twice | {f['lost']} / {f['duplicates']} |",
        f"| wall time (stack start to the last event in Parquet) | {f['wall_s']:,.1f} s |",
        f"| events/s end to end | {f['events_per_s']:,} |",
        f"| Parquet vs raw JSON | {f['parquet_bytes']:,} B vs {f['raw_json_bytes']:,} B "
        f"({f['parquet_bytes_per_event']} B/event, {100 * (f['saving'] or 0):.1f}% smaller) |",
        f"| batches (median seconds) | {f['batches']} ({f['batch_seconds_median']}) |",
        f"| capture | {'from cache' if f['prepare']['from_cache'] else 'rendered'} in "
        f"{f['prepare']['prepare_s']} s |",
        f"| rejects expected / found | {f['rejects']['expected']} / {f['rejects']['found']} |",
        f"| deleted posts checked / visible | {f['deleted_posts_checked']} / "
        f"{f['deleted_posts_visible']} |",
        "",
        "| process | peak RSS MB | CPU s | restarts (faults) | unexpected exits |",
        "|---|---|---|---|---|",
    ]
    for name, p in f["processes"].items():
        lines.append(
            f"| {name} | {p['peak_rss_mb']} | {p['cpu_s']} | {p['restarts_by_faults']} | "
            f"{p['unexpected_exits'] or '-'} |"
        )
    lines += [
        "",
        "| query | expected rows | search s (took ms) | export s | equal |",
        "|---|---|---|---|---|",
    ]
    for q in f["query_latencies"]:
        lines.append(
            f"| {q['query']} `{q['params']}` | {q['expected']} | {q['search_s']} "
            f"({q['took_ms']}) | {q['export_s']} | {'yes' if q['ok'] else 'NO'} |"
        )
    if f["faults"]:
        lines += ["", "| fault | at (progress) | injected at s | recovered in s | detail |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for x in f["faults"]:
            rec = x["recovery_s"] if x["recovered"] else "NOT recovered"
            lines.append(
                f"| {x['kind']} | {x['at']:.2f} | {x['injected_s']:.1f} | {rec} | {x['detail']} |"
            )
    if f.get("soak"):
        lines += ["", "Soak (median, second quarter vs last quarter of the run):", ""]
        for key, value in f["soak"].items():
            lines.append(f"- {key}: {value}")
    if f["gaps_compressed"]:
        lines += ["", f"Gaps in the source compressed: {len(f['gaps_compressed'])}"]
    lines += ["", *_lag_text(f.get("ingest_lag")), "", *[f"![{c}]({c})" for c in charts], ""]
    return "\n".join(lines)


def _lag_text(lag: dict[str, Any] | None) -> list[str]:
    """What the ingest-lag figures and chart mean (the replay's clock, not the events' time)."""
    if not lag:
        return []
    behind = lag["parquet_behind_ingester_s"]
    parts = []
    if behind["median"] is not None:
        parts.append(
            f"Parquet trailed the ingester by {behind['median']} s (median), at most "
            f"{behind['max']} s: the seconds since the ingester had received as many frames "
            "as Parquet held events at that moment"
        )
    if lag["oldest_unstored_entry_s_max"] is not None:
        parts.append(
            "the oldest buffer entry not yet stored had waited at most "
            f"{lag['oldest_unstored_entry_s_max']} s (the batcher's gauge)"
        )
    if not parts:
        return []
    return [
        "Ingest lag, on the replay's own clock: " + "; ".join(parts) + ". The events carry "
        "the stream's time_us (synthetic data starts on 2026-07-01), so wall clock minus "
        "time_us would be the age of the data, not a delay of the pipeline."
    ]


def draw(
    out: Path, f: dict[str, Any], samples: list[Sample], batches: list[dict[str, Any]]
) -> list[str]:
    """The PNG charts; none (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loadtest replay: matplotlib is not installed (pip install '.[loadtest]'): no charts")
        return []
    t = [s.t for s in samples]
    made = []

    def save(name: str, fig: Any) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append(name)

    def marks(ax: Any) -> None:
        for x in f["faults"]:
            ax.axvline(x["injected_s"], color="red", alpha=0.3, lw=1)
        # every event stored; what follows is the verification and the compaction
        ax.axvline(f["wall_s"], color="black", ls="--", lw=1)

    fig, ax = plt.subplots(figsize=(9, 4))
    for field, label in (("received", "received by the ingester"), ("stored", "stored in Parquet")):
        ax.plot(t[1:], _rates(samples, field), label=label)
    ax.set(
        title="Throughput (events/s, 5 s window; red: faults; dashed: all stored)",
        xlabel="s",
        ylabel="events/s",
    )
    ax.legend()
    marks(ax)
    save("throughput.png", fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    behind = storage_lag(samples)
    if any(x is not None for x in behind):
        ax.plot(t, [float("nan") if x is None else x for x in behind],
                label="Parquet behind the ingester: s since it had received what is stored now")  # fmt: skip
    if any(s.buffer_age_s for s in samples):
        ax.plot(t, [s.buffer_age_s for s in samples], alpha=0.7,
                label="oldest buffer entry not yet stored: s it has waited (batcher)")  # fmt: skip
    ax.set(title="Ingest lag on the replay's clock (wall seconds, not the events' time_us)",
           xlabel="s", ylabel="s")  # fmt: skip
    ax.legend(fontsize="small")
    marks(ax)
    save("ingest_lag.png", fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [s.redis_memory / MB for s in samples], label="used memory (MB)")
    ax.set(title="Redis", xlabel="s", ylabel="MB")
    ax2 = ax.twinx()
    ax2.plot(
        t, [s.stream_entries for s in samples], color="tab:orange", ls=":", label="stream entries"
    )
    ax2.set_ylabel("stream entries")
    fig.legend(loc="upper right", bbox_to_anchor=(0.9, 0.88))
    marks(ax)
    save("redis_memory.png", fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(1, len(batches) + 1), [b["seconds"] for b in batches], ".")
    ax.set(title="Batch durations", xlabel="batch", ylabel="s")
    save("batch_durations.png", fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name in samples[-1].rss if samples else []:
        ax.plot(t, [s.rss.get(name, 0) / MB for s in samples], label=name)
    ax.set(title="Process RSS (with children)", xlabel="s", ylabel="MB")
    ax.legend()
    marks(ax)
    save("process_rss.png", fig)

    q = f["query_latencies"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ys = range(len(q))
    ax.barh([y + 0.2 for y in ys], [x["search_s"] for x in q], height=0.4, label="search")
    ax.barh([y - 0.2 for y in ys], [x["export_s"] for x in q], height=0.4, label="export")
    ax.set_yticks(list(ys), [x["query"] for x in q])
    ax.set(title="Query latencies through the API, compacted store (first call)", xlabel="s")
    ax.legend()
    save("query_latency.png", fig)
    return made


def storage_lag(samples: list[Sample]) -> list[float | None]:
    """Per sample, how many seconds earlier the ingester had received as many frames as
    Parquet holds events now: how far storage trails the stream on the replay's own clock.
    None before anything is stored, and on the direct path (no ingester counts received)."""
    out: list[float | None] = []
    j = 0
    for s in samples:
        while j < len(samples) and samples[j].received < s.stored:
            j += 1
        ok = s.stored > 0 and j < len(samples) and samples[j].t <= s.t
        out.append(round(s.t - samples[j].t, 2) if ok else None)
    return out


def _lag_figures(samples: list[Sample], until_s: float) -> dict[str, Any]:
    """Median and largest ingest lag on the replay's clock, up to the last event stored."""
    lags = [x for s, x in zip(samples, storage_lag(samples), strict=True) if s.t <= until_s]
    known = [x for x in lags if x is not None]
    ages = [s.buffer_age_s for s in samples if s.t <= until_s]
    return {
        "parquet_behind_ingester_s": {
            "median": round(statistics.median(known), 1) if known else None,
            "max": max(known, default=None),
        },
        "oldest_unstored_entry_s_max": round(max(ages), 1) if any(ages) else None,
    }


def _rates(samples: list[Sample], field: str, window: int = 5) -> list[float]:
    out = []
    for i in range(1, len(samples)):
        j = max(0, i - window)
        dt = samples[i].t - samples[j].t
        out.append((getattr(samples[i], field) - getattr(samples[j], field)) / dt if dt else 0.0)
    return out
