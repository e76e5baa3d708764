"""What every suite shares: interleaving, statistics, tables and the results files."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"
# The docs embed the plots of the full run; a quick run keeps its plots to itself.
DOCS_IMAGES = ROOT / "docs" / "img"

Operation = Callable[[], Awaitable[None]]


async def interleave(
    runs: Mapping[str, Callable[[], Awaitable[T]]], *, rounds: int
) -> dict[str, list[T]]:
    """Run every contender once per round, in a new random order each round.

    Drift in the machine's speed (another process waking up, a CPU frequency change) then falls
    on all contenders alike instead of on whichever ran last.
    """
    results: dict[str, list[T]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            results[name].append(await runs[name]())
    return results


def timed(operation: Operation, times: int) -> Callable[[], Awaitable[list[float]]]:
    """A run that calls `operation` `times` times and returns the seconds each call took."""

    async def run() -> list[float]:
        samples = []
        for _ in range(times):
            started = time.perf_counter()
            await operation()
            samples.append(time.perf_counter() - started)
        return samples

    return run


def flatten(batches: Iterable[list[float]]) -> list[float]:
    return [sample for batch in batches for sample in batch]


def describe(values: Sequence[float], *, scale: float = 1.0) -> dict[str, float]:
    """Median, p10 and p90 of `values` (times `scale`), and how many there were."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        deciles = statistics.quantiles(ordered, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = ordered[0]
    return {
        "median": statistics.median(ordered) * scale,
        "p10": p10 * scale,
        "p90": p90 * scale,
        "n": len(ordered),
    }


def summarize(
    samples: Mapping[str, Sequence[float]], *, scale: float = 1.0
) -> dict[str, dict[str, float]]:
    """`describe` for every contender."""
    return {name: describe(values, scale=scale) for name, values in samples.items()}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; columns of numbers are right-aligned."""
    raw = [list(row) for row in rows]
    cells = [[_cell(value) for value in row] for row in raw]
    numeric = [bool(raw) and all(_is_number(row[i]) for row in raw) for i in range(len(headers))]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (width + 1) + (":" if right else "-")
        for width, right in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(headers), rule + "|", *(line(row) for row in cells)])


def _is_number(value: object) -> bool:
    """Numbers, missing numbers, and text that starts with one ("1,234 (2,345)")."""
    if isinstance(value, str):
        return value[:1].isdigit() or value[:1] == "-"
    return value is None or isinstance(value, int | float)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return "—"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if value is None:
        return "—"
    return str(value)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _etcd_version(binary: str) -> str:
    try:
        output = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "unknown"
    for line in output.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine(etcd_binary: str) -> dict[str, Any]:
    """The machine and the versions of everything measured."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "etcd": _etcd_version(etcd_binary),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
        "aetcd": _version("aetcd"),
        "python-etcd": _version("python-etcd"),
        "urllib3": _version("urllib3"),
        "rdzv": _version("rdzv"),
    }


def code_version() -> str:
    """The commit of the rdzv measured (the one `import rdzv` finds), "+ changes" if its src/
    differs from that commit."""
    import rdzv

    root = Path(rdzv.__file__).resolve().parent.parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit or 'unknown'}{' + changes' if changed else ''}"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: a busy machine makes noisy numbers."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def results_dir(*, quick: bool) -> Path:
    return QUICK_RESULTS if quick else RESULTS


def images_dir(*, quick: bool) -> Path:
    return QUICK_RESULTS if quick else DOCS_IMAGES


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None
