"""Scale: seconds until every node of one round has its rank, from 8 to 10,000 nodes.

Contenders, every node joining one round of `min_nodes = max_nodes = N`:

- `rendezvous, 1 connection`: `rdzv.AsyncRendezvous`, N participants (asyncio tasks) sharing
  one `rdzv.Connection`.
- `rendezvous, 1 connection per 100`: the same, with N / 100 connections (rounded up), each
  shared by 100 participants.
- `Rendezvous (sync), threads`: `rdzv.Rendezvous`, the synchronous facade: one per node, each
  with its event-loop thread and connection, each joining from a thread of its own. N <= 128.
- `single-blob CAS`: what the demo did before `AsyncRendezvous`: every agent appends its name to
  one JSON list with `AsyncEtcdBackend`'s compare-and-swap, then watches the list until it
  holds N names; its rank is its place in the list. The agents share one connection, as the
  first contender's do, so the two differ only in the protocol. N <= 300: lost
  compare-and-swaps grow as N², and 1,000 agents did not finish in 590 s.

Each run gets a Python process of its own, which imports rdzv and nothing else (not torch), and
a fresh server, one etcd or a 3-member cluster (`rdzv.testing`, etcd's default settings): no run
pays for what an earlier one left behind, and etcd's memory is the run's own. The connections
and participants exist before the clock starts; the clock stops when the last node has its
rank. Then every node leaves (timed apart, not in `seconds`) and the server stops.

Measured per run, for the time on the clock:

- `requests_per_join`: the v3 requests etcd received (its `/metrics`, summed over members:
  unary KV and Lease calls, and messages on Watch and LeaseKeepAlive streams), divided by N;
  `methods` has them by gRPC method; `refused` counts calls etcd refused for load ("too many
  requests"), `errors` every call or stream that ended with an error, by gRPC code.
- `etcd_peak_mib`: the largest etcd process's peak resident memory (the kernel's `VmHWM`; the
  process is new, so its peak is this run's), and `etcd_start_mib`, its memory at the start.
- `client_cpu`: CPU seconds of the run's process (every thread: asyncio, gRPC's, the
  facades'), and `client_gc`, the part of it in Python's cyclic garbage collector.
- `etcd_cpu`, `wal_fsync`, `backend_commit`: etcd's CPU seconds (summed over members) and its
  seconds in fsync of the write-ahead log and in backend commits (the largest member's).

Contenders take turns, run by run in a new random order (`harness.interleave`).

Then the real shape (`realshape.py`, in `real_shape` of the results): one connection per
participant, spread over 8 processes, beside the shared shape (the same participants, one
connection per process) and its floor (a `LeaseGrant` and a `Put` per connection),
interleaved; N = 8 and 64 in the quick run, 128 and 1,000 (and recovery at 1,000)
in the full one. `python benchmarks/realshape.py` runs it alone, up to 10,000.

    python benchmarks/scale.py --profile 10000     # cProfile of one run's clock (1 connection)
    python benchmarks/scale.py --collector 10000   # the same with Python's GC on and off
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import concurrent.futures
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import pstats
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import rdzv
import realshape
from harness import RESULTS, describe, interleave, load_average, markdown_table, ratio, write_json
from servers import counters_between, fresh_etcd, memory_kib, server_counters

NODES: Final = (8, 128, 300, 1_000, 10_000)
QUICK_NODES: Final = (8, 128)
# A cluster takes about 2 s to start: the quick run starts one for N=8 only.
QUICK_CLUSTER_NODES: Final = (8,)
SERVERS: Final = {"single etcd": 1, "cluster of 3": 3}
ONE_ETCD, CLUSTER = SERVERS

ONE = "rendezvous, 1 connection"
PER_100 = "rendezvous, 1 connection per 100"
FACADE = "Rendezvous (sync), threads"
CAS = "single-blob CAS"
CONTENDERS: Final = (ONE, PER_100, FACADE, CAS)
AGENTS_PER_CONNECTION: Final = 100
_SCRIPT: Final = str(Path(__file__).resolve())

# A round not done in this time is reported as not completed, and that contender is not run
# again at that N on that server.
JOIN_TIMEOUT: Final = 120.0
LEAVE_TIMEOUT: Final = 120.0

Outcome = dict[str, Any]


def rounds(*, quick: bool) -> int:
    return 1 if quick else 3


# ------------------------------------------------------------------------------- contenders


class Contender(abc.ABC):
    """N nodes of one round: made before the clock, joined on it, gone after it."""

    name: ClassVar[str]
    largest: ClassVar[int] = max(NODES)

    def __init__(self, endpoints: str, nodes: int, run_id: str) -> None:
        self.endpoints = endpoints
        self.nodes = nodes
        self.run_id = run_id
        self.extra: dict[str, Any] = {}  # what else a contender reports
        self.ranked = 0  # nodes that have their rank so far

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Open the connections and make the nodes."""

    @abc.abstractmethod
    async def join(self) -> list[tuple[int, int]]:
        """Every node joins; the (rank, world size) of each."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Every node leaves; close what `prepare` opened. Also after a failed `join`."""


class AsyncRendezvousContender(Contender):
    name = ONE
    per_connection: ClassVar[int | None] = None

    async def prepare(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        per = self.per_connection or self.nodes
        connections = [
            await self._stack.enter_async_context(rdzv.connect(self.endpoints))
            for _ in range(math.ceil(self.nodes / per))
        ]
        self._nodes = [
            rdzv.AsyncRendezvous(
                connections[index // per],
                self.run_id,
                min_nodes=self.nodes,
                max_nodes=self.nodes,
                join_timeout=JOIN_TIMEOUT,
            )
            for index in range(self.nodes)
        ]
        self.extra["connections"] = len(connections)

    async def join(self) -> list[tuple[int, int]]:
        return list(
            await asyncio.gather(*(self._one(i, node) for i, node in enumerate(self._nodes)))
        )

    async def _one(self, index: int, node: rdzv.AsyncRendezvous) -> tuple[int, int]:
        membership = await node.join(f"node-{index}".encode())
        self.ranked += 1
        return membership.rank, membership.world_size

    async def leave(self) -> None:
        try:
            await asyncio.gather(*(node.leave() for node in self._nodes))
        finally:
            await self._stack.aclose()


class PerHundredContender(AsyncRendezvousContender):
    name = PER_100
    per_connection = AGENTS_PER_CONNECTION


class FacadeContender(Contender):
    """Each node a thread with its own `rdzv.Rendezvous`, all released at once."""

    name = FACADE
    largest = 128

    async def prepare(self) -> None:
        def make(index: int) -> rdzv.Rendezvous:
            return rdzv.Rendezvous(
                self.endpoints,
                self.run_id,
                min_nodes=self.nodes,
                max_nodes=self.nodes,
                join_timeout=JOIN_TIMEOUT,
            )

        self._go = threading.Event()
        self._lock = threading.Lock()
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as makers:
            self._nodes = list(await asyncio.to_thread(makers.map, make, range(self.nodes)))
        # The threads exist and wait before the clock starts; `join` only releases them.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.nodes)
        self._futures = [self._pool.submit(self._node, node) for node in self._nodes]
        self.extra["connections"] = self.nodes

    def _node(self, node: rdzv.Rendezvous) -> tuple[int, int]:
        if not self._go.wait(timeout=JOIN_TIMEOUT * 3):
            raise RuntimeError("never released")
        membership = node.join(b"node")
        with self._lock:
            self.ranked += 1
        return membership.rank, membership.world_size

    async def join(self) -> list[tuple[int, int]]:
        self._go.set()
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in self._futures)))

    async def leave(self) -> None:
        self._go.set()  # a run that failed before `join` leaves no thread waiting
        try:
            await asyncio.to_thread(lambda: [*self._pool.map(rdzv.Rendezvous.leave, self._nodes)])
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


class CasContender(Contender):
    """One JSON list of names, appended to by compare-and-swap; ranks are places in the list."""

    name = CAS
    largest = 300

    async def prepare(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        connection = await self._stack.enter_async_context(rdzv.connect(self.endpoints))
        self._backends = [
            rdzv.AsyncEtcdBackend(connection, self.run_id, key_prefix="/rdzv-scale")
            for _ in range(self.nodes)
        ]
        self.extra.update(connections=1, lost_cas=0)

    async def _agent(self, name: str, backend: rdzv.AsyncEtcdBackend) -> tuple[int, int]:
        current = await backend.get_state()
        names, token = ([], None) if current is None else (json.loads(current[0]), current[1])
        while name not in names:
            if len(names) >= self.nodes:
                raise RuntimeError(f"{name} found the list full")
            written = await backend.set_state(json.dumps([*names, name]).encode(), token)
            if written is None:
                raise RuntimeError("the state expired during the run")
            state, token, won = written
            names = json.loads(state)
            self.extra["lost_cas"] += not won
        if len(names) < self.nodes:
            changes = backend.watch(token)
            try:
                async for state, _ in changes:
                    if state is None:
                        raise RuntimeError("the state expired during the run")
                    names = json.loads(state)
                    if len(names) >= self.nodes:
                        break
            finally:
                await changes.aclose()
        self.ranked += 1
        return names.index(name), len(names)

    async def join(self) -> list[tuple[int, int]]:
        agents = (self._agent(f"node-{i}", b) for i, b in enumerate(self._backends))
        return list(await asyncio.gather(*agents))

    async def leave(self) -> None:
        await self._stack.aclose()  # the state expires with its lease


CONTENDER_TYPES: Final[dict[str, type[Contender]]] = {
    cls.name: cls
    for cls in (AsyncRendezvousContender, PerHundredContender, FacadeContender, CasContender)
}


# -------------------------------------------------------------------------------- one run


class GcClock:
    """The seconds Python's cyclic garbage collector runs while this is entered, by generation.

    The collector stops the whole process, and each full (generation 2) collection walks every
    object the process holds: with 10,000 participants in one process, that is much of the
    client's time.
    """

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)


def _counters(members: Sequence[Any]) -> list[dict[str, float]]:
    return [server_counters(member) for member in members]


async def measure(
    name: str, server: str, nodes: int, *, profile: cProfile.Profile | None = None
) -> Outcome:
    """One round of `nodes` nodes of contender `name` on a fresh `server`.

    With `profile`, that profiler runs while the clock does (and not before or after).
    """
    run_id = f"scale-{uuid.uuid4().hex[:12]}"
    load = load_average()
    with fresh_etcd(SERVERS[server]) as members:
        contender = CONTENDER_TYPES[name](",".join(m.endpoint for m in members), nodes, run_id)
        await contender.prepare()
        try:
            start_memory = [memory_kib(m.pid) for m in members if m.pid is not None]
            before = _counters(members)
            cpu = time.process_time()
            started = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                with GcClock() as collector:
                    joined = await asyncio.wait_for(contender.join(), JOIN_TIMEOUT)
            except TimeoutError:
                joined = None
            finally:
                if profile is not None:
                    profile.disable()
            seconds = time.perf_counter() - started
            client_cpu = time.process_time() - cpu
            each = [counters_between(b, a) for b, a in zip(before, _counters(members), strict=True)]
            peak_memory = [memory_kib(m.pid) for m in members if m.pid is not None]
        finally:
            leave_started = time.perf_counter()
            try:
                await asyncio.wait_for(contender.leave(), LEAVE_TIMEOUT)
                left: float | None = time.perf_counter() - leave_started
            except TimeoutError:
                left = None
    if joined is not None:
        ranks = sorted(rank for rank, _ in joined)
        if ranks != list(range(nodes)) or {size for _, size in joined} != {nodes}:
            raise RuntimeError(f"{name}: a bad rendezvous at N={nodes}: ranks {ranks[:20]}...")
    total = {key: sum(c.get(key, 0) for c in each) for key in {k for c in each for k in c}}
    return {
        "seconds": seconds if joined is not None else None,
        "ranked": contender.ranked,
        "requests": total["requests"],
        "requests_per_join": total["requests"] / nodes,
        "methods": {
            key.split(":", 1)[1]: value
            for key, value in sorted(total.items())
            if key.startswith("method:") and value
        },
        "refused": total["refused"],
        "errors": {
            key.split(":", 1)[1]: value
            for key, value in sorted(total.items())
            if key.startswith("code:") and value
        },
        "etcd_start_mib": max(m["rss"] for m in start_memory) / 1024,
        "etcd_peak_mib": max(m["peak"] for m in peak_memory) / 1024,
        "client_cpu": client_cpu,
        "client_gc": sum(collector.seconds),
        "gc_seconds": collector.seconds,
        "gc_collections": collector.collections,
        "etcd_cpu": total.get("cpu_seconds"),
        "wal_fsync": max(c.get("wal_fsync_seconds", 0) for c in each),
        "wal_fsyncs": max(c.get("wal_fsyncs", 0) for c in each),
        "backend_commit": max(c.get("backend_commit_seconds", 0) for c in each),
        "leave_seconds": left,
        "load": load,
        **contender.extra,
    }


async def measure_apart(name: str, server: str, nodes: int) -> Outcome:
    """`measure` in a new Python process, which imports rdzv and nothing else.

    The suite's own process holds torch and matplotlib (other suites import them): some 200,000
    objects that every full garbage collection of the client would walk too. A process per run
    also starts with no threads, tasks or garbage of an earlier run.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        _SCRIPT,
        "--run",
        name,
        "--server",
        server,
        "--nodes",
        str(nodes),
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{name} at N={nodes} on {server} failed (exit {process.returncode})")
    outcome: Outcome = json.loads(output.decode().strip().splitlines()[-1])
    return outcome


# ------------------------------------------------------------------------------- the suite


def _code_version() -> str:
    """The commit measured, and whether rdzv's sources differed from it ("+ changes")."""
    root = Path(_SCRIPT).parent.parent
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


def _key(server: str, name: str) -> str:
    return f"{server} | {name}"


async def run(
    *, quick: bool, names: Sequence[str] = CONTENDERS, servers: Sequence[str] = tuple(SERVERS)
) -> dict[str, Any]:
    node_counts = QUICK_NODES if quick else NODES
    results: dict[str, Any] = {
        "contenders": list(names),
        "server_kinds": list(servers),
        "rounds": rounds(quick=quick),
        "join_timeout": JOIN_TIMEOUT,
        "agents_per_connection": AGENTS_PER_CONNECTION,
        "largest": {name: CONTENDER_TYPES[name].largest for name in names},
        "code": _code_version(),
        "nodes": {},
        "load_average": {"before": load_average()},
    }
    # One small untimed round of each contender first: imports, gRPC's start-up and the first
    # connections are then paid for before anything is measured.
    for name in () if quick else names:
        await measure_apart(name, servers[0], 8)
    gave_up: set[tuple[str, str, int]] = set()

    def attempt(server: str, name: str, nodes: int) -> Callable[[], Awaitable[Outcome]]:
        async def run_once() -> Outcome:
            if (server, name, nodes) in gave_up:
                return {"seconds": None, "skipped": True}
            outcome = await measure_apart(name, server, nodes)
            if outcome["seconds"] is None:
                gave_up.add((server, name, nodes))
            shown = "—" if outcome["seconds"] is None else f"{outcome['seconds']:.2f} s"
            print(f"    {server:<16} {name:<33} {shown}", flush=True)
            return outcome

        return run_once

    for nodes in node_counts:
        print(f"  N = {nodes:,}", flush=True)
        runs = {
            _key(server, name): attempt(server, name, nodes)
            for server in servers
            for name in names
            if nodes <= CONTENDER_TYPES[name].largest
            and not (quick and server == CLUSTER and nodes not in QUICK_CLUSTER_NODES)
        }
        outcomes = await interleave(runs, rounds=rounds(quick=quick))
        results["nodes"][str(nodes)] = {key: _summary(each) for key, each in outcomes.items()}
    # One connection per participant, in processes of their own, beside its floor (and, in
    # the full run, recovery): `realshape.py`.
    results["real_shape"] = await realshape.run(quick=quick)
    print(realshape.report(results["real_shape"]), flush=True)
    results["load_average"]["after"] = load_average()
    return results


_MEDIANS: Final = (
    "requests_per_join",
    "refused",
    "etcd_start_mib",
    "etcd_peak_mib",
    "client_cpu",
    "client_gc",
    "etcd_cpu",
    "wal_fsync",
    "wal_fsyncs",
    "backend_commit",
    "leave_seconds",
    "lost_cas",
    "connections",
)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    attempted = [o for o in outcomes if not o.get("skipped")]
    finished = [o["seconds"] for o in attempted if o["seconds"] is not None]
    summary: dict[str, Any] = {
        # Over the rounds that completed; `completed` says how many did, of `attempted`.
        "seconds": describe(finished) if finished else None,
        "completed": len(finished),
        "attempted": len(attempted),
    }
    for key in _MEDIANS:  # medians over every attempted round
        values = [o[key] for o in attempted if o.get(key) is not None]
        summary[key] = describe(values)["median"] if values else None
    summary["runs"] = attempted
    return summary


# -------------------------------------------------------------------------------- reporting


def split_key(key: str) -> tuple[str, str]:
    server, name = key.split(" | ", 1)
    return server, name


def seconds_of(data: dict[str, Any], server: str, name: str, nodes: int) -> float | None:
    summary = data["nodes"].get(str(nodes), {}).get(_key(server, name))
    if summary is None or summary["seconds"] is None:
        return None
    return float(summary["seconds"]["median"])


def load_range(data: dict[str, Any]) -> tuple[float, float] | None:
    """The lowest and highest 1-minute load average seen at the start of a run."""
    loads = [
        run_["load"][0]
        for by_key in data["nodes"].values()
        for summary in by_key.values()
        for run_ in summary["runs"]
        if run_.get("load")
    ]
    return (min(loads), max(loads)) if loads else None


def table(data: dict[str, Any]) -> str:
    """Medians per N, server and contender."""
    rows = []
    for nodes, by_key in data["nodes"].items():
        for server in data["server_kinds"]:
            for name in data["contenders"]:
                s = by_key.get(_key(server, name))
                if s is None:
                    continue
                seconds = s["seconds"]
                rows.append(
                    [
                        f"{int(nodes):,}",
                        server,
                        name,
                        None if seconds is None else seconds["median"],
                        None if seconds is None else f"{seconds['p10']:.2f}-{seconds['p90']:.2f}",
                        f"{s['completed']}/{s['attempted']}",
                        s["requests_per_join"],
                        s["etcd_peak_mib"],
                        s["client_cpu"],
                        s["client_gc"],
                        s["etcd_cpu"],
                        s["wal_fsync"],
                    ]
                )
    return markdown_table(
        [
            "N",
            "server",
            "contender",
            "seconds",
            "p10-p90",
            "done",
            "requests/join",
            "etcd peak MiB",
            "client CPU s",
            "of it GC s",
            "etcd CPU s",
            "fsync s",
        ],
        rows,
    )


def ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Ratios of medians from the same run, per N and server."""
    rows = []
    for nodes in (int(n) for n in data["nodes"]):
        for server in data["server_kinds"]:
            one = seconds_of(data, server, ONE, nodes)
            row: dict[str, Any] = {"nodes": nodes, "server": server}
            for name, key in ((PER_100, "per_100"), (FACADE, "facade"), (CAS, "cas")):
                other = seconds_of(data, server, name, nodes)
                if one is not None and other is not None:
                    row[f"{key}_over_one"] = ratio(other, one)
            single = seconds_of(data, ONE_ETCD, ONE, nodes)
            if server != ONE_ETCD and one is not None and single is not None:
                row["cluster_over_one_etcd"] = ratio(one, single)
            rows.append(row)
    return rows


def growth(data: dict[str, Any], server: str, name: str = ONE) -> float | None:
    """t(10,000) ÷ t(1,000): 10 is linear growth."""
    small, large = seconds_of(data, server, name, 1_000), seconds_of(data, server, name, 10_000)
    return None if small is None or large is None else ratio(large, small)


def ratio_table(data: dict[str, Any]) -> str:
    rows = [
        [
            f"{row['nodes']:,}",
            row["server"],
            row.get("per_100_over_one"),
            row.get("facade_over_one"),
            row.get("cas_over_one"),
            row.get("cluster_over_one_etcd"),
        ]
        for row in ratios(data)
    ]
    return markdown_table(
        [
            "N",
            "server",
            "1 conn. per 100 ÷ 1 conn.",
            "sync threads ÷ 1 conn.",
            "CAS ÷ 1 conn.",
            "cluster ÷ 1 etcd (1 conn.)",
        ],
        rows,
    )


def methods_table(data: dict[str, Any]) -> str:
    """etcd requests per join by gRPC method, for the 1-connection rendezvous (medians)."""
    rows = []
    for nodes, by_key in data["nodes"].items():
        for server in data["server_kinds"]:
            s = by_key.get(_key(server, ONE))
            if s is None or not s["runs"]:
                continue
            per_method: dict[str, list[float]] = {}
            for run_ in s["runs"]:
                for method, count in run_["methods"].items():
                    per_method.setdefault(method, []).append(count / int(nodes))
            shown = ", ".join(
                f"{method} {describe(values)['median']:.2f}"
                for method, values in sorted(per_method.items())
                if describe(values)["median"] > 0
            )
            rows.append([f"{int(nodes):,}", server, s["requests_per_join"], shown, s["refused"]])
    return markdown_table(["N", "server", "requests/join", "by method", "refused"], rows)


# ------------------------------------------------------------------------------- profiling


async def _profiled(nodes: int, server: str) -> tuple[Outcome, str]:
    profile = cProfile.Profile()
    outcome = await measure(ONE, server, nodes, profile=profile)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return outcome, text.getvalue()


async def _collector_check(nodes: int, server: str, rounds: int) -> dict[str, Any]:
    """The 1-connection rendezvous with Python's garbage collector on and off, interleaved."""

    async def run_with(enabled: bool) -> Outcome:
        gc.collect()
        if not enabled:
            gc.disable()
        try:
            return await measure(ONE, server, nodes)
        finally:
            gc.enable()

    runs = {"collector on": lambda: run_with(True), "collector off": lambda: run_with(False)}
    outcomes = await interleave(runs, rounds=rounds)
    summary = {
        mode: {
            key: describe([o[key] for o in each])["median"]
            for key in ("seconds", "client_cpu", "client_gc", "etcd_cpu", "wal_fsync")
        }
        for mode, each in outcomes.items()
    }
    on, off = summary["collector on"], summary["collector off"]
    return {
        "nodes": nodes,
        "server": server,
        "rounds": rounds,
        "summary": summary,
        "off_over_on": ratio(off["seconds"], on["seconds"]),
        "runs": outcomes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", type=int, metavar="N", help="cProfile one run's clock")
    what.add_argument("--run", choices=CONTENDERS, help="one run of this contender (as JSON)")
    what.add_argument(
        "--collector",
        type=int,
        metavar="N",
        help="Python's garbage collector on and off, interleaved; writes scale-collector-N.json",
    )
    parser.add_argument("--server", choices=list(SERVERS), default=ONE_ETCD)
    parser.add_argument("--rounds", type=int, default=3, help="with --collector")
    parser.add_argument("--nodes", type=int, default=8, help="with --run")
    args = parser.parse_args()
    if args.run is not None:
        print(json.dumps(asyncio.run(measure(args.run, args.server, args.nodes))))
        return
    if args.profile is not None:
        outcome, text = asyncio.run(_profiled(args.profile, args.server))
        print(text)
        print(json.dumps({k: v for k, v in outcome.items() if k != "methods"}, indent=1))
    else:
        data = asyncio.run(_collector_check(args.collector, args.server, args.rounds))
        data["load_average"] = load_average()
        write_json(RESULTS / f"scale-collector-{args.collector}.json", data)
        print(json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=1))
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
