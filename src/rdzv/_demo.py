"""The demo: N asyncio agents rendezvous through etcd and take distinct ranks.

Two protocols, to compare:

- `rounds` (the default): every agent is an `AsyncRendezvous` participant with
  `min_nodes = max_nodes = N`. Each writes one key of its own, on its own lease, and waits on
  its connection's mirror of the round's control keys; agents share connections, at most
  `per_connection` on each. etcd sees about three requests per agent, so the time grows with N.
- `cas`: the single-blob compare-and-swap path of `AsyncEtcdBackend`. Each agent, on a
  connection of its own, appends its name to one shared JSON list with compare-and-swap, then
  waits, through `watch`, until the list holds all N names; its rank is its place in the list.
  Lost compare-and-swaps grow as N², and so does the time: it is here for comparison.

Either way, the agents all run in this process, as asyncio tasks. A demo stopped midway (Ctrl-C
in `rdzv demo`) need not wait for each agent to leave: `delete_agent_keys` deletes what they
wrote in a few requests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Final, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from rdzv._backend import DEFAULT_KEY_PREFIX, AsyncEtcdBackend
from rdzv._errors import RendezvousError
from rdzv._etcd import DEFAULT_MAX_IN_FLIGHT, Connection, connect
from rdzv._etcd._endpoints import resolve_endpoints
from rdzv._rendezvous import DEFAULT_ROUNDS_PREFIX, MAX_NODES, AsyncRendezvous, Membership
from rdzv._rendezvous._layout import Layout, round_number
from rdzv._validation import shown, validate_key_prefix, validate_read_timeout, validate_run_id

Protocol = Literal["rounds", "cas"]
"""How the demo's agents rendezvous: one key each (`rounds`) or one shared list (`cas`)."""

PROTOCOLS: Final[tuple[Protocol, ...]] = ("rounds", "cas")
"""The protocols, the default first."""

DEFAULT_PER_CONNECTION: Final = 10_000
"""`rounds` agents per connection by default: one connection for up to 10,000 agents. It reads
and watches the round's control keys once, and keeps every lease alive on one stream, for all
of its agents. On a 2-core machine, 10,000 agents took 8.2-8.7 s on one connection and
8.0-9.2 s on ten connections of 1,000 (sharing the same 1,000 requests in flight), which also
cost etcd more keep-alive and watch requests."""

LEASE_TTL: Final = 60
"""Seconds the `rounds` agents' leases last (the library's default is 15). The agents share one
process: with 10,000 of them its event loop is busy for seconds at a time, and on a loaded
2-core machine keep-alives came late enough that every agent lost its lease and joined again,
twice (30,000 lease grants for 10,000 agents, and 66 s instead of 18 s)."""

MAX_ROUNDS_NODES: Final = MAX_NODES
"""The most agents the `rounds` protocol takes: `rdzv.MAX_NODES`."""

MAX_CAS_NODES: Final = 4096
"""The most agents the `cas` protocol takes (it needs minutes for a thousand)."""

DAY: Final = 86_400
"""The longest timeout, in seconds."""

_METRICS_TIMEOUT: Final = 2.0
# Joins started before the event loop gets a turn: their first steps, all at once, held the
# loop (and the progress report) for seconds with 10,000 agents.
_START_BATCH: Final = 100


class DemoError(Exception):
    """The demo's rendezvous went wrong, but not through etcd.

    For example: a `cas` run id that holds the full list of an earlier run, or members that
    disagree about their round.
    """


@dataclasses.dataclass(frozen=True)
class DemoProgress:
    """How far a demo rendezvous has come."""

    nodes: int
    """How many agents take part."""
    joined: int
    """Agents that have joined: `rounds`, their key is in etcd; `cas`, their name in the list."""
    ranked: int
    """Agents that have their rank."""
    conflicts: int
    """`cas`: lost compare-and-swaps so far; `rounds`: 0."""
    seconds: float
    """Seconds since the agents started."""


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What a demo rendezvous produced."""

    protocol: Protocol
    ranks: dict[str, int]
    """Each agent's rank, by agent name (`node-0`, `node-1`, ...)."""
    seconds: float
    """Seconds until every agent had its rank, connecting included."""
    connections: int
    """Connections the agents used."""
    round: int | None = None
    """`rounds`: the round the agents formed (1 on a fresh run id); `cas`: None."""
    conflicts: int = 0
    """`cas`: compare-and-swaps lost to another agent's; `rounds`: 0."""
    requests: dict[str, int] | None = None
    """What etcd received until every agent had its rank, by gRPC method (`Txn`, `LeaseGrant`,
    ..., a stream's messages each), from etcd's `/metrics`: other clients of that etcd
    included. None if they could not be read (TLS, several endpoints, no answer)."""
    leave_seconds: float | None = None
    """`rounds`: seconds the agents then took to leave (revoke their leases); `cas`: None."""


@dataclasses.dataclass
class _Tally:
    joined: int = 0
    ranked: int = 0
    conflicts: int = 0


def default_key_prefix(protocol: Protocol) -> str:
    """Where a protocol keeps its keys unless told otherwise."""
    return DEFAULT_ROUNDS_PREFIX if protocol == "rounds" else DEFAULT_KEY_PREFIX


def max_nodes(protocol: Protocol) -> int:
    """The most agents `protocol` takes."""
    return MAX_ROUNDS_NODES if protocol == "rounds" else MAX_CAS_NODES


async def run_demo(
    nodes: int,
    endpoints: str,
    *,
    run_id: str,
    timeout: float,
    key_prefix: str | None = None,
    read_timeout: float = 10,
    protocol: Protocol = "cas",
    per_connection: int = DEFAULT_PER_CONNECTION,
    on_progress: Callable[[DemoProgress], None] | None = None,
    progress_interval: float = 1.0,
) -> DemoResult:
    """Run `nodes` agents to one rendezvous, with `protocol`.

    The protocol defaults to `cas`, what this function always did (the rendezvous benchmark
    measures it so); `rdzv demo` passes `rounds` unless told otherwise.

    `on_progress` is called every `progress_interval` seconds, and once more when every agent
    has its rank. `key_prefix` defaults to the protocol's (`default_key_prefix`).

    Raises `TimeoutError` if the agents do not all have their ranks within `timeout` seconds,
    the first agent's `RendezvousError` if one fails (the others are then cancelled), and
    `DemoError` if the rendezvous went wrong otherwise. Bad arguments raise `ValueError`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}.")
    if (
        isinstance(nodes, bool)
        or not isinstance(nodes, int)
        or not 1 <= nodes <= max_nodes(protocol)
    ):
        raise ValueError(
            f"nodes must be an int from 1 to {max_nodes(protocol)} with protocol {protocol!r}, "
            f"not {shown(nodes)}."
        )
    if (
        isinstance(per_connection, bool)
        or not isinstance(per_connection, int)
        or per_connection < 1
    ):
        raise ValueError(f"per_connection must be a positive int, not {shown(per_connection)}.")
    for name, value in (("timeout", timeout), ("progress_interval", progress_interval)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= DAY:
            raise ValueError(
                f"{name} must be a positive number of seconds, at most {DAY} (one day), "
                f"not {shown(value)}."
            )
    read_timeout = validate_read_timeout(read_timeout)
    run_id = validate_run_id(run_id)
    prefix = validate_key_prefix(default_key_prefix(protocol) if key_prefix is None else key_prefix)
    baseline = await etcd_requests(endpoints)
    demo = _Demo(nodes, endpoints, run_id, prefix, timeout, read_timeout, on_progress, baseline)
    if protocol == "rounds":
        return await demo.rounds(per_connection, progress_interval)
    return await demo.cas(progress_interval)


class _Demo:
    """One run: the agents, their tally, and how they end."""

    def __init__(
        self,
        nodes: int,
        endpoints: str,
        run_id: str,
        key_prefix: str,
        timeout: float,
        read_timeout: float,
        on_progress: Callable[[DemoProgress], None] | None,
        baseline: dict[str, int] | None,
    ) -> None:
        self.nodes = nodes
        self.endpoints = endpoints
        self.run_id = run_id
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.on_progress = on_progress
        self.baseline = baseline
        self.tally = _Tally()
        self.failures: list[BaseException] = []
        self.all_ranked = anyio.Event()
        self.reported_all = False
        self.started = time.perf_counter()

    def progress(self, seconds: float | None = None) -> None:
        """Report progress; with `seconds`, the final report, unless the last one was complete."""
        if self.on_progress is None or (self.reported_all and seconds is not None):
            return
        tally = self.tally
        self.reported_all = tally.ranked == self.nodes
        self.on_progress(
            DemoProgress(
                self.nodes,
                max(tally.joined, tally.ranked),
                tally.ranked,
                tally.conflicts,
                time.perf_counter() - self.started if seconds is None else seconds,
            )
        )

    def ranked(self) -> None:
        self.tally.ranked += 1
        if self.tally.ranked == self.nodes:
            self.all_ranked.set()

    def fail(self, error: BaseException, agents: anyio.abc.TaskGroup) -> None:
        # One failure is enough to report; a task group would wrap them all in a group.
        self.failures.append(error)
        agents.cancel_scope.cancel()

    async def supervise(
        self,
        agents: anyio.abc.TaskGroup,
        interval: float,
        *,
        count_joined: bool = False,
    ) -> float:
        """Report progress until every agent has its rank; the seconds that took.

        With `count_joined`, count the joined agents in etcd (`rounds`).

        Cancels the agents when the timeout passes first; `raise_failure` then says why.
        """
        async with anyio.create_task_group() as reporting:
            reporting.start_soon(self.report, interval)
            if count_joined:
                reporting.start_soon(self.count_joined, interval)
            with anyio.move_on_after(self.timeout - (time.perf_counter() - self.started)):
                await self.all_ranked.wait()
            reporting.cancel_scope.cancel()
        seconds = time.perf_counter() - self.started
        if not self.all_ranked.is_set():
            agents.cancel_scope.cancel()
        return seconds

    def raise_failure(self) -> None:
        if self.failures:
            raise self.failures[0]
        if not self.all_ranked.is_set():
            raise TimeoutError(f"The rendezvous did not complete within {self.timeout:g} s.")

    async def report(self, interval: float) -> None:
        """Call `on_progress` every `interval` seconds (a little more on a busy event loop)."""
        while True:
            await anyio.sleep(interval)
            self.progress()

    async def requests(self) -> dict[str, int] | None:
        """What etcd received since the demo started, by method; None if unknown."""
        now = await etcd_requests(self.endpoints)
        if now is None or self.baseline is None:
            return None
        counts = {method: count - self.baseline.get(method, 0) for method, count in now.items()}
        return {method: count for method, count in counts.items() if count > 0}

    # ----------------------------------------------------------------------------- rounds

    def participant(self, connection: Connection) -> AsyncRendezvous:
        return AsyncRendezvous(
            connection,
            self.run_id,
            min_nodes=self.nodes,
            max_nodes=self.nodes,
            join_timeout=self.timeout,
            lease_ttl=LEASE_TTL,
            key_prefix=self.key_prefix,
        )

    async def count_joined(self, interval: float) -> None:
        """Count the agents whose key is in etcd, every `interval` or so, until cancelled.

        On a connection of its own, so that its one request does not queue behind thousands.
        """
        try:
            async with connect(self.endpoints, read_timeout=self.read_timeout) as connection:
                probe = self.participant(connection)  # never joins
                while True:
                    # Before the round completes, the nodes "waiting" are its members.
                    waiting = await probe.num_nodes_waiting()
                    self.tally.joined = max(self.tally.joined, waiting)
                    await anyio.sleep(interval / 2)
        except RendezvousError:
            return  # the agents meet the same error, and report it

    async def rounds(self, per_connection: int, interval: float) -> DemoResult:
        firsts = range(0, self.nodes, per_connection)
        sizes = [min(per_connection, self.nodes - first) for first in firsts]
        memberships: dict[int, Membership] = {}
        leave = anyio.Event()
        # The connections share etcd's tolerance for requests in flight.
        in_flight = max(1, DEFAULT_MAX_IN_FLIGHT // len(sizes))

        async def join(index: int, node: AsyncRendezvous, agents: anyio.abc.TaskGroup) -> None:
            try:
                memberships[index] = await node.join(b"node-%d" % index)
            except RendezvousError as error:
                self.fail(error, agents)
                return
            self.ranked()

        async def group(first: int, size: int, agents: anyio.abc.TaskGroup) -> None:
            try:
                async with connect(
                    self.endpoints, read_timeout=self.read_timeout, max_in_flight=in_flight
                ) as connection:
                    participants = [self.participant(connection) for _ in range(size)]
                    try:
                        async with anyio.create_task_group() as joining:
                            for offset, node in enumerate(participants):
                                joining.start_soon(join, first + offset, node, agents)
                                if offset % _START_BATCH == _START_BATCH - 1:
                                    await anyio.lowlevel.checkpoint()
                        await leave.wait()  # nobody leaves before every agent has its rank
                    finally:
                        # Also after a failure: a participant whose join failed may still
                        # coordinate its round, and its lease would hold its keys for its TTL.
                        with anyio.CancelScope(shield=True), anyio.move_on_after(self.read_timeout):
                            async with anyio.create_task_group() as leaving:
                                for node in participants:
                                    leaving.start_soon(node.leave)
            except RendezvousError as error:
                self.fail(error, agents)

        requests: dict[str, int] | None = None
        leaving = 0.0
        async with anyio.create_task_group() as agents:
            for first, size in zip(firsts, sizes, strict=True):
                agents.start_soon(group, first, size, agents)
            seconds = await self.supervise(agents, interval, count_joined=True)
            if self.all_ranked.is_set():
                requests = await self.requests()
                self.progress(seconds)
                leaving = time.perf_counter()
                leave.set()
        self.raise_failure()
        return DemoResult(
            protocol="rounds",
            ranks=await self._check(memberships),
            seconds=seconds,
            connections=len(sizes),
            round=memberships[0].round,
            requests=requests,
            leave_seconds=time.perf_counter() - leaving,
        )

    async def _check(self, memberships: dict[int, Membership]) -> dict[str, int]:
        """The ranks by agent name, once it is clear that every agent holds its own rank.

        The members, with their node info, are read once (nobody was sent them), and every
        agent's rank must index its own key.
        """
        decisions = {m._decision for m in memberships.values()}
        if len(decisions) != 1 or len(memberships) != self.nodes:
            raise DemoError(f"The agents of {self.run_id!r} disagree about their round.")
        async with connect(self.endpoints, read_timeout=self.read_timeout) as connection:
            members = await self.participant(connection).read_members(memberships[0])
        ranks: dict[str, int] = {}
        for index, membership in memberships.items():
            name = f"node-{index}"
            me = members[membership.rank]
            if me.id != membership.member_id or me.info != name.encode():
                raise DemoError(f"{name} got rank {membership.rank}, which is another member's.")
            ranks[name] = membership.rank
        return ranks

    # -------------------------------------------------------------------------------- cas

    async def cas(self, interval: float) -> DemoResult:
        ranks: dict[str, int] = {}

        async def agent(name: str, agents: anyio.abc.TaskGroup) -> None:
            try:
                ranks[name] = await self._cas_agent(name)
            except (RendezvousError, DemoError) as error:
                self.fail(error, agents)
                return
            self.ranked()

        requests: dict[str, int] | None = None
        async with anyio.create_task_group() as agents:
            for index in range(self.nodes):
                agents.start_soon(agent, f"node-{index}", agents)
            seconds = await self.supervise(agents, interval)
            if self.all_ranked.is_set():
                requests = await self.requests()
                self.progress(seconds)
        self.raise_failure()
        return DemoResult(
            protocol="cas",
            ranks=ranks,
            seconds=seconds,
            connections=self.nodes,
            conflicts=self.tally.conflicts,
            requests=requests,
        )

    async def _cas_agent(self, name: str) -> int:
        nodes, run_id, tally = self.nodes, self.run_id, self.tally
        async with connect(self.endpoints, read_timeout=self.read_timeout) as connection:
            backend = AsyncEtcdBackend(connection, run_id, key_prefix=self.key_prefix)
            current = await backend.get_state()
            state, token = current if current is not None else (b"[]", None)
            participants: list[str] = json.loads(state)
            if name in participants:  # not written by this run yet: an earlier run's list
                raise DemoError(
                    f"{name} found itself in the list of {run_id!r} before joining: it is an "
                    "earlier run's. Use a fresh run id."
                )
            while name not in participants:
                if len(participants) >= nodes:
                    raise DemoError(
                        f"{name} found the rendezvous {run_id!r} full, with agents of an earlier "
                        "run: use a fresh run id."
                    )
                result = await backend.set_state(json.dumps([*participants, name]).encode(), token)
                if result is None:  # the state vanished under us (it expired): start over
                    participants, token = [], None
                    continue
                state, token, written = result
                participants = json.loads(state)
                if written:
                    tally.joined += 1
                else:
                    tally.conflicts += 1
            if len(participants) < nodes:
                async for changed, _ in backend.watch(token):
                    if changed is None:
                        raise DemoError(f"The rendezvous state of {run_id!r} disappeared.")
                    participants = json.loads(changed)
                    if len(participants) >= nodes:
                        break
            return participants.index(name)


# --------------------------------------------------------------------------- stopped midway


def agent_keys(protocol: Protocol, key_prefix: str, run_id: str) -> str:
    """Where a demo's agents write: the rounds of the run id (`rounds`), or its list (`cas`)."""
    if protocol == "rounds":
        return Layout(key_prefix, run_id).base.decode()
    return f"{key_prefix}/{run_id}"


async def delete_agent_keys(
    endpoints: str, protocol: Protocol, key_prefix: str, run_id: str, *, read_timeout: float
) -> int:
    """Delete what the agents of a demo that was stopped midway wrote; how many keys that was.

    `rounds`: the member and coordinator keys of the open round (after `latest`) and of the
    latest one (the agents' own, if it completed); the rounds' records (`latest`, a round's
    `done` and `size`) stay, as after a demo that ends normally. `cas`: the shared list.
    Raises `RendezvousError` if etcd does not answer within `read_timeout`.
    """
    async with connect(endpoints, read_timeout=read_timeout) as connection:
        if protocol == "cas":
            return await connection.delete(agent_keys(protocol, key_prefix, run_id).encode())
        layout = Layout(key_prefix, run_id)
        found = await connection.get(layout.latest)
        latest = round_number(found.value if found is not None else None, key=layout.latest)
        deleted = await connection.delete(layout.round(latest + 1), prefix=True)
        if latest > 0:
            deleted += await connection.delete(layout.members(latest), prefix=True)
            deleted += await connection.delete(layout.coordinator(latest))
        return deleted


# --------------------------------------------------------------------------- etcd's counts

_RECEIVED = re.compile(
    r'^grpc_server_msg_received_total\{grpc_method="(?P<method>\w+)",'
    r'grpc_service="etcdserverpb\.\w+",grpc_type="\w+"\} (?P<count>\d+)$',
    re.MULTILINE,
)


async def etcd_requests(endpoints: str) -> dict[str, int] | None:
    """What etcd has received so far, by gRPC method, from its `/metrics`; None if unknown.

    Only for one plain-http endpoint: with several, each member counts only its own share.
    """
    try:
        parsed, protocol = resolve_endpoints(endpoints)
    except ValueError:
        return None
    if protocol != "http" or len(parsed) != 1:
        return None
    url = f"http://{parsed[0]}/metrics"

    def read() -> str:
        with urllib.request.urlopen(url, timeout=_METRICS_TIMEOUT) as response:
            text: str = response.read().decode()
        return text

    try:
        with anyio.fail_after(_METRICS_TIMEOUT * 2):
            text = await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
    except (OSError, TimeoutError, ValueError):
        return None
    counts: dict[str, int] = {}
    for match in _RECEIVED.finditer(text):
        count = int(match["count"])
        if count:
            counts[match["method"]] = counts.get(match["method"], 0) + count
    return counts or None
