"""PNG plots of the results files; the docs embed those of the full run (docs/img/bench-*.png).

python benchmarks/plots.py [--quick]    # draw again from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import latency
import scale
from contenders import ASYNC, C10D, RAW, SYNC, V2
from harness import images_dir
from rendezvous import DEMO, ROUNDS, V3

# One colour and marker per contender, the same in every plot.
STYLE: dict[str, dict[str, Any]] = {
    RAW: {"color": "#7f7f7f", "marker": "s", "linestyle": "--"},
    ASYNC: {"color": "#1f77b4", "marker": "o"},
    SYNC: {"color": "#2ca02c", "marker": "^"},
    V2: {"color": "#d62728", "marker": "v"},
    C10D: {"color": "#9467bd", "marker": "D", "linestyle": ":"},
    DEMO: {"color": "#17becf", "marker": "o", "linestyle": "-."},
    # torchrun's handlers: etcd-v3 is torch's handler over rdzv's facade, as SYNC is.
    V3: {"color": "#2ca02c", "marker": "^"},
    ROUNDS: {"color": "#ff7f0e", "marker": "*", "markersize": 8},
    scale.ONE: {"color": "#1f77b4", "marker": "o"},
    scale.PER_100: {"color": "#ff7f0e", "marker": "s", "linestyle": "--"},
    scale.FACADE: {"color": "#2ca02c", "marker": "^"},
    scale.CAS: {"color": "#d62728", "marker": "v", "linestyle": ":"},
}


def _style(name: str) -> dict[str, Any]:
    return {"label": name, "linewidth": 1.6, "markersize": 5, **STYLE.get(name, {})}


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _errorbars(axes: Axes, xs: list[float], stats: list[dict[str, float]], name: str) -> None:
    """Medians joined by a line, with a bar from p10 to p90."""
    medians = [s["median"] for s in stats]
    below = [s["median"] - s["p10"] for s in stats]
    above = [s["p90"] - s["median"] for s in stats]
    axes.errorbar(xs, medians, yerr=[below, above], capsize=3, **_style(name))


def plot_latency(data: dict[str, Any], path: Path) -> Path:
    sizes = [int(size) for size in data["sizes"]]
    calls = list(next(iter(data["sizes"].values())))
    figure, axes_row = plt.subplots(1, len(calls), figsize=(5 * len(calls), 4.2), squeeze=False)
    for axes, call in zip(axes_row[0], calls, strict=True):
        for name in data["contenders"]:
            stats = [data["sizes"][str(size)][call][name] for size in sizes]
            _errorbars(axes, [float(size) for size in sizes], [_ms(s) for s in stats], name)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(sizes, [latency.size_label(size) for size in sizes])
        axes.set_title(call)
        axes.set_xlabel("state size")
        axes.set_ylabel("ms per call (median, p10-p90)")
        axes.grid(True, which="both", alpha=0.3)
    axes_row[0][0].legend(fontsize=8)
    figure.suptitle("Latency of one call, one caller")
    return _save(figure, path)


def _ms(stats: dict[str, float]) -> dict[str, float]:
    return {key: value / 1000 if key != "n" else value for key, value in stats.items()}


def plot_overhead(data: dict[str, Any], path: Path) -> Path:
    """The async core over raw aetcd (ratio) and the facade over the core (µs), per call."""
    rows = latency.ratios(data)
    labels = [f"{latency.size_label(r['size'])}\n{r['call']}" for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["async_over_raw"] for r in rows], color=STYLE[ASYNC]["color"])
    left.axhline(1.10, color="black", linestyle="--", linewidth=1, label="target: 1.10")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("rdzv async ÷ raw aetcd (medians)")
    left.set_ylim(bottom=0.8)
    left.legend(fontsize=8)
    right.bar(labels, [r["facade_added_us"] for r in rows], color=STYLE[SYNC]["color"])
    right.axhline(100, color="black", linestyle="--", linewidth=1, label="target: 100 µs")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("rdzv sync - rdzv async (µs, medians)")
    right.legend(fontsize=8)
    figure.suptitle("What rdzv adds: the async core over aetcd, the facade over the core")
    return _save(figure, path)


def plot_contention(data: dict[str, Any], path: Path) -> Path:
    writers = [int(k) for k in data["writers"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in data["contenders"]:
        summaries = [data["writers"][str(k)][name] for k in writers]
        _errorbars(left, [float(k) for k in writers], [s["throughput"] for s in summaries], name)
        right.plot(writers, [s["conflicts_per_success"] for s in summaries], **_style(name))
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(writers, [str(k) for k in writers])
        axes.set_xlabel("K concurrent writers")
        axes.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("successful CAS per second (median, p10-p90)")
    right.set_yscale("log")
    right.set_ylabel("conflicts per success")
    left.legend(fontsize=8)
    figure.suptitle(
        f"K writers, one {data['state_size']} B state, {data['window_seconds']} s windows"
    )
    return _save(figure, path)


def plot_rendezvous(data: dict[str, Any], path: Path) -> Path:
    """Seconds, client CPU per node and etcd requests per node against N, one line per
    contender."""
    nodes = [int(n) for n in data["nodes"]]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    for name in data["contenders"]:
        summaries = [data["nodes"][str(n)][name] for n in nodes]
        done = [(n, s) for n, s in zip(nodes, summaries, strict=True) if s["seconds"] is not None]
        if done:
            _errorbars(left, [float(n) for n, _ in done], [s["seconds"] for _, s in done], name)
        for axes, key, scale_by in (
            (middle, "client_cpu_per_node", 1000.0),
            (right, "etcd_requests_per_node", 1.0),
        ):
            points = [(n, s) for n, s in zip(nodes, summaries, strict=True) if s.get(key)]
            # The line joins the N where a round completed; a cross marks a round that did not
            # (its CPU and requests are those of a round that ran into the join timeout).
            line = [(n, s[key] * scale_by) for n, s in points if s["completed"]]
            if line:
                axes.plot([n for n, _ in line], [v for _, v in line], **_style(name))
            crosses = [(n, s[key] * scale_by) for n, s in points if not s["completed"]]
            if crosses:
                axes.plot(
                    [n for n, _ in crosses],
                    [v for _, v in crosses],
                    linestyle="none",
                    marker="x",
                    markersize=8,
                    color=STYLE.get(name, {}).get("color"),
                )
    for axes in (left, middle, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(nodes, [str(n) for n in nodes])
        axes.minorticks_off()
        axes.set_xlabel("N nodes")
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
    left.set_ylabel("seconds until every node has its rank (median, p10-p90)")
    middle.set_ylabel("client CPU ms per node (median)")
    right.set_ylabel("etcd requests per node (median)")
    left.legend(fontsize=8)
    load = data.get("load_average", {})
    loads = (
        f"; load average {load.get('before', ['?'])[0]} before, {load.get('after', ['?'])[0]} after"
    )
    figure.suptitle(
        f"One rendezvous round, median of {data['rounds']} (a missing point or a cross: not done "
        f"within {data['join_timeout']} s){loads if load else ''}"
    )
    return _save(figure, path)


def plot_scale(data: dict[str, Any], path: Path) -> Path:
    """Seconds against N, log-log, one panel per server; the targets as crosses."""
    targets = {scale.ONE_ETCD: [(1_000, 1.5), (10_000, 10.0)], scale.CLUSTER: [(1_000, 2.0)]}
    servers = data["server_kinds"]
    figure, panels = plt.subplots(
        1, len(servers), figsize=(5.5 * len(servers), 4.4), squeeze=False, sharey=True
    )
    nodes = [int(n) for n in data["nodes"]]
    for axes, server in zip(panels[0], servers, strict=True):
        for name in data["contenders"]:
            done = [
                (n, s["seconds"])
                for n in nodes
                if (s := data["nodes"][str(n)].get(f"{server} | {name}")) is not None
                and s["seconds"] is not None
            ]
            if done:
                _errorbars(axes, [float(n) for n, _ in done], [s for _, s in done], name)
            for n in nodes:  # say so where a round did not complete within the join timeout
                s = data["nodes"][str(n)].get(f"{server} | {name}")
                if s is not None and s["seconds"] is not None and s["completed"] < s["attempted"]:
                    axes.annotate(
                        f"{s['completed']}/{s['attempted']} done",
                        (n, s["seconds"]["median"]),
                        textcoords="offset points",
                        xytext=(-58, 6),
                        fontsize=7,
                    )
        # Linear growth from the 1-connection rendezvous's smallest point, for the eye.
        first = next(
            (
                (n, s["seconds"]["median"])
                for n in nodes
                if (s := data["nodes"][str(n)].get(f"{server} | {scale.ONE}"))
                and s["seconds"] is not None
                and n >= 1_000
            ),
            None,
        )
        if first is not None:
            n0, t0 = first
            axes.plot(
                [n0, max(nodes)],
                [t0, t0 * max(nodes) / n0],
                color="0.35",
                linewidth=1.0,
                linestyle=(0, (1, 2)),
                label="linear from N=1,000",
            )
        for i, (n, goal) in enumerate(targets.get(server, [])):
            axes.plot([n], [goal], "kx", markersize=9, mew=2, label="target" if i == 0 else None)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(nodes, [f"{n:,}" for n in nodes])
        axes.minorticks_off()
        axes.set_xlabel("N nodes")
        axes.set_title(server)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    panels[0][0].set_ylabel("seconds until every node has its rank (median, p10-p90)")
    loads = scale.load_range(data)
    shown = "" if loads is None else f"; 1-minute load {loads[0]:.1f}-{loads[1]:.1f}"
    figure.suptitle(f"One round of N nodes, a fresh etcd per run{shown}")
    return _save(figure, path)


PLOTS = {
    "latency": plot_latency,
    "overhead": plot_overhead,
    "contention": plot_contention,
    "rendezvous": plot_rendezvous,
    "scale": plot_scale,
}


def draw(results: dict[str, dict[str, Any]], *, quick: bool) -> list[Path]:
    """Draw a plot for every suite that has results."""
    directory = images_dir(quick=quick)
    return [
        PLOTS[suite](data, directory / f"bench-{suite}.png")
        for suite, data in results.items()
        if suite in PLOTS
    ]


def main() -> None:
    import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick run's results")
    args = parser.parse_args()
    for path in draw(report.load(quick=args.quick), quick=args.quick):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
