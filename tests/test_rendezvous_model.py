"""A Hypothesis state machine drives the scalable rendezvous against a real etcd.

Participants arrive, join again, leave, die (their lease is revoked behind their back) and the
rendezvous closes, in any interleaving. After every step the rounds that completed so far must
be sound: ranks a permutation of 0..W-1, min_nodes <= W <= max_nodes, every member of a round
seeing the same members, no node in a round twice; and once nothing moves, the nodes that wait
are the ones counted as waiting.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import rdzv
from support import RawEtcd

pytestmark = pytest.mark.slow

T = TypeVar("T")

MIN_NODES, MAX_NODES = 2, 3
LAST_CALL = 0.2
SLOTS = 6  # participants alive at once, at most
QUIET = 0.8  # seconds without a step or a completed join after which nothing moves
# Which node a rule picks: drawn whatever the nodes are, since which nodes qualify depends on
# timing, and Hypothesis needs the same draws when it replays an example.
CHOICE = st.integers(min_value=0, max_value=SLOTS * 4)
_EXAMPLES = {"ci": 12, "fuzz": 100}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]


@dataclasses.dataclass
class Node:
    """One participant, and what the model knows of it."""

    index: int
    participant: rdzv.AsyncRendezvous
    joining: concurrent.futures.Future[rdzv.Membership] | None = None
    round: int = 0  # the last round it completed, while it is idle in it
    gone: bool = False


class RendezvousMachine(RuleBasedStateMachine):
    """Many participants of one run id on one connection, and a raw client to kill them."""

    def __init__(
        self, portal: BlockingPortal, connection: rdzv.Connection, raw: RawEtcd, key_prefix: str
    ) -> None:
        super().__init__()
        self.portal = portal
        self.connection = connection
        self.raw = raw
        self.key_prefix = key_prefix
        self.run_id = uuid.uuid4().hex
        self.nodes: list[Node] = []
        self.rounds: dict[int, list[tuple[int, rdzv.Membership]]] = collections.defaultdict(list)
        self.closed = False
        self.last_change = time.monotonic()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the connection's loop and wait for it."""

        async def run() -> T:
            return await coroutine

        return self.portal.call(run)

    def teardown(self) -> None:
        """Stop every join and make every participant leave."""
        for node in self.nodes:
            self._stop(node)
            self.call(node.participant.leave())

    # ------------------------------------------------------------------------- bookkeeping

    def _alive(self) -> list[Node]:
        return [node for node in self.nodes if not node.gone]

    def _start_join(self, node: Node) -> None:
        node.round = 0
        node.joining = self.portal.start_task_soon(node.participant.join, b"%d" % node.index)
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
            self.rounds[membership.round].append((node.index, membership))
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

    @precondition(lambda self: len(self._alive()) < SLOTS)
    @rule()
    def arrive(self) -> None:
        """A new node joins."""
        participant = rdzv.AsyncRendezvous(
            self.connection,
            self.run_id,
            min_nodes=MIN_NODES,
            max_nodes=MAX_NODES,
            last_call_timeout=LAST_CALL,
            join_timeout=120,
            lease_ttl=2,
            key_prefix=self.key_prefix,
        )
        node = Node(len(self.nodes), participant)
        self.nodes.append(node)
        self._start_join(node)

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
            node.gone = True

    @rule(choice=CHOICE)
    def die(self, choice: int) -> None:
        """A node dies: its lease ends behind its back, as when its process is killed."""
        alive = [node for node in self._alive() if node.participant._keeper is not None]
        if alive:
            node = alive[choice % len(alive)]
            keeper = node.participant._keeper
            assert keeper is not None
            self.raw.revoke_lease(keeper.lease_id)
            self._stop(node)
            self.call(node.participant.leave())
            node.gone = True

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        """The rendezvous closes: waiting joins fail, and so does every later one."""
        self.closed = True
        self.call(self.nodes[0].participant.close() if self.nodes else _nothing())

    @rule()
    def settle(self) -> None:
        """Once nothing moves, the nodes that wait are exactly those counted as waiting."""
        deadline = time.monotonic() + 30
        while True:
            self._collect()
            if time.monotonic() - self.last_change > QUIET:
                break
            assert time.monotonic() < deadline, "joins kept completing for 30 s"
            time.sleep(0.1)
        if self.closed or not self._alive():
            return
        latest = max(self.rounds, default=0)
        pending = [node for node in self._alive() if node.joining is not None]
        holding = [node for node in self._alive() if node.round == latest and latest]
        members = {membership.member_id for _, membership in self.rounds.get(latest, [])}
        if latest and len(holding) < len(members):
            return  # some members of the latest round left: the count is a moving target
        waiting = self.call(self._alive()[0].participant.num_nodes_waiting())
        assert waiting == len(pending), (waiting, len(pending))

    # ---------------------------------------------------------------------------- invariants

    @invariant()
    def completed_rounds_are_sound(self) -> None:
        """Every completed round: agreed members, a permutation of ranks, a legal size."""
        self._collect()
        for number, seen in self.rounds.items():
            memberships = [membership for _, membership in seen]
            assert len({m.members for m in memberships}) == 1, f"round {number} disagrees"
            members = memberships[0].members
            assert MIN_NODES <= len(members) <= MAX_NODES
            assert len({member.id for member in members}) == len(members)
            ranks = [m.rank for m in memberships]
            assert len(set(ranks)) == len(ranks), f"two nodes hold one rank in round {number}"
            for membership in memberships:
                assert membership.world_size == len(members)
                assert members[membership.rank].id == membership.member_id
            indexes = [index for index, _ in seen]
            assert len(set(indexes)) == len(indexes), f"a node joined round {number} twice"


async def _nothing() -> None:
    return None


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
                    super().__init__(portal, connection, raw_etcd_sync, etcd_key_prefix)

            run_state_machine_as_test(Machine, settings=SETTINGS)
        finally:
            portal.call(connection.aclose)
