"""rdzv benchmarks: every contender side by side, on servers this command starts itself.

    python benchmarks/run.py                    # the full run (docs/benchmarks.md)
    python benchmarks/run.py --quick            # a short run, as CI does, so nothing rots
    python benchmarks/run.py --only contention  # one suite (or several: --only a --only b)

Suites: `latency` (get_state, successful and conflicting set_state, 1 KiB to 1 MiB),
`overhead` (rdzv's core over raw aetcd, the sync facade over the core), `contention` (K
concurrent writers), `rendezvous` (N nodes through torchrun's handlers: torch's over etcd-v2,
etcd-v3 and c10d, rdzv's etcd-v3-rounds; and rdzv's demo; the nodes as threads of a few
processes, then as one process each, cold and warm, and the recovery after a round), `scale`
(`rdzv.AsyncRendezvous` and the single-blob compare-and-swap from 8 to 10,000 nodes, on one etcd
and on a 3-member cluster).

One etcd 3.5 (v2 API enabled, for PyTorch's etcd-v2 backend) serves every etcd contender, and
one TCPStore serves c10d; the `scale` suite starts a fresh etcd (or cluster) for each of its runs
instead. Contenders take turns, round by round in a new random order, so that
drift in the machine's speed falls on all of them alike. Each suite writes
benchmarks/results/<suite>.json; then come benchmarks/results/summary.md (the tables and the
targets) and the plots, docs/img/bench-<suite>.png. A quick run writes all of these under
benchmarks/results/quick/ instead, and leaves the docs' plots alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import Any

import contention
import latency
import plots
import processes
import rendezvous
import report
import scale
from contenders import ALL, ASYNC, RAW, SYNC
from harness import load_average, machine, results_dir, write_json
from servers import Servers, describe_servers, start_servers

Suite = Callable[[Servers, bool], Awaitable[dict[str, Any]]]


async def _latency(servers: Servers, quick: bool) -> dict[str, Any]:
    sizes = latency.QUICK_SIZES if quick else latency.SIZES
    return await latency.run(servers, quick=quick, names=ALL, sizes=sizes)


async def _overhead(servers: Servers, quick: bool) -> dict[str, Any]:
    return await latency.run(
        servers,
        quick=quick,
        names=(RAW, ASYNC, SYNC),
        sizes=(latency.KIB,),
        ops=(latency.GET, latency.SET),
        overhead=True,
    )


async def _contention(servers: Servers, quick: bool) -> dict[str, Any]:
    return await contention.run(servers, quick=quick, names=ALL)


async def _rendezvous(servers: Servers, quick: bool) -> dict[str, Any]:
    """The threads shape, then the process shape and the recovery, under "processes"."""
    results = await rendezvous.run(servers, quick=quick)
    print("  process shape", flush=True)
    results["processes"] = await processes.run(servers, quick=quick)
    return results


async def _scale(servers: Servers, quick: bool) -> dict[str, Any]:
    return await scale.run(quick=quick)


SUITES: dict[str, Suite] = {
    "latency": _latency,
    "overhead": _overhead,
    "contention": _contention,
    "rendezvous": _rendezvous,
    "scale": _scale,
}

TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "latency": lambda data: latency.table(data) + "\n\n" + latency.ratio_table(data),
    "overhead": lambda data: latency.table(data) + "\n\n" + latency.ratio_table(data),
    "contention": contention.table,
    "rendezvous": lambda data: "\n\n".join(
        part
        for part in (rendezvous.table(data), rendezvous.ratio_table(data), processes.report(data))
        if part
    ),
    "scale": lambda data: "\n\n".join(
        [scale.table(data), scale.ratio_table(data), scale.methods_table(data)]
    ),
}


async def main(args: argparse.Namespace) -> None:
    selected = args.only or list(SUITES)
    started = time.perf_counter()
    with start_servers() as servers:
        about = {
            "quick": args.quick,
            "machine": machine(servers.etcd.binary),
            "servers": describe_servers(servers),
        }
        for name in selected:
            print(f"\n{name}", flush=True)
            suite_started = time.perf_counter()
            at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            results = await SUITES[name](servers, args.quick)
            record = {
                "suite": name,
                "started_at": at,
                "seconds": round(time.perf_counter() - suite_started, 1),
                "load": load_average(),
                **about,
                **results,
            }
            write_json(results_dir(quick=args.quick) / f"{name}.json", record)
            print(f"\n{TABLES[name](record)}\n({record['seconds']:.0f} s)", flush=True)
    everything = report.load(quick=args.quick)
    print("\n" + report.targets_table(report.targets(everything)))
    written = [
        report.write(everything, quick=args.quick),
        *plots.draw(everything, quick=args.quick),
    ]
    print("\nwrote " + ", ".join(str(path) for path in written))
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SUITES),
        metavar="SUITE",
        help=f"run only this suite ({', '.join(SUITES)}); may be repeated",
    )
    asyncio.run(main(parser.parse_args()))
