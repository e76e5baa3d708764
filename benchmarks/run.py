"""rdzv benchmarks, measured side by side in one run on one etcd server.

    python benchmarks/run.py            # the full run
    python benchmarks/run.py --quick    # a short run, as CI does, so the benchmarks never rot

Contenders run interleaved, round by round in a shuffled order, so that drift in the machine's
speed falls on all of them alike. Results go to benchmarks/results/*.json; the summary table
reports medians and the ratio of each contender to the floor (raw aetcd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd

import rdzv
from rdzv.testing import EtcdServer

RESULTS = Path(__file__).parent / "results"

Operation = Callable[[], Awaitable[None]]


async def interleave(
    contenders: dict[str, Operation], *, rounds: int, batch: int, warmup: int
) -> dict[str, list[float]]:
    """Run each contender's operation `rounds * batch` times, interleaved; per-op seconds."""
    for operation in contenders.values():
        for _ in range(warmup):
            await operation()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            operation = contenders[name]
            for _ in range(batch):
                started = time.perf_counter()
                await operation()
                samples[name].append(time.perf_counter() - started)
    return samples


def summarize(samples: dict[str, list[float]], floor: str) -> dict[str, dict[str, float]]:
    """Median and p90 in microseconds, and each median's ratio to the floor's."""
    floor_median = statistics.median(samples[floor])
    summary = {}
    for name, values in samples.items():
        median = statistics.median(values)
        summary[name] = {
            "median_us": median * 1e6,
            "p90_us": statistics.quantiles(values, n=10)[-1] * 1e6,
            "ratio_to_floor": median / floor_median,
            "n": len(values),
        }
    return summary


class RawAetcd:
    """The floor: raw aetcd sending the same range read and the same Txn as rdzv."""

    def __init__(self, client: aetcd.Client, key: bytes, lease: int) -> None:
        self.client, self.key, self.lease = client, key, lease
        self.token = 0

    async def get(self) -> None:
        await self.client.get(self.key)

    async def set(self, value: bytes) -> None:
        tx = self.client.transactions
        compare = tx.mod(self.key) == self.token if self.token else tx.create(self.key) == 0
        succeeded, responses = await self.client.transaction(
            compare=[compare],
            success=[tx.put(self.key, value, self.lease)],
            failure=[tx.get(self.key)],
        )
        if not succeeded:
            raise RuntimeError("raw aetcd lost a compare-and-swap it should have won")
        self.token = responses[0].response_put.header.revision


async def bench_core_size(
    connection: rdzv.Connection,
    client: aetcd.Client,
    prefix: str,
    size: int,
    *,
    quick: bool,
) -> dict[str, Any]:
    """get_state and set_state of one state size, rdzv async against raw aetcd."""
    # Large states get fewer samples, to keep the bytes written (and the run) bounded.
    rounds, batch, warmup = (10, 20, 20) if quick or size > 64 * 1024 else (30, 50, 50)
    state = random.randbytes(size)
    backend = rdzv.AsyncEtcdBackend(connection, f"core-{size}", key_prefix=prefix)
    lease = await client.lease(ttl=3600)
    raw = RawAetcd(client, f"{prefix}/raw-{size}".encode(), lease.id)
    await raw.set(state)
    written = await backend.set_state(state)
    assert written is not None
    token = written[1]

    async def rdzv_set() -> None:
        nonlocal token
        result = await backend.set_state(state, token)
        assert result is not None
        assert result[2], "rdzv lost an uncontended compare-and-swap"
        token = result[1]

    async def rdzv_get() -> None:
        await backend.get_state()

    async def raw_set() -> None:
        await raw.set(state)

    get_samples = await interleave(
        {"raw aetcd": raw.get, "rdzv async": rdzv_get}, rounds=rounds, batch=batch, warmup=warmup
    )
    set_samples = await interleave(
        {"raw aetcd": raw_set, "rdzv async": rdzv_set}, rounds=rounds, batch=batch, warmup=warmup
    )
    # Old revisions of large values fill etcd's quota; drop them before the next size.
    await client.compact(raw.token)
    return {
        "get_state": summarize(get_samples, "raw aetcd"),
        "set_state": summarize(set_samples, "raw aetcd"),
    }


async def bench_core(endpoint: str, *, quick: bool) -> dict[str, Any]:
    """get_state and set_state: rdzv's async core against raw aetcd, per state size."""
    sizes = [1024] if quick else [1024, 16 * 1024, 160 * 1024, 1024 * 1024]
    host, port = endpoint.rsplit(":", 1)
    prefix = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    async with (
        rdzv.connect(endpoint) as connection,
        aetcd.Client(host=host, port=int(port)) as client,
    ):
        return {
            str(size): await bench_core_size(connection, client, prefix, size, quick=quick)
            for size in sizes
        }


async def bench_facade(endpoint: str, *, quick: bool) -> dict[str, Any]:
    """The synchronous facade against the async core it wraps: the cost of the thread hop."""
    rounds, batch, warmup = (10, 20, 20) if quick else (30, 50, 50)
    prefix = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    state = random.randbytes(1024)
    async with rdzv.connect(endpoint) as connection:
        core = rdzv.AsyncEtcdBackend(connection, "facade-async", key_prefix=prefix)
        with rdzv.EtcdBackend(endpoint, "facade-sync", key_prefix=prefix) as facade:
            tokens = {"async": (await core.set_state(state))[1], "sync": facade.set_state(state)[1]}  # type: ignore[index]

            async def core_set() -> None:
                tokens["async"] = (await core.set_state(state, tokens["async"]))[1]  # type: ignore[index]

            async def facade_set() -> None:
                # A blocking call on purpose: the facade runs on its own event-loop thread.
                tokens["sync"] = facade.set_state(state, tokens["sync"])[1]  # type: ignore[index]

            async def core_get() -> None:
                await core.get_state()

            async def facade_get() -> None:
                facade.get_state()

            get_samples = await interleave(
                {"rdzv async": core_get, "rdzv sync": facade_get},
                rounds=rounds,
                batch=batch,
                warmup=warmup,
            )
            set_samples = await interleave(
                {"rdzv async": core_set, "rdzv sync": facade_set},
                rounds=rounds,
                batch=batch,
                warmup=warmup,
            )
    results = {}
    for op, samples in (("get_state", get_samples), ("set_state", set_samples)):
        summary = summarize(samples, "rdzv async")
        summary["rdzv sync"]["added_us"] = (
            summary["rdzv sync"]["median_us"] - summary["rdzv async"]["median_us"]
        )
        results[op] = summary
    return results


def print_facade(results: dict[str, Any]) -> None:
    print("\nsync facade vs async core, 1 KiB (median µs; ~100 µs added is the target)")
    print(f"{'op':<10} {'async':>8} {'sync':>8} {'added':>7}")
    for op, summary in results.items():
        ours, core = summary["rdzv sync"], summary["rdzv async"]
        print(
            f"{op:<10} {core['median_us']:>8.0f} {ours['median_us']:>8.0f} {ours['added_us']:>7.0f}"
        )


def print_core(results: dict[str, Any]) -> None:
    print("\nasync core vs raw aetcd (median µs; ratio = rdzv / raw, 1.10 is the target)")
    print(f"{'size':>9} {'op':<10} {'raw aetcd':>10} {'rdzv async':>11} {'ratio':>6}")
    for size, ops in results.items():
        for op, summary in ops.items():
            raw, ours = summary["raw aetcd"], summary["rdzv async"]
            print(
                f"{int(size):>9} {op:<10} {raw['median_us']:>10.0f} "
                f"{ours['median_us']:>11.0f} {ours['ratio_to_floor']:>6.3f}"
            )


def machine() -> dict[str, Any]:
    import aetcd as aetcd_module
    import grpc

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "rdzv": rdzv.__version__,
        "aetcd": getattr(aetcd_module, "__version__", "1.0.0"),
        "grpcio": grpc.__version__,
    }


async def main(args: argparse.Namespace) -> None:
    server = None
    endpoint = args.endpoints
    if endpoint is None:
        server = EtcdServer(name="rdzv-bench")
        server.start()
        endpoint = server.endpoint
    try:
        core = await bench_core(endpoint, quick=args.quick)
        facade = await bench_facade(endpoint, quick=args.quick)
    finally:
        if server is not None:
            server.stop()
    print_core(core)
    print_facade(facade)
    RESULTS.mkdir(exist_ok=True)
    name = "overhead-quick.json" if args.quick else "overhead.json"
    report = {"machine": machine(), "quick": args.quick, "core": core, "facade": facade}
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--endpoints", help="an etcd to use instead of starting one")
    asyncio.run(main(parser.parse_args()))
