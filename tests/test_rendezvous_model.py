"""A Hypothesis state machine drives the scalable rendezvous against a real etcd.

Participants arrive (on the shared connection, or alone on a connection of their own through a
`FaultProxy` of their own), join again, leave, die (their lease is revoked behind their back) and
the rendezvous closes, in any interleaving; and the network misbehaves: etcd's answers to one
node wait past its lease's TTL while its requests still arrive (an asymmetric partition), and a
node's join loses its answer and lands late, just before its next transaction. After every step
the rounds that completed so far must be sound: ranks a permutation of 0..W-1, min_nodes <= W <=
max_nodes, every member of a round seeing the same decision, each rank indexing its own member
in the members read back at the decision's revision, no node in a round twice (under any
of its leases: a member's node info names its node); and once nothing moves, the nodes that wait
are the ones counted as waiting, and a round completes if they all wait and are enough.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import aetcd.exceptions
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import rdzv
from rdzv.testing import FaultProxy
from support import RawEtcd

pytestmark = pytest.mark.slow

T = TypeVar("T")

MIN_NODES, MAX_NODES = 2, 3
LAST_CALL = 0.2
LEASE_TTL = 2
HOLD = LEASE_TTL + 0.3  # seconds that a held node's answers wait: past its lease's TTL
ALONE_READ_TIMEOUT = 3 * LEASE_TTL  # a node alone: its held calls are answered late, not failed
HOLDS = 1  # holds per example at most: each costs HOLD seconds
LANDED = 2  # seconds that a node's join may take to put its key
LATE_WAIT = 2  # seconds that a join whose answer is lost may take to send its next transaction
STALL = 10  # seconds within which a round completes once every node alive waits, and enough do
SLOTS = 6  # participants alive at once, at most
QUIET = 0.8  # seconds without a step or a completed join after which nothing moves
# Which node a rule picks: drawn whatever the nodes are, since which nodes qualify depends on
# timing, and Hypothesis needs the same draws when it replays an example.
CHOICE = st.integers(min_value=0, max_value=SLOTS * 4)
_EXAMPLES = {"ci": 20, "fuzz": 100}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]


class LateJoin:
    """Wraps a connection's `txn`: once armed, its next join loses its answer and lands late.

    The lost join reaches etcd just before the connection's next transaction, as a copy delayed
    in the network would. Unlike `support.LoseAnswers`, which loses whatever transaction comes
    next, it loses only a join (told by its `what`), and it can be armed again.
    """

    def __init__(self, connection: rdzv.Connection) -> None:
        self._txn = connection.txn
        self.armed = False
        self.landed = 0  # late copies that reached etcd
        self._late: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Land a late copy first, if any; then run the transaction, or lose a join's answer."""
        late, self._late = self._late, []
        for late_args, late_kwargs in late:
            with contextlib.suppress(rdzv.RendezvousError):  # nobody hears of a late copy
                await self._txn(*late_args, **late_kwargs)
            self.landed += 1
        if self.armed and str(kwargs.get("what", "")).startswith("join round"):
            self.armed = False
            self._late.append((args, kwargs))
            raise rdzv.RendezvousOutcomeUnknownError("lost (it lands late)")
        return await self._txn(*args, **kwargs)


@dataclasses.dataclass
class Alone:
    """A node's own connection, through a proxy of its own."""

    proxy: FaultProxy
    connection: rdzv.Connection
    late: LateJoin


@dataclasses.dataclass
class Node:
    """One participant, and what the model knows of it."""

    index: int
    participant: rdzv.AsyncRendezvous
    alone: Alone | None = None  # its own connection, if it does not share the machine's
    joining: concurrent.futures.Future[rdzv.Membership] | None = None
    round: int = 0  # the last round it completed, while it is idle in it
    gone: bool = False


class RendezvousMachine(RuleBasedStateMachine):
    """Participants of one run id, most on one connection, and a raw client to kill them."""

    def __init__(
        self,
        portal: BlockingPortal,
        connection: rdzv.Connection,
        raw: RawEtcd,
        key_prefix: str,
        endpoint: str,
    ) -> None:
        super().__init__()
        self.portal = portal
        self.connection = connection
        self.raw = raw
        self.key_prefix = key_prefix
        self.endpoint = endpoint  # of etcd, for the proxies of nodes alone
        self.patches = pytest.MonkeyPatch()
        self.holds = 0
        self.lingering_until = 0.0  # until then, the key of a lease presumed lost may linger
        self.run_id = uuid.uuid4().hex
        self.nodes: list[Node] = []
        self.rounds: dict[int, list[tuple[int, rdzv.Membership]]] = collections.defaultdict(list)
        self.members: dict[int, tuple[rdzv.Member, ...]] = {}  # read once per completed round
        self.closed = False
        self.completions = 0  # joins that completed
        self.last_change = time.monotonic()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the connection's loop and wait for it."""

        async def run() -> T:
            return await coroutine

        return self.portal.call(run)

    def teardown(self) -> None:
        """Stop every join, make every participant leave, and close the nodes' own connections."""
        try:
            for node in self.nodes:
                self._stop(node)
                self.call(node.participant.leave())
                self._close_alone(node)
        finally:
            for node in self.nodes:
                if node.alone is not None:
                    node.alone.proxy.close()
            self.patches.undo()

    # ------------------------------------------------------------------------- bookkeeping

    def _alive(self) -> list[Node]:
        return [node for node in self.nodes if not node.gone]

    def _alone(self) -> list[Node]:
        """The nodes alive on a connection of their own."""
        return [node for node in self._alive() if node.alone is not None]

    def _add(self, connection: rdzv.Connection, alone: Alone | None = None) -> None:
        """A new participant on `connection`, which starts to join."""
        node = Node(len(self.nodes), self._participant(connection), alone)
        self.nodes.append(node)
        self._start_join(node)

    def _participant(self, connection: rdzv.Connection) -> rdzv.AsyncRendezvous:
        """A participant of the machine's rendezvous on `connection`."""
        return rdzv.AsyncRendezvous(
            connection,
            self.run_id,
            min_nodes=MIN_NODES,
            max_nodes=MAX_NODES,
            last_call_timeout=LAST_CALL,
            join_timeout=120,
            lease_ttl=LEASE_TTL,
            key_prefix=self.key_prefix,
        )

    def _landed(self, node: Node) -> None:
        """Wait until a joining node's key is in a round it has not completed (LANDED s at most)."""
        # The keys as docs/rendezvous.md lays them out: round/{n}/m/{member}, valued its info.
        info, base = _info(node.index), f"{self.key_prefix}/{self.run_id}/round/".encode()
        completed = [
            number for number, seen in self.rounds.items() for i, _ in seen if i == node.index
        ]
        deadline = time.monotonic() + LANDED
        while time.monotonic() < deadline and node.joining is not None and not node.joining.done():
            for kv in self.raw.under(base):
                number, kind = bytes(kv.key)[len(base) :].split(b"/")[:2]
                if kind == b"m" and kv.value == info and int(number) > max(completed, default=0):
                    return
            time.sleep(0.02)

    def _close_alone(self, node: Node) -> None:
        """Close a node's own connection and proxy, once it left."""
        if node.alone is not None:
            self.call(node.alone.connection.aclose())
            node.alone.proxy.close()

    def _start_join(self, node: Node) -> None:
        node.round = 0
        node.joining = self.portal.start_task_soon(node.participant.join, _info(node.index))
        self.last_change = time.monotonic()

    def _collect(self) -> None:
        """Record the joins that finished."""
        for node in self.nodes:
            if node.joining is None or not node.joining.done():
                continue
            future, node.joining = node.joining, None
            error = future.exception()
            if error is not None:
                assert isinstance(error, rdzv.RendezvousClosedError), error
                assert self.closed
                continue
            membership = future.result()
            if membership.round not in self.members:
                reader = self._participant(self.connection)
                self.members[membership.round] = self.call(reader.read_members(membership))
            self.rounds[membership.round].append((node.index, membership))
            self.completions += 1
            node.round = membership.round
            self.last_change = time.monotonic()

    def _stop(self, node: Node) -> None:
        if node.joining is not None:
            node.joining.cancel()
            # It may have completed (or failed) just before: either way it has ended.
            concurrent.futures.wait([node.joining], timeout=30)
            assert node.joining.done()
            node.joining = None
        self.last_change = time.monotonic()

    # ------------------------------------------------------------------------------- rules

    @initialize(how=st.sampled_from(["shared", "alone", "alone, its join late"]))
    def first(self, how: str) -> None:
        """The first node arrives: every run has one."""
        if how == "shared":
            self.arrive()
        else:
            self.arrive_alone(late=how != "alone")

    @precondition(lambda self: len(self._alive()) < SLOTS)
    @rule()
    def arrive(self) -> None:
        """A new node joins on the shared connection."""
        self._add(self.connection)

    @precondition(lambda self: len(self._alive()) < SLOTS)
    @rule(late=st.booleans())
    def arrive_alone(self, late: bool) -> None:
        """A new node joins through a proxy of its own; if `late`, its join lands late."""
        proxy = FaultProxy(self.endpoint)
        proxy.start()
        try:
            connection = rdzv.connect(proxy.endpoint, read_timeout=ALONE_READ_TIMEOUT)
            self.call(connection.open())
        except BaseException:
            proxy.close()
            raise
        wrapper = LateJoin(connection)
        self.patches.setattr(connection, "txn", wrapper)
        wrapper.armed = late
        self._add(connection, Alone(proxy, connection, wrapper))
        if late:
            self._late_landed(wrapper, 0)

    @rule(choice=CHOICE)
    def join_again(self, choice: int) -> None:
        """A member of a completed round joins again (after a failure, or to scale up)."""
        self._collect()
        idle = [node for node in self._alive() if node.joining is None and node.round]
        if idle:
            self._start_join(idle[choice % len(idle)])

    @rule(choice=CHOICE)
    def leave(self, choice: int) -> None:
        """A node leaves cleanly."""
        alive = self._alive()
        if alive:
            node = alive[choice % len(alive)]
            self._stop(node)
            self.call(node.participant.leave())
            self._close_alone(node)
            node.gone = True

    @rule(choice=CHOICE)
    def die(self, choice: int) -> None:
        """A node dies: its lease ends behind its back, as when its process is killed."""
        alive = [node for node in self._alive() if node.participant._keeper is not None]
        if alive:
            node = alive[choice % len(alive)]
            keeper = node.participant._keeper
            assert keeper is not None
            # Not found: the lease expired already (a node whose answers were held presumed it
            # lost, and stopped keeping it alive).
            with contextlib.suppress(aetcd.exceptions.ClientError):
                self.raw.revoke_lease(keeper.lease_id)
            self._stop(node)
            self.call(node.participant.leave())
            self._close_alone(node)
            node.gone = True

    @precondition(lambda self: self.holds < HOLDS)
    @rule(choice=CHOICE)
    def hold_answers(self, choice: int) -> None:
        """etcd's answers to a node alone wait past its lease's TTL; its requests still arrive."""
        self._collect()
        alone = self._alone()
        if not alone:
            return
        # Rather one that waits in a round: it then loses its lease while it waits.
        alone = [node for node in alone if node.joining is not None] or alone
        node = alone[choice % len(alone)]
        assert node.alone is not None
        if node.joining is not None:
            self._landed(node)
        self.holds += 1
        held = time.monotonic()
        node.alone.proxy.hold("responses")
        try:
            time.sleep(HOLD)
        finally:
            node.alone.proxy.release("responses")
        # The node presumes its lease lost within a TTL, and stops keeping it alive; etcd drops
        # it (and its key) a TTL after the last keep-alive, and checks every half second.
        self.lingering_until = held + 2 * LEASE_TTL + 0.5
        self.last_change = time.monotonic()

    @rule(choice=CHOICE)
    def lose_join_answer(self, choice: int) -> None:
        """A node alone's next join loses its answer and lands late; an idle one joins again."""
        self._collect()
        alone = self._alone()
        if not alone:
            return
        # Rather an idle one: it joins again at once, and the step waits until the copy landed.
        alone = [node for node in alone if node.joining is None and node.round] or alone
        node = alone[choice % len(alone)]
        assert node.alone is not None
        late = node.alone.late
        late.armed = True
        if node.joining is None and node.round:
            landed = late.landed
            self._start_join(node)
            self._late_landed(late, landed)

    def _late_landed(self, late: LateJoin, landed: int) -> None:
        """Wait until a late copy beyond `landed` reached etcd (LATE_WAIT s at most)."""
        deadline = time.monotonic() + LATE_WAIT
        while late.landed == landed and time.monotonic() < deadline:
            time.sleep(0.01)

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        """The rendezvous closes: waiting joins fail, and so does every later one."""
        self.closed = True
        self.call(self._participant(self.connection).close())  # the first node's may be closed

    @rule()
    def settle(self) -> None:
        """Once nothing moves, a round completes if all wait, and the waiting count is right."""
        while not self.closed and self._alive():
            self._quiet()
            alive = self._alive()
            if len(alive) < MIN_NODES or any(node.joining is None for node in alive):
                break
            # Every member of the latest round joined again or is gone, and enough nodes wait.
            before, deadline = self.completions, time.monotonic() + STALL
            while self.completions == before:
                assert time.monotonic() < deadline, (
                    f"round {max(self.rounds, default=0) + 1} stalled: its {len(alive)} "
                    f"nodes waited {STALL} s"
                )
                time.sleep(0.1)
                self._collect()
        if self.closed or not self._alive():
            return
        latest = max(self.rounds, default=0)
        pending = [node for node in self._alive() if node.joining is not None]
        holding = [node for node in self._alive() if node.round == latest and latest]
        members = {membership.member_id for _, membership in self.rounds.get(latest, [])}
        if latest and len(holding) < len(members):
            return  # some members of the latest round left: the count is a moving target
        if time.monotonic() < self.lingering_until:
            return  # so is it while the key of a lease presumed lost may linger
        waiting = self.call(self._alive()[0].participant.num_nodes_waiting())
        assert waiting == len(pending), (waiting, len(pending))

    def _quiet(self) -> None:
        """Wait until no join started or completed for QUIET s (30 s at most)."""
        deadline = time.monotonic() + 30
        while True:
            self._collect()
            now = time.monotonic()
            if now - self.last_change > QUIET:
                return
            assert now < deadline, "joins kept completing for 30 s"
            time.sleep(0.1)

    # ---------------------------------------------------------------------------- invariants

    @invariant()
    def completed_rounds_are_sound(self) -> None:
        """Every completed round: agreed members, a permutation of ranks, a legal size."""
        self._collect()
        for number, seen in self.rounds.items():
            memberships = [membership for _, membership in seen]
            assert len({m._decision for m in memberships}) == 1, f"round {number} disagrees"
            members = self.members[number]
            assert MIN_NODES <= len(members) <= MAX_NODES
            assert len({member.id for member in members}) == len(members)
            # A node may hold a new lease after a loss, but it joins with the same info.
            infos = sorted(member.info for member in members)
            assert len(set(infos)) == len(infos), (
                f"a node holds two ranks in round {number}: {infos}"
            )
            ranks = [m.rank for m in memberships]
            assert len(set(ranks)) == len(ranks), f"two nodes hold one rank in round {number}"
            for membership in memberships:
                assert membership.world_size == len(members)
                assert members[membership.rank].id == membership.member_id
            for index, membership in seen:
                assert members[membership.rank].info == _info(index)
            indexes = [index for index, _ in seen]
            assert len(set(indexes)) == len(indexes), f"a node joined round {number} twice"


def _info(index: int) -> bytes:
    """The node info of node `index`: it names the node whichever lease it holds."""
    return b"node-%d" % index


SETTINGS = settings(
    max_examples=_EXAMPLES,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_any_interleaving_of_joins_leaves_deaths_and_closing_is_sound(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """The state machine: every step keeps the completed rounds sound."""
    with start_blocking_portal("asyncio") as portal:
        connection = rdzv.connect(etcd_endpoints, read_timeout=10)
        portal.call(connection.open)
        try:

            class Machine(RendezvousMachine):
                """The machine on this test's loop, etcd and prefix (Hypothesis wants a class)."""

                def __init__(self) -> None:
                    super().__init__(
                        portal, connection, raw_etcd_sync, etcd_key_prefix, etcd_endpoints
                    )

            run_state_machine_as_test(Machine, settings=SETTINGS)
        finally:
            portal.call(connection.aclose)
