"""End to end: N simulated nodes join one rendezvous round.

- Through torch's `DynamicRendezvousHandler` (what torchrun uses), one handler per node, each
  with a backend and a store of its own (so a connection of its own), each node a thread:
  over `etcd-v2`, over rdzv (`rdzv.torch.create_backend`: the sync facade) and over `c10d`.
  The threads are spread over up to 8 processes (see "node hosts" below). The clock starts
  when every handler exists and all nodes call `next_rendezvous()` at once, and stops when the
  last one has returned its rank; a round that takes over `JOIN_TIMEOUT` is reported as not
  completed.
- Through rdzv's demo (`rdzv demo`, asyncio): N agents, each a task with its own connection,
  in this one process, join by compare-and-swap and wait with etcd's watch. Its time includes
  opening the N connections, which the handlers do before the clock starts.

torch's handler waits a random 0-0.3 s before a node's first attempt and polls the state every
second while it waits for the others (`_DistributedRendezvousOpExecutor`, `cache_duration=1`),
so its times are mostly torch's own sleeps, the same for every backend. The requests tell the
backends apart: `backend calls` counts every `get_state` and `set_state` the handlers (or the
demo's agents) made, counted by wrapping the backend; `etcd requests` is etcd's own count
(from its `/metrics`) of the requests it received meanwhile: those calls, plus the store's
(the handler's `MASTER_ADDR`/`MASTER_PORT` exchange), the lease grants, and the demo's watches.
c10d's TCPStore counts nothing of its own.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any, ClassVar, Final

from torch._C._distributed_c10d import Store  # as rdzv.torch imports it
from torch.distributed.elastic.rendezvous import RendezvousParameters, dynamic_rendezvous
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

from contenders import C10D, SYNC, V2
from harness import describe, interleave, load_average, markdown_table
from servers import Servers, requests_between, server_requests

NODES: Final = (8, 32, 128)
QUICK_NODES: Final = (8,)
DEMO: Final = "rdzv async (demo)"
ALL: Final = (V2, SYNC, C10D, DEMO)
# A round that takes longer is reported as not completed.
JOIN_TIMEOUT: Final = 60
HOSTS: Final = 8

Outcome = dict[str, Any]
Run = Callable[[], Awaitable[Outcome]]
TorchBackend = dynamic_rendezvous.RendezvousBackend
Closer = Callable[[], None]
# When a node had its rank (time.monotonic(), the same clock in every process), its rank and the
# world size; None if it had none within the join timeout.
Joined = tuple[float, int, int] | None


def rounds(*, quick: bool) -> int:
    return 1 if quick else 3


@dataclasses.dataclass
class CallCounts:
    get_state: int = 0
    set_state: int = 0
    lost: int = 0

    def __iadd__(self, other: CallCounts) -> CallCounts:
        self.get_state += other.get_state
        self.set_state += other.set_state
        self.lost += other.lost
        return self


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


class HandlerBackend(abc.ABC):
    """How torch makes one node's backend and store for a rendezvous backend."""

    name: ClassVar[str]

    def __init__(self, etcd_endpoint: str, c10d_endpoint: str) -> None:
        self.etcd_endpoint = etcd_endpoint
        self.c10d_endpoint = c10d_endpoint

    def parameters(self, run_id: str, nodes: int) -> RendezvousParameters:
        return RendezvousParameters(
            backend=self.name,
            endpoint=self.endpoint(),
            run_id=run_id,
            min_nodes=nodes,
            max_nodes=nodes,
            local_addr="127.0.0.1",
            join_timeout=str(JOIN_TIMEOUT),
            read_timeout="60",
            **self.options(),
        )

    def endpoint(self) -> str:
        return self.etcd_endpoint

    def options(self) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def create(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        """The backend, the store, and what closes them."""


class EtcdV2Handler(HandlerBackend):
    name = V2

    def create(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend

        backend, store = etcd_rendezvous_backend.create_backend(params)
        return backend, store, lambda: None


class RdzvHandler(HandlerBackend):
    name = SYNC

    def create(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        import rdzv.torch

        backend, store = rdzv.torch.create_backend(params)
        return backend, store, backend.facade.close


class C10dHandler(HandlerBackend):
    name = C10D

    def endpoint(self) -> str:
        return self.c10d_endpoint

    def options(self) -> dict[str, str]:
        # The store server is ours (TCPStoreServer); every node is a client of it.
        return {"is_host": "false"}

    def create(self, params: RendezvousParameters) -> tuple[TorchBackend, Store, Closer]:
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

        backend, store = c10d_rendezvous_backend.create_backend(params)
        return backend, store, lambda: None


HANDLER_BACKENDS: Final[tuple[type[HandlerBackend], ...]] = (
    EtcdV2Handler,
    RdzvHandler,
    C10dHandler,
)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch's rendezvous logs a line per node and step; keep the run's output readable."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
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
    factories = {cls.name: cls(etcd_endpoint, c10d_endpoint) for cls in HANDLER_BACKENDS}
    with _quiet_torch():
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
    factory: HandlerBackend,
    run_id: str,
    nodes: int,
    share: int,
) -> None:
    calls = Calls()
    handlers, closers = [], []
    try:
        for _ in range(share):
            params = factory.parameters(run_id, nodes)
            backend, store, close = factory.create(params)
            closers.append(close)
            handlers.append(
                dynamic_rendezvous.create_handler(store, CountingBackend(backend, calls), params)
            )

        def node(handler: dynamic_rendezvous.DynamicRendezvousHandler) -> Joined:
            go.wait()
            try:
                info = handler.next_rendezvous()
            except RendezvousTimeoutError:
                return None
            return time.monotonic(), info.rank, info.world_size

        with concurrent.futures.ThreadPoolExecutor(max_workers=share) as pool:
            futures = [pool.submit(node, handler) for handler in handlers]
            connection.send(("ready",))
            connection.send(("joined", [future.result() for future in futures]))
            connection.recv()  # "leave": every host's nodes are done
            calls.counting = False
            # Leave the round: each handler stops its keep-alive thread and marks it closed.
            for _ in pool.map(lambda handler: handler.shutdown(), handlers):
                pass
    finally:
        for close in closers:
            close()
    connection.send(("left", dataclasses.asdict(calls.counts())))


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

    def rendezvous(self, name: str, nodes: int, run_id: str) -> Outcome:
        hosts = self._connections[:nodes]
        shares = [nodes // len(hosts) + (i < nodes % len(hosts)) for i in range(len(hosts))]
        self._go.clear()
        for connection, share in zip(hosts, shares, strict=True):
            connection.send(("join", name, run_id, nodes, share))
        for connection in hosts:
            self._receive(connection, "ready", 120)
        before = server_requests(self._servers.etcd)
        started = time.monotonic()
        self._go.set()
        joined: list[Joined] = []
        for connection in hosts:
            joined += self._receive(connection, "joined", JOIN_TIMEOUT + 60)
        received = requests_between(before, server_requests(self._servers.etcd))
        counts = CallCounts()
        for connection in hosts:
            connection.send(("leave",))
        for connection in hosts:
            counts += CallCounts(**self._receive(connection, "left", 120))
        self._go.clear()
        done = [j for j in joined if j is not None]
        ranks = sorted(rank for _, rank, _ in done)
        complete = len(done) == nodes
        if complete and (ranks != list(range(nodes)) or {s for _, _, s in done} != {nodes}):
            raise RuntimeError(f"{name}: a bad rendezvous: ranks {ranks}")
        return {
            # A round that did not complete within the join timeout has no time.
            "seconds": max(t for t, _, _ in done) - started if complete else None,
            "joined": len(done),
            "backend_calls": counts.get_state + counts.set_state,
            "get_state": counts.get_state,
            "set_state": counts.set_state,
            "conflicts": counts.lost,
            "etcd_requests": received["v3"] + received["v2"] if name != C10D else None,
        }


async def _demo_rendezvous(servers: Servers, nodes: int, run_id: str, namespace: str) -> Outcome:
    from rdzv._demo import run_demo

    before = server_requests(servers.etcd)
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
        "connections": received["v3_status"],
    }


async def run(servers: Servers, *, quick: bool, names: Sequence[str] = ALL) -> dict[str, Any]:
    namespace = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    node_counts = QUICK_NODES if quick else NODES
    results: dict[str, Any] = {
        "contenders": list(names),
        "rounds": rounds(quick=quick),
        "host_processes": min(HOSTS, max(node_counts)),
        "join_timeout": JOIN_TIMEOUT,
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
        "rounds": outcomes,
    }


# -------------------------------------------------------------------------------- reporting


def table(results: dict[str, Any]) -> str:
    """Seconds until every node has its rank; backend calls; etcd requests (medians)."""
    rows = []
    for nodes, summary in results["nodes"].items():
        for name in results["contenders"]:
            s = summary[name]
            rows.append(
                [
                    int(nodes),
                    name,
                    None if s["seconds"] is None else s["seconds"]["median"],
                    f"{s['completed']}/{s['attempted']}",
                    s["backend_calls"],
                    s["conflicts"],
                    s["etcd_requests"],
                ]
            )
    return markdown_table(
        ["N", "contender", "seconds", "done", "backend calls", "lost CAS", "etcd requests"], rows
    )
