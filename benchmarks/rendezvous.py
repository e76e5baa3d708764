"""End to end: N simulated nodes join one rendezvous round, through torchrun's handlers.

- Through the `RendezvousHandler`s torchrun would use, one handler per node, each node a
  thread; the threads are spread over up to 8 processes (see "node hosts" below):
  - torch's `DynamicRendezvousHandler` over `etcd-v2` (torch's backend), over `etcd-v3`
    (`rdzv.torch.create_backend`, the sync facade) and over `c10d`;
  - rdzv's `etcd-v3-rounds` handler (`rdzv._torch_rounds.create_rounds_handler`): rdzv's O(N)
    rendezvous, one key per node on its own lease and one watched key per round.
  Every handler gets the same settings (`HANDLER_SETTINGS`), and `min_nodes == max_nodes == N`,
  so that no handler waits for `last_call_timeout`. The clock starts when every handler exists
  and all nodes call `next_rendezvous()` at once, and stops when the last one has returned its
  rank; a round that takes over `JOIN_TIMEOUT` is reported as not completed.
- Through rdzv's demo (`rdzv demo`, asyncio): N agents, each a task with its own connection,
  in this one process, join by compare-and-swap and wait with etcd's watch. Its time includes
  opening the N connections, which the handlers do before the clock starts.

Then, in the same run (`processes.py`): the four handlers in the process shape, one new process
and one handler per node as torchrun runs its agents, a job's first round (cold) and a second
one in the same processes (warm); and the recovery after a completed round, every node joining
again and one node killed.

torch's handler waits a random 0-0.3 s before a node's first attempt and polls the state every
second while it waits for the others (`_DistributedRendezvousOpExecutor`, `cache_duration=1`),
so at small N its times are mostly torch's own sleeps, the same for every backend. The requests
and the CPU tell the contenders apart:

- `backend calls` counts every `get_state` and `set_state` torch's handlers (or the demo's
  agents) made, counted by wrapping the backend; the `etcd-v3-rounds` handler has no such
  backend.
- `etcd requests` is etcd's own count (from its `/metrics`) of the requests it received
  meanwhile: those calls, plus the store's (the `MASTER_ADDR`/`MASTER_PORT` exchange), the
  lease grants and keep-alives, and the watches. c10d's TCPStore counts nothing of its own.
- `client CPU` is the CPU time of the node-host processes (every thread: torch's, the facade's
  event-loop thread, gRPC's) from the moment the nodes are let go until the host's last node
  has its rank, summed over the hosts.

`python benchmarks/rendezvous.py --profile etcd-v3 128` runs one round under py-spy, which
samples one node host, and writes where that host's CPU went (see `profile`).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, ClassVar, Final

from torch._C._distributed_c10d import Store  # as rdzv.torch imports it
from torch.distributed.elastic.rendezvous import RendezvousParameters, dynamic_rendezvous
from torch.distributed.elastic.rendezvous.api import RendezvousHandler, RendezvousTimeoutError

from contenders import C10D, V2
from harness import (
    RESULTS,
    code_version,
    describe,
    interleave,
    load_average,
    markdown_table,
    ratio,
)
from servers import Servers, requests_between, server_requests

NODES: Final = (8, 32, 64, 128)
QUICK_NODES: Final = (8,)
# The contenders, by the name torchrun knows each handler by (`--rdzv-backend`).
V3: Final = "etcd-v3"  # torch's handler over rdzv.torch.create_backend
ROUNDS: Final = "etcd-v3-rounds"  # rdzv's handler on the O(N) rendezvous
DEMO: Final = "rdzv async (demo)"
HANDLERS: Final = (V2, V3, C10D, ROUNDS)
ALL: Final = (*HANDLERS, DEMO)
# A round that takes longer is reported as not completed.
JOIN_TIMEOUT: Final = 60
HOSTS: Final = 8
# The quick run (N=8) spreads its nodes over 2 processes: each host imports torch, which takes
# seconds of a CI machine's CPU.
QUICK_HOSTS: Final = 2
# Every handler, whatever its backend, gets these `--rdzv-conf` settings (torch's defaults but
# for the timeouts). With min_nodes == max_nodes a round completes as soon as all N nodes are
# in: no handler waits for its last call.
HANDLER_SETTINGS: Final = {
    "read_timeout": "60",
    "join_timeout": str(JOIN_TIMEOUT),
    "last_call_timeout": "30",
    "close_timeout": "30",
    "keep_alive_interval": "5",
    "keep_alive_max_attempt": "3",
}

Outcome = dict[str, Any]
Run = Callable[[], Awaitable[Outcome]]
TorchBackend = dynamic_rendezvous.RendezvousBackend
Closer = Callable[[], None]
# A node's handler, and what closes what its `shutdown()` leaves open.
Made = tuple[RendezvousHandler, Closer]
# When a node had its rank (time.monotonic(), the same clock in every process), its rank and the
# world size; None if it had none within the join timeout.
Joined = tuple[float, int, int] | None


def rounds(*, quick: bool) -> int:
    return 1 if quick else 5


@dataclasses.dataclass
class CallCounts:
    get_state: int = 0
    set_state: int = 0
    lost: int = 0

    def __add__(self, other: CallCounts) -> CallCounts:
        return CallCounts(
            self.get_state + other.get_state,
            self.set_state + other.set_state,
            self.lost + other.lost,
        )


class Calls:
    """Backend calls, counted across a host's threads while `counting` is set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = CallCounts()
        self.counting = True

    def add(self, kind: str, *, lost: bool = False) -> None:
        with self._lock:
            if not self.counting:
                return
            if kind == "get_state":
                self._counts.get_state += 1
            else:
                self._counts.set_state += 1
                self._counts.lost += lost

    def counts(self) -> CallCounts:
        with self._lock:
            return dataclasses.replace(self._counts)


class CountingBackend(dynamic_rendezvous.RendezvousBackend):
    """A torch backend that counts the calls it passes on."""

    def __init__(self, backend: dynamic_rendezvous.RendezvousBackend, calls: Calls) -> None:
        self._backend = backend
        self._calls = calls

    @property
    def name(self) -> str:
        return self._backend.name

    def get_state(self) -> tuple[bytes, Any] | None:
        self._calls.add("get_state")
        return self._backend.get_state()

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        result = self._backend.set_state(state, token)
        self._calls.add("set_state", lost=result is None or not result[2])
        return result


class NodeFactory(abc.ABC):
    """How a contender makes one node's handler."""

    name: ClassVar[str]
    # Whether the handler's backend calls are counted (torch's handler has a backend to wrap).
    counts_calls: ClassVar[bool] = True

    def __init__(self, etcd_endpoint: str, c10d_endpoint: str) -> None:
        self.etcd_endpoint = etcd_endpoint
        self.c10d_endpoint = c10d_endpoint

    def parameters(
        self,
        run_id: str,
        nodes: int,
        *,
        min_nodes: int | None = None,
        settings: dict[str, str] = HANDLER_SETTINGS,
    ) -> RendezvousParameters:
        """torchrun's parameters for a node of a job of `nodes` nodes (`--nnodes=min_nodes:
        nodes`, `min_nodes` N unless given) with `settings` as its `--rdzv-conf`."""
        return RendezvousParameters(
            backend=self.name,
            endpoint=self.endpoint(),
            run_id=run_id,
            min_nodes=nodes if min_nodes is None else min_nodes,
            max_nodes=nodes,
            local_addr="127.0.0.1",
            **settings,
            **self.options(),
        )

    def endpoint(self) -> str:
        return self.etcd_endpoint

    def options(self) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def create(self, params: RendezvousParameters, calls: Calls) -> Made:
        """The node's handler, and what closes what `shutdown()` leaves open."""


class TorchHandler(NodeFactory):
    """torch's `DynamicRendezvousHandler` over one of torchrun's backends, as torchrun makes it
    (`dynamic_rendezvous.create_handler`), its backend wrapped to count the calls."""

    def create(self, params: RendezvousParameters, calls: Calls) -> Made:
        backend, store, close = self.backend(params)
        counted = CountingBackend(backend, calls)
        return dynamic_rendezvous.create_handler(store, counted, params), close

    @abc.abstractmethod
    def backend(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        """The backend, the store, and what closes them."""


class EtcdV2Handler(TorchHandler):
    name = V2

    def backend(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend

        backend, store = etcd_rendezvous_backend.create_backend(params)
        return backend, store, lambda: None


class RdzvHandler(TorchHandler):
    name = V3

    def backend(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        import rdzv.torch

        backend, store = rdzv.torch.create_backend(params)
        return backend, store, backend.facade.close


class C10dHandler(TorchHandler):
    name = C10D

    def endpoint(self) -> str:
        return self.c10d_endpoint

    def options(self) -> dict[str, str]:
        # The store server is ours (TCPStoreServer); every node is a client of it.
        return {"is_host": "false"}

    def backend(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

        backend, store = c10d_rendezvous_backend.create_backend(params)
        return backend, store, lambda: None


class RoundsHandler(NodeFactory):
    """rdzv's `etcd-v3-rounds` handler, made as torchrun's entry point makes it."""

    name = ROUNDS
    counts_calls = False

    def options(self) -> dict[str, str]:
        return {"key_prefix": "/rdzv-bench/rounds", "store_prefix": "/rdzv-bench/rounds-store/"}

    def create(self, params: RendezvousParameters, calls: Calls) -> Made:
        from rdzv._torch_rounds import create_rounds_handler

        # Its shutdown() releases its connection too.
        return create_rounds_handler(params), lambda: None


NODE_FACTORIES: Final[tuple[type[NodeFactory], ...]] = (
    EtcdV2Handler,
    RdzvHandler,
    C10dHandler,
    RoundsHandler,
)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """torch's rendezvous logs a line per node and step (rdzv's a line per join); keep the
    run's output readable."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "rdzv")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ------------------------------------------------------------------------------- node hosts
#
# The nodes run as threads, spread over a few processes ("hosts"). Put in one process, N torch
# handlers share one GIL: with 64 or more of them, that process spends a whole core switching
# between threads, each node's compare-and-swap waits its turn, and the handlers' keep-alive
# writes (every 5 s per node) outrun the joins, whatever the backend: c10d too. Real nodes each
# have a process, and CPU, of their own.


def _host(connection: Connection, go: EventType, etcd_endpoint: str, c10d_endpoint: str) -> None:
    """A host process: runs its share of each rendezvous when told to, until told to exit."""
    factories = {cls.name: cls(etcd_endpoint, c10d_endpoint) for cls in NODE_FACTORIES}
    with quiet_torch():
        while True:
            message = connection.recv()
            if message[0] == "exit":
                return
            _, name, run_id, nodes, share = message
            try:
                _host_round(connection, go, factories[name], run_id, nodes, share)
            except BaseException:
                connection.send(("error", traceback.format_exc()))


def _host_round(
    connection: Connection,
    go: EventType,
    factory: NodeFactory,
    run_id: str,
    nodes: int,
    share: int,
) -> None:
    calls = Calls()
    handlers: list[RendezvousHandler] = []
    closers: list[Closer] = []
    try:
        for _ in range(share):
            handler, close = factory.create(factory.parameters(run_id, nodes), calls)
            closers.append(close)
            handlers.append(handler)

        def node(handler: RendezvousHandler) -> Joined:
            go.wait()
            try:
                info = handler.next_rendezvous()
            except RendezvousTimeoutError:
                return None
            return time.monotonic(), info.rank, info.world_size

        with concurrent.futures.ThreadPoolExecutor(max_workers=share) as pool:
            futures = [pool.submit(node, handler) for handler in handlers]
            connection.send(("ready",))
            go.wait()
            # The CPU time of every thread of this process, torch's and rdzv's and gRPC's.
            cpu = time.process_time()
            joined = [future.result() for future in futures]
            cpu = time.process_time() - cpu
            connection.send(("joined", (joined, cpu)))
            connection.recv()  # "leave": every host's nodes are done
            calls.counting = False
            # Leave the round: each handler stops its keep-alive and marks itself closed.
            for _ in pool.map(lambda handler: handler.shutdown(), handlers):
                pass
    finally:
        for close in closers:
            close()
    counts = dataclasses.asdict(calls.counts()) if factory.counts_calls else None
    connection.send(("left", counts))


class NodeHosts:
    """The host processes, started once for the whole suite (each imports torch)."""

    def __init__(self, servers: Servers, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._go = context.Event()
        self._connections: list[Connection] = []
        self._processes: list[BaseProcess] = []
        self._servers = servers
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_host,
                args=(theirs, self._go, servers.etcd_endpoint, servers.c10d.endpoint),
                daemon=True,
            )
            process.start()
            self._connections.append(ours)
            self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        """The host processes' ids, the first host's first."""
        return [process.pid for process in self._processes if process.pid is not None]

    def close(self) -> None:
        for connection in self._connections:
            connection.send(("exit",))
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    def _receive(self, connection: Connection, expected: str, timeout: float) -> Any:
        if not connection.poll(timeout):
            raise RuntimeError(f"a node host did not answer {expected!r} within {timeout} s")
        message = connection.recv()
        if message[0] == "error":
            raise RuntimeError(f"a node host failed:\n{message[1]}")
        if message[0] != expected:
            raise RuntimeError(f"a node host said {message[0]!r}, not {expected!r}")
        return message[1] if len(message) > 1 else None

    def rendezvous(
        self,
        name: str,
        nodes: int,
        run_id: str,
        *,
        during: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> Outcome:
        """One round of `nodes` nodes of contender `name`; `during()` is entered just before
        the nodes are let go, and left when every node has its rank."""
        hosts = self._connections[:nodes]
        shares = [nodes // len(hosts) + (i < nodes % len(hosts)) for i in range(len(hosts))]
        self._go.clear()
        for connection, share in zip(hosts, shares, strict=True):
            connection.send(("join", name, run_id, nodes, share))
        for connection in hosts:
            self._receive(connection, "ready", 120)
        joined: list[Joined] = []
        cpu: list[float] = []
        with during():
            before = server_requests(self._servers.etcd)
            started = time.monotonic()
            self._go.set()
            for connection in hosts:
                host_joined, host_cpu = self._receive(connection, "joined", JOIN_TIMEOUT + 60)
                joined += host_joined
                cpu.append(host_cpu)
            received = requests_between(before, server_requests(self._servers.etcd))
        counts: CallCounts | None = CallCounts()
        for connection in hosts:
            connection.send(("leave",))
        for connection in hosts:
            left = self._receive(connection, "left", 120)
            counts = None if left is None or counts is None else counts + CallCounts(**left)
        self._go.clear()
        done = [j for j in joined if j is not None]
        ranks = sorted(rank for _, rank, _ in done)
        complete = len(done) == nodes
        if complete and (ranks != list(range(nodes)) or {s for _, _, s in done} != {nodes}):
            raise RuntimeError(f"{name}: a bad rendezvous: ranks {ranks}")
        requests = received["v3"] + received["v2"] if name != C10D else None
        return {
            # A round that did not complete within the join timeout has no time.
            "seconds": max(t for t, _, _ in done) - started if complete else None,
            "joined": len(done),
            "backend_calls": None if counts is None else counts.get_state + counts.set_state,
            "get_state": None if counts is None else counts.get_state,
            "set_state": None if counts is None else counts.set_state,
            "conflicts": None if counts is None else counts.lost,
            "etcd_requests": requests,
            "etcd_requests_per_node": None if requests is None else requests / nodes,
            "client_cpu_seconds": sum(cpu),
            "client_cpu_per_node": sum(cpu) / nodes,
            "host_cpu_seconds": cpu,
        }


async def _demo_rendezvous(servers: Servers, nodes: int, run_id: str, namespace: str) -> Outcome:
    from rdzv._demo import run_demo

    before = server_requests(servers.etcd)
    # The demo's agents are tasks of this process, which does nothing else meanwhile.
    cpu = time.process_time()
    try:
        result = await run_demo(
            nodes,
            servers.etcd_endpoint,
            run_id=run_id,
            key_prefix=f"{namespace}/demo",
            timeout=JOIN_TIMEOUT,
        )
    except TimeoutError:
        return {"seconds": None, "joined": None}
    cpu = time.process_time() - cpu
    received = requests_between(before, server_requests(servers.etcd))
    if sorted(result.ranks.values()) != list(range(nodes)):
        raise RuntimeError(f"the demo made a bad rendezvous: {result.ranks}")
    # Each agent reads once, then sends one set_state per attempt: N wins and the conflicts.
    sets = nodes + result.conflicts
    return {
        "seconds": result.seconds,
        "joined": nodes,
        "backend_calls": nodes + sets,
        "get_state": nodes,
        "set_state": sets,
        "conflicts": result.conflicts,
        "etcd_requests": received["v3"] + received["v2"],
        "etcd_requests_per_node": (received["v3"] + received["v2"]) / nodes,
        # Opening the N connections included.
        "client_cpu_seconds": cpu,
        "client_cpu_per_node": cpu / nodes,
        "connections": received["v3_status"],
    }


async def run(
    servers: Servers,
    *,
    quick: bool,
    names: Sequence[str] = ALL,
    nodes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The threads shape at each N of `nodes` (`NODES`, or `QUICK_NODES` if `quick`); the suite
    runner (`run.py`) adds the process shape and the recovery (`processes.run`)."""
    namespace = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    node_counts = tuple(nodes) if nodes is not None else QUICK_NODES if quick else NODES
    results: dict[str, Any] = {
        "contenders": list(names),
        "code": code_version(),
        "rounds": rounds(quick=quick),
        "host_processes": min(QUICK_HOSTS if quick else HOSTS, max(node_counts)),
        "join_timeout": JOIN_TIMEOUT,
        "handler_settings": HANDLER_SETTINGS,
        "nodes": {},
        "load_average": {"before": load_average()},
    }
    serial = iter(range(1_000_000))
    hosts = NodeHosts(servers, results["host_processes"])
    # A contender that did not complete a round of N nodes within the join timeout is not made
    # to try again at that N: it would only spend another JOIN_TIMEOUT seconds of the run.
    gave_up: set[tuple[str, int]] = set()

    def once_done(name: str, nodes: int, attempt: Run) -> Run:
        async def run() -> Outcome:
            if (name, nodes) in gave_up:
                return {"seconds": None, "skipped": True}
            outcome = await attempt()
            if outcome["seconds"] is None:
                gave_up.add((name, nodes))
            return outcome

        return run

    def handler_run(name: str, nodes: int) -> Run:
        async def run() -> Outcome:
            run_id = f"e2e-{namespace.rsplit('/', 1)[1]}-{next(serial)}"
            return await asyncio.to_thread(hosts.rendezvous, name, nodes, run_id)

        return once_done(name, nodes, run)

    def demo_run(nodes: int) -> Run:
        async def run() -> Outcome:
            return await _demo_rendezvous(servers, nodes, f"e2e-demo-{next(serial)}", namespace)

        return once_done(DEMO, nodes, run)

    try:
        for nodes in node_counts:
            print(f"  N = {nodes:>3} nodes", flush=True)
            runs = {
                name: demo_run(nodes) if name == DEMO else handler_run(name, nodes)
                for name in names
            }
            outcomes = await interleave(runs, rounds=rounds(quick=quick))
            results["nodes"][str(nodes)] = {name: _summary(each) for name, each in outcomes.items()}
    finally:
        await asyncio.to_thread(hosts.close)
    results["load_average"]["after"] = load_average()
    return results


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    attempted = [o for o in outcomes if not o.get("skipped")]

    def median_of(key: str) -> float | None:
        values = [o[key] for o in attempted if o.get(key) is not None]
        return describe(values)["median"] if values else None

    finished = [o["seconds"] for o in attempted if o["seconds"] is not None]
    return {
        # Over the rounds that completed; `completed` says how many did, of `attempted`.
        "seconds": describe(finished) if finished else None,
        "completed": len(finished),
        "attempted": len(attempted),
        # Medians over every attempted round, completed or not.
        "backend_calls": median_of("backend_calls"),
        "conflicts": median_of("conflicts"),
        "etcd_requests": median_of("etcd_requests"),
        "etcd_requests_per_node": median_of("etcd_requests_per_node"),
        "client_cpu_per_node": median_of("client_cpu_per_node"),
        "rounds": outcomes,
    }


# -------------------------------------------------------------------------------- reporting


def seconds_of(results: dict[str, Any], name: str, nodes: int) -> float | None:
    """The median seconds of `name`'s completed rounds at `nodes`, if it completed any."""
    summary = results["nodes"].get(str(nodes), {}).get(name)
    if summary is None or summary["seconds"] is None:
        return None
    return float(summary["seconds"]["median"])


def table(results: dict[str, Any]) -> str:
    """Seconds until every node has its rank, client CPU and etcd requests per node, backend
    calls and lost compare-and-swaps (medians)."""
    rows = []
    for nodes, summary in results["nodes"].items():
        for name in results["contenders"]:
            s = summary[name]
            seconds = s["seconds"]
            rows.append(
                [
                    int(nodes),
                    name,
                    None if seconds is None else seconds["median"],
                    None if seconds is None else f"{seconds['p10']:.2f}-{seconds['p90']:.2f}",
                    f"{s['completed']}/{s['attempted']}",
                    _milli(s.get("client_cpu_per_node")),
                    s.get("etcd_requests_per_node"),
                    s["backend_calls"],
                    s["conflicts"],
                ]
            )
    return markdown_table(
        [
            "N",
            "contender",
            "seconds",
            "p10-p90",
            "done",
            "client CPU ms/node",
            "etcd requests/node",
            "backend calls",
            "lost CAS",
        ],
        rows,
    )


def _milli(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def ratio_table(results: dict[str, Any]) -> str:
    """Each handler's median time over c10d's at the same N, and etcd-v3's over etcd-v2's."""
    handlers = [name for name in results["contenders"] if name in HANDLERS and name != C10D]
    rows = []
    for nodes in results["nodes"]:
        c10d = seconds_of(results, C10D, int(nodes))
        row: list[object] = [int(nodes)]
        for name in handlers:
            value = seconds_of(results, name, int(nodes))
            row.append(None if value is None or c10d is None else ratio(value, c10d))
        v2, v3 = seconds_of(results, V2, int(nodes)), seconds_of(results, V3, int(nodes))
        row.append(None if v2 is None or v3 is None else ratio(v3, v2))
        rows.append(row)
    return markdown_table(
        ["N", *(f"{name} ÷ c10d" for name in handlers), "etcd-v3 ÷ etcd-v2"], rows
    )


# ---------------------------------------------------------------------------------- profile
#
# py-spy samples one node host (the first: it has N/8 nodes, like every host) from the moment
# the nodes are let go until every node has its rank. It samples only the thread that holds the
# GIL (`--gil`): the host's Python work, which only one thread at a time can do. (Without it,
# py-spy counts threads that wait for a future or a lock in C as busy, here ten times the
# host's CPU time.)


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


@contextlib.contextmanager
def _sampled(pid: int, output: Path, rate: int) -> Iterator[None]:
    """py-spy records `pid` while the block runs; its collapsed stacks go to `output`."""
    command = [
        _py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--function",  # frames by function, not by line
        "--gil",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)  # attaching takes a moment; the nodes are not let go before it has
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        _, stderr = process.communicate(timeout=60)
        if not output.exists():
            raise RuntimeError(f"py-spy wrote nothing: {stderr.decode()}")


def profile_shares(collapsed: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """From py-spy's collapsed stacks: the samples, and per function the samples with it on
    the stack (cumulative) and at the top of it (self)."""
    total = 0
    cumulative: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        for frame in set(frames):
            cumulative[frame] += int(count)
        own[frames[-1]] += int(count)
    return total, dict(cumulative), dict(own)


# The functions the profile's table always shows, if sampled: torch's event recording, and
# what it spends its time in.
_WATCHED: Final = (
    "get_method_name",
    "stack (inspect.py)",
    "getframeinfo",
    "construct_and_record_rdzv_event",
    "_record",
)


# Frames every sample of a thread (or of the event loop) has under it: no news in a table.
_PLUMBING: Final = (
    "(threading.py",
    "(concurrent/futures/",
    "(asyncio/",
    "_Runner._run (",
    "_host_round.<locals>.node (",
)


def profile_table(collapsed: str, *, top: int = 12) -> str:
    """The functions with the largest cumulative share of the samples (threads' and the event
    loop's plumbing left out), and torch's `_record` and `get_method_name` whatever their
    share."""
    total, cumulative, own = profile_shares(collapsed)
    ranked = sorted(cumulative, key=lambda frame: -cumulative[frame])
    chosen = [frame for frame in ranked if not any(p in frame for p in _PLUMBING)][:top]
    chosen += [
        frame
        for frame in ranked
        if frame not in chosen and any(watched in frame for watched in _WATCHED)
    ]
    rows = [
        [
            frame,
            f"{100 * cumulative[frame] / total:.1f}%",
            f"{100 * own.get(frame, 0) / total:.1f}%",
        ]
        for frame in chosen
    ]
    return markdown_table(["function (file)", "cumulative", "self"], rows)


async def profile(name: str, nodes: int, *, rate: int = 100) -> Path:
    """One round of `nodes` nodes of `name`, the first node host sampled by py-spy; writes
    benchmarks/results/rendezvous-profile-<name>-<nodes>.txt (table, then collapsed stacks)."""
    from servers import start_servers

    collapsed = RESULTS / f"rendezvous-profile-{name}-{nodes}.collapsed"
    with start_servers() as servers:
        hosts = NodeHosts(servers, min(HOSTS, nodes))
        try:
            run_id = f"profile-{uuid.uuid4().hex[:8]}"
            pid = hosts.pids[0]
            before = load_average()
            outcome = await asyncio.to_thread(
                hosts.rendezvous,
                name,
                nodes,
                run_id,
                during=lambda: _sampled(pid, collapsed, rate),
            )
            after = load_average()
        finally:
            await asyncio.to_thread(hosts.close)
    stacks = collapsed.read_text()
    collapsed.unlink()
    total, _, _ = profile_shares(stacks)
    seconds = outcome["seconds"]
    shown = "not done" if seconds is None else f"{seconds:.2f} s"
    cpu = outcome["host_cpu_seconds"][0]
    header = (
        f"{name}, N={nodes}, one node host of {min(HOSTS, nodes)} ({nodes // min(HOSTS, nodes)}"
        f" nodes), py-spy at {rate} Hz (fewer when it falls behind), samples of the thread "
        f"holding the GIL: {total}; the host's CPU time: {cpu:.2f} s; round: {shown}; "
        f"code {code_version()}; "
        f"load average before {before}, after {after}"
    )
    path = RESULTS / f"rendezvous-profile-{name}-{nodes}.txt"
    path.write_text(f"{header}\n\n{profile_table(stacks)}\n\ncollapsed stacks:\n{stacks}")
    print(f"{header}\n\n{profile_table(stacks)}\n\nwrote {path}")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Profile one node host of one round.")
    parser.add_argument("--profile", metavar="CONTENDER", choices=HANDLERS, required=True)
    parser.add_argument("nodes", type=int, nargs="?", default=128)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    arguments = parser.parse_args()
    asyncio.run(profile(arguments.profile, arguments.nodes, rate=arguments.rate))
