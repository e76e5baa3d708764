"""Latency of one call: get_state, a successful set_state, a conflicting set_state.

One backend per contender, one caller, one call at a time. Each measured call is timed on its
own; contenders take turns in batches (see `harness.interleave`).

- `get_state`: one read of the current state.
- `set_state`: a compare-and-swap with the current token, which succeeds; the next call uses
  the token it returned.
- `set_state (conflict)`: a compare-and-swap with a stale token, which fails and returns the
  current state. rdzv and c10d learn it from the one request; etcd-v2 needs a second one (a
  read) after etcd refuses the write.

The `overhead` suite is this one with fewer contenders (raw aetcd, rdzv async, rdzv sync), one
size (1 KiB) and more samples: the cost of rdzv's core over aetcd, and of the facade's thread
hop over the core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any, Final

from contenders import ASYNC, RAW, SYNC, V2, AsyncBackend, Token, contenders, open_backend
from harness import Operation, flatten, interleave, load_average, markdown_table, ratio, summarize
from harness import timed as timed_run
from servers import Servers, compact

KIB: Final = 1024
MIB: Final = 1024 * 1024
SIZES: Final = (1 * KIB, 16 * KIB, 160 * KIB, 1 * MIB)
QUICK_SIZES: Final = (1 * KIB,)

GET = "get_state"
SET = "set_state"
CONFLICT = "set_state (conflict)"
OPS: Final = (GET, SET, CONFLICT)


@dataclasses.dataclass(frozen=True)
class Samples:
    """How many samples to take of one call of one contender."""

    rounds: int
    batch: int
    warmup: int

    @property
    def n(self) -> int:
        return self.rounds * self.batch


def latency_samples(size: int, *, quick: bool) -> Samples:
    """Large states get fewer samples: each write of 1 MiB costs etcd (and the run) much more."""
    if quick:
        return Samples(rounds=4, batch=5, warmup=3)
    if size >= MIB:
        return Samples(rounds=12, batch=5, warmup=3)
    if size >= 128 * KIB:
        return Samples(rounds=20, batch=5, warmup=5)
    return Samples(rounds=30, batch=10, warmup=10)


def overhead_samples(size: int, *, quick: bool) -> Samples:
    """Many samples: a difference of ~100 µs between ~1 ms calls needs them."""
    return Samples(rounds=4, batch=10, warmup=5) if quick else Samples(60, 20, 50)


def _state(size: int, tag: bytes) -> bytes:
    """`size` bytes that start with `tag`: states that differ (c10d compares them by value)."""
    return (tag * (size // len(tag) + 1))[:size]


class Probe:
    """One contender's backend, and the three calls measured on it."""

    def __init__(self, name: str, backend: AsyncBackend, size: int) -> None:
        self.name = name
        self._backend = backend
        self._initial = _state(size, b"initial-")
        # Successful writes alternate between two states, so no write repeats the current
        # state; the losing write sends a third one.
        self._states = (_state(size, b"a-"), _state(size, b"b-"))
        self._losing = _state(size, b"loser-")
        self._writes = 0
        self._token: Token = None
        self._stale: Token = None

    async def prepare(self) -> None:
        """Create the state; its first token becomes the stale one."""
        created = await self._backend.set_state(self._initial, None)
        if created is None or not created[2]:
            raise RuntimeError(f"{self.name}: could not create a fresh state")
        self._token = self._stale = created[1]
        # The initial state is never written again, so its token stays stale for good (c10d's
        # token is the state itself).
        await self.set_state()

    async def get_state(self) -> None:
        if await self._backend.get_state() is None:
            raise RuntimeError(f"{self.name}: the state vanished")

    async def set_state(self) -> None:
        state = self._states[self._writes % 2]
        result = await self._backend.set_state(state, self._token)
        if result is None or not result[2]:
            raise RuntimeError(f"{self.name}: lost a compare-and-swap it should have won")
        self._token = result[1]
        self._writes += 1

    async def set_state_conflict(self) -> None:
        result = await self._backend.set_state(self._losing, self._stale)
        if result is None or result[2]:
            raise RuntimeError(f"{self.name}: won a compare-and-swap it should have lost")

    def operation(self, op: str) -> Operation:
        return {GET: self.get_state, SET: self.set_state, CONFLICT: self.set_state_conflict}[op]


async def _measure_size(
    servers: Servers,
    namespace: str,
    names: Sequence[str],
    size: int,
    ops: Sequence[str],
    samples: Samples,
) -> dict[str, dict[str, dict[str, float]]]:
    async with contextlib.AsyncExitStack() as stack:
        probes = []
        for contender in contenders(servers, namespace, names):
            backend = await open_backend(stack, contender, f"latency-{size}")
            probes.append(Probe(contender.name, backend, size))
        for probe in probes:
            await probe.prepare()
        results = {}
        for op in ops:
            for probe in probes:
                for _ in range(samples.warmup):
                    await probe.operation(op)()
            runs = {probe.name: timed_run(probe.operation(op), samples.batch) for probe in probes}
            batches = await interleave(runs, rounds=samples.rounds)
            results[op] = summarize(
                {name: flatten(runs) for name, runs in batches.items()}, scale=1e6
            )
    return results


async def run(
    servers: Servers,
    *,
    quick: bool,
    names: Sequence[str],
    sizes: Sequence[int],
    ops: Sequence[str] = OPS,
    overhead: bool = False,
) -> dict[str, Any]:
    """Measure every size; between sizes, etcd drops the old revisions."""
    namespace = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    plan = overhead_samples if overhead else latency_samples
    results: dict[str, Any] = {
        "unit": "µs",
        "contenders": list(names),
        "sizes": {},
        "samples": {},
        "load_average": {"before": load_average()},
    }
    for size in sizes:
        await compact(servers)
        samples = plan(size, quick=quick)
        print(f"  {size:>8} bytes: {samples.n} samples per call and contender", flush=True)
        results["sizes"][str(size)] = await _measure_size(
            servers, namespace, names, size, ops, samples
        )
        results["samples"][str(size)] = dataclasses.asdict(samples)
    await compact(servers)
    results["load_average"]["after"] = load_average()
    return results


# -------------------------------------------------------------------------------- reporting


def size_label(size: int | str) -> str:
    size = int(size)
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def table(results: dict[str, Any]) -> str:
    """Median (p90) per call, size and contender."""
    names = results["contenders"]
    rows = []
    for size, ops in results["sizes"].items():
        for op, summary in ops.items():
            cells = [f"{summary[n]['median']:,.0f} ({summary[n]['p90']:,.0f})" for n in names]
            rows.append([size_label(size), op, *cells])
    return markdown_table(["size", "call", *names], rows)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size and call: rdzv async / raw aetcd, facade - core (µs), etcd-v2 / rdzv."""
    out = []
    for size, ops in results["sizes"].items():
        for op, summary in ops.items():
            median = {name: stats["median"] for name, stats in summary.items()}
            row: dict[str, Any] = {"size": int(size), "call": op}
            if RAW in median and ASYNC in median:
                row["async_over_raw"] = ratio(median[ASYNC], median[RAW])
            if ASYNC in median and SYNC in median:
                row["facade_added_us"] = median[SYNC] - median[ASYNC]
            if V2 in median and ASYNC in median:
                row["v2_over_async"] = ratio(median[V2], median[ASYNC])
            if V2 in median and SYNC in median:
                row["v2_over_sync"] = ratio(median[V2], median[SYNC])
            out.append(row)
    return out


def ratio_table(results: dict[str, Any]) -> str:
    columns = [
        ("async_over_raw", "rdzv async ÷ raw aetcd"),
        ("facade_added_us", "facade adds (µs)"),
        ("v2_over_async", "etcd-v2 ÷ rdzv async"),
        ("v2_over_sync", "etcd-v2 ÷ rdzv sync"),
    ]
    rows = ratios(results)
    # Only the ratios whose contenders ran (the overhead suite has no etcd-v2).
    shown = [(key, title) for key, title in columns if any(key in row for row in rows)]
    return markdown_table(
        ["size", "call", *(title for _, title in shown)],
        [[size_label(r["size"]), r["call"], *(r.get(key) for key, _ in shown)] for r in rows],
    )
