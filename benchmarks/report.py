"""The targets of the benchmarks, judged from the results files, and the summary in Markdown.

Every ratio compares two contenders measured in the same run, interleaved on the same server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contention
import latency
import processes
import rendezvous
import scale
from contenders import ASYNC, C10D, SYNC, V2
from harness import markdown_table, read_json, results_dir, write_json

SUITES = ("latency", "overhead", "contention", "rendezvous", "scale")


def load(*, quick: bool) -> dict[str, dict[str, Any]]:
    """Every suite's latest results (of the full or the quick run)."""
    found = {}
    for suite in SUITES:
        data = read_json(results_dir(quick=quick) / f"{suite}.json")
        if data is not None:
            found[suite] = data
    return found


def _verdict(row: dict[str, Any]) -> str:
    if row["met"] is None:
        return "not measured"
    if row["met"]:
        return "met"
    missed = row.get("missed_at")
    return "**missed**" + (f" at {', '.join(missed)}" if missed else "")


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: what was measured, and whether it is met."""
    rows: list[dict[str, Any]] = []

    overhead = results.get("overhead")
    core_ratios = facade_added = None
    if overhead is not None:
        by_call = {row["call"]: row for row in latency.ratios(overhead)}
        core_ratios = {call: row["async_over_raw"] for call, row in by_call.items()}
        facade_added = {call: row["facade_added_us"] for call, row in by_call.items()}
    rows.append(
        {
            "target": "rdzv async within 10% of raw aetcd (1 KiB)",
            "measured": _join(core_ratios, "{:.3f}x"),
            "met": None if core_ratios is None else max(core_ratios.values()) <= 1.10,
            "missed_at": [call for call, value in (core_ratios or {}).items() if value > 1.10],
            "source": "overhead",
        }
    )
    rows.append(
        {
            "target": "the sync facade adds at most ~100 µs per call (1 KiB)",
            "measured": _join(facade_added, "{:+.0f} µs"),
            "met": None if facade_added is None else max(facade_added.values()) <= 100,
            "missed_at": [call for call, value in (facade_added or {}).items() if value > 100],
            "source": "overhead",
        }
    )

    lat = results.get("latency")
    for call, goal, label in (
        (latency.SET, 1.3, "rdzv set_state at least 1.3x faster than etcd-v2"),
        (latency.GET, 1.0, "rdzv get_state no slower than etcd-v2"),
    ):
        for name, key in ((SYNC, "v2_over_sync"), (ASYNC, "v2_over_async")):
            measured = None
            if lat is not None:
                measured = {
                    latency.size_label(row["size"]): row[key]
                    for row in latency.ratios(lat)
                    if row["call"] == call and key in row
                }
            rows.append(
                {
                    "target": f"{label} ({name}; etcd-v2 time ÷ rdzv time)",
                    "measured": _join(measured, "{:.2f}x"),
                    "met": None if not measured else min(measured.values()) >= goal,
                    "missed_at": [size for size, value in (measured or {}).items() if value < goal],
                    "source": "latency",
                }
            )

    con = results.get("contention")
    by_k = {} if con is None else {row["writers"]: row for row in contention.ratios(con)}
    for name, key in ((ASYNC, "async_over_v2"), (SYNC, "sync_over_v2")):
        value = by_k.get(64, {}).get(key)
        rows.append(
            {
                "target": f"throughput at K=64 at least 2x etcd-v2's ({name})",
                "measured": None if value is None else f"{value:.2f}x",
                "met": None if value is None else value >= 2.0,
                "source": "contention",
            }
        )
    rows.extend(scale_targets(results.get("scale")))
    rows.extend(torchrun_targets(results.get("rendezvous")))
    return rows


def torchrun_targets(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """torchrun's handlers (issue 12): rdzv's two against c10d and etcd-v2, in the same run."""
    rows: list[dict[str, Any]] = []

    def seconds(name: str, nodes: int) -> float | None:
        return None if data is None else rendezvous.seconds_of(data, name, nodes)

    c10d = seconds(C10D, 128)
    for name, goal, label in (
        (rendezvous.ROUNDS, 0.25, "etcd-v3-rounds at N=128 in at most a quarter of c10d's time"),
        (rendezvous.V3, 1.5, "etcd-v3 (torch's handler) at N=128 at most 1.5x c10d's time"),
    ):
        value = seconds(name, 128)
        measured = None
        if value is not None and c10d is not None:
            measured = f"{value:.2f} s ÷ {c10d:.2f} s = {value / c10d:.2f}x"
        elif data is not None and 128 in [int(n) for n in data["nodes"]]:
            measured = f"{name}: {_seconds(value)}, c10d: {_seconds(c10d)}"
        rows.append(
            {
                "target": label,
                "measured": measured,
                "met": None if value is None or c10d is None else value <= goal * c10d,
                "source": "rendezvous",
            }
        )
    # Every N measured: etcd-v3 ÷ etcd-v2, each N's medians from the same run. Where etcd-v2
    # did not complete a round and etcd-v3 did, etcd-v3 was the faster.
    ratios: list[str] = []
    missed: list[str] = []
    for nodes in [] if data is None else [int(n) for n in data["nodes"]]:
        v2, v3 = seconds(V2, nodes), seconds(rendezvous.V3, nodes)
        if v3 is None:
            ratios.append(
                f"N={nodes}: etcd-v3 not done" + ("" if v2 is None else f", v2 {v2:.2f} s")
            )
            if v2 is not None:
                missed.append(f"N={nodes}")
        elif v2 is None:
            ratios.append(f"N={nodes}: etcd-v2 not done, v3 {v3:.2f} s")
        else:
            ratios.append(f"N={nodes}: {v3 / v2:.2f}x")
            if v3 > v2:
                missed.append(f"N={nodes}")
    rows.append(
        {
            "target": "etcd-v3 (torch's handler) no slower than etcd-v2 at every N (v3 ÷ v2)",
            "measured": ", ".join(ratios) or None,
            "met": None if not ratios else not missed,
            "missed_at": missed,
            "source": "rendezvous",
        }
    )
    return rows


def _seconds(value: float | None) -> str:
    return "not done" if value is None else f"{value:.2f} s"


def scale_targets(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The scalable rendezvous's targets (issue 10), judged on `rendezvous, 1 connection`."""
    rows: list[dict[str, Any]] = []

    def seconds(server: str, nodes: int, name: str = scale.ONE) -> float | None:
        return None if data is None else scale.seconds_of(data, server, name, nodes)

    for server, nodes, goal in (
        (scale.ONE_ETCD, 1_000, 1.5),
        (scale.ONE_ETCD, 10_000, 10.0),
        (scale.CLUSTER, 1_000, 2.0),
    ):
        value, per_100 = seconds(server, nodes), seconds(server, nodes, scale.PER_100)
        measured = None
        if value is not None:
            measured = f"{value:.2f} s"
            if per_100 is not None:
                measured += f" (1 connection per 100: {per_100:.2f} s)"
        rows.append(
            {
                "target": f"{nodes:,} agents in at most {goal:g} s on {server}",
                "measured": measured,
                "met": None if value is None else value <= goal,
                "source": "scale",
            }
        )
    # Per join at the target's scale: at N=8 a round's few shared reads and watches weigh more.
    per_join: dict[str, float] = {}
    for nodes in (1_000, 10_000):
        for server in () if data is None else data["server_kinds"]:
            summary = data["nodes"].get(str(nodes), {}).get(f"{server} | {scale.ONE}")
            if summary is not None and summary["requests_per_join"] is not None:
                per_join[f"{nodes:,} on {server}"] = summary["requests_per_join"]
    rows.append(
        {
            "target": "at most 3 etcd requests per join (N = 1,000 and 10,000)",
            "measured": _join(per_join, "{:.2f}"),
            "met": None if not per_join else max(per_join.values()) <= 3,
            "missed_at": [where for where, value in per_join.items() if value > 3],
            "source": "scale",
        }
    )
    grown = {
        server: value
        for server in (() if data is None else data["server_kinds"])
        if (value := scale.growth(data, server)) is not None
    }
    rows.append(
        {
            "target": "from 1,000 to 10,000 nodes, time grows at most linearly (ratio <= 10)",
            "measured": _join(grown, "{:.1f}x"),
            "met": None if not grown else max(grown.values()) <= 10,
            "missed_at": [server for server, value in grown.items() if value > 10],
            "source": "scale",
        }
    )
    return rows


def _join(values: dict[str, float] | None, form: str) -> str | None:
    if not values:
        return None
    return ", ".join(f"{key}: {form.format(value)}" for key, value in values.items())


def targets_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["target", "measured", "verdict"],
        [[row["target"], row["measured"] or "—", _verdict(row)] for row in rows],
    )


def machine_table(results: dict[str, dict[str, Any]]) -> str:
    any_suite = next(iter(results.values()))
    machine = any_suite["machine"]
    return markdown_table(["", ""], [[key, value] for key, value in machine.items()])


def summary(results: dict[str, dict[str, Any]], *, quick: bool) -> str:
    """The whole report, in Markdown, as `docs/benchmarks.md` shows it."""
    if not results:
        return "No results yet: run `python benchmarks/run.py`.\n"
    parts = [
        f"# Benchmark summary ({'quick' if quick else 'full'} run)",
        "## Machine",
        machine_table(results),
        "## Targets",
        targets_table(targets(results)),
    ]
    for suite, data in results.items():
        when = f"{data['started_at']}, {data['seconds']:.0f} s, load average {data['load']}"
        parts.append(f"## {suite} ({when})")
        if suite in ("latency", "overhead"):
            parts.append("Median (p90) per call, µs:")
            parts.append(latency.table(data))
            parts.append("Ratios of medians:")
            parts.append(latency.ratio_table(data))
        elif suite == "contention":
            parts.append(
                f"Successful compare-and-swaps per second, median of {data['rounds']} windows of "
                f"{data['window_seconds']} s (conflicts per success), {data['state_size']} B state:"
            )
            parts.append(contention.table(data))
        elif suite == "rendezvous":
            parts.append(
                "Seconds until every node has its rank (median and p10-p90 of the rounds that "
                f"completed within {data['join_timeout']} s, {data['rounds']} rounds per "
                "contender and N, interleaved), client CPU and etcd requests per node, backend "
                f"calls and lost compare-and-swaps (medians); code {data.get('code', '?')}, load "
                f"average {data['load_average']['before']} before, "
                f"{data['load_average']['after']} after:"
            )
            parts.append(rendezvous.table(data))
            parts.append("Ratios of medians:")
            parts.append(rendezvous.ratio_table(data))
            if "processes" in data:
                parts.append(processes.report(data))
        elif suite == "scale":
            parts.append(
                "Seconds until every node has its rank (median of the rounds that completed "
                f"within {data['join_timeout']:g} s, a fresh server per run), etcd requests per "
                "join, etcd's peak memory, client and etcd CPU seconds and etcd's fsync seconds "
                "(medians):"
            )
            parts.append(scale.table(data))
            parts.append("Ratios of medians:")
            parts.append(scale.ratio_table(data))
            parts.append("etcd requests per join by method (rendezvous, 1 connection):")
            parts.append(scale.methods_table(data))
    return "\n\n".join(parts) + "\n"


def write(results: dict[str, dict[str, Any]], *, quick: bool) -> Path:
    directory = results_dir(quick=quick)
    text = summary(results, quick=quick)
    (directory / "summary.md").write_text(text)
    write_json(directory / "targets.json", {"targets": targets(results) if results else []})
    return directory / "summary.md"
