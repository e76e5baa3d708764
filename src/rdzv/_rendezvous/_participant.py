"""`AsyncRendezvous`: a rendezvous whose cost grows with the number of nodes, not its square.

Each participant writes one key of its own, on its own lease, with one transaction, and then
waits on a mirror of its round's few control keys that its connection shares among all of its
participants. One participant per round, the coordinator, follows the members and completes
the round (see `_coordinator`). Nobody rewrites a shared value to join, and nobody watches all
members to learn that a round completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from typing import Final, Literal

import anyio

from rdzv._errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousLeaseNotFoundError,
    RendezvousOutcomeUnknownError,
    RendezvousTimeoutError,
)
from rdzv._etcd import Compare, Connection, Get, Nested, Put
from rdzv._etcd._keepalive import LeaseKeeper
from rdzv._etcd._values import Delete
from rdzv._rendezvous._control import RoundControl, round_control
from rdzv._rendezvous._coordinator import Coordinator, Settings, latest_is
from rdzv._rendezvous._layout import (
    ENTRY_OVERHEAD,
    MEMBERSHIP_BUDGET,
    Layout,
    Member,
    member_name,
    round_number,
)
from rdzv._validation import shown, validate_key_prefix, validate_run_id

DEFAULT_ROUNDS_PREFIX: Final = "/rdzv/rounds"
"""Where `AsyncRendezvous` keeps its keys by default: `{key_prefix}/{run_id}/...`."""

DEFAULT_LEASE_TTL: Final = 15
"""Seconds after which a participant that stopped answering is gone: PyTorch's default
keep-alive interval (5 s) times its default number of missed keep-alives (3)."""

MAX_NODE_INFO: Final = 1024
"""The most bytes of node info a participant may join with (fewer when `max_nodes` is large:
see `AsyncRendezvous.max_node_info`)."""

MAX_NODES: Final = 16_384
"""The largest `max_nodes`: the membership of a full round, each node with at least 64 bytes
of node info, fits in one etcd value."""

logger = logging.getLogger("rdzv.rendezvous")

_MAX_TIMEOUT: Final = 86_400 * 365
_MAX_LEASE_TTL: Final = 86_400
_RETRY_COORDINATION: Final = 1.0


@dataclasses.dataclass(frozen=True)
class Membership:
    """A completed round, as one of its members sees it.

    Every member of a round sees the same `members`, in the same order: the order in which they
    joined, as etcd serialized their join transactions (the create revision of their keys). So
    the node that has waited longest gets rank 0, and no clock decides anything.
    """

    run_id: str
    round: int
    """The round's number: 1 for the first round, and larger for every later one."""
    rank: int
    """This member's rank, 0 .. world_size - 1: its position in `members`."""
    world_size: int
    """How many members the round has: from `min_nodes` to `max_nodes`."""
    members: tuple[Member, ...]
    """The members, in rank order."""
    member_id: int
    """This member's id."""


_Outcome = Literal["surplus", "lease lost", "closed", "elect"]


def _positive_int(name: str, value: object, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int from {minimum} to {maximum}, not {shown(value)}.")
    return value


def _seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= _MAX_TIMEOUT
    ):
        raise ValueError(
            f"{name} must be a positive, finite number of seconds (at most a year), "
            f"not {shown(value)}."
        )
    return float(value)


class AsyncRendezvous:
    """One participant of the rendezvous `run_id`: nodes join rounds and get ranks.

    A round completes when `max_nodes` have joined, or when at least `min_nodes` have joined
    and `last_call_timeout` seconds have passed since the `min_nodes`-th did; and never before
    every member of the previous round has left it (joined again, left, or died), so nodes that
    arrive while a round runs wait for the next one, like PyTorch's dynamic rendezvous. Nodes
    beyond `max_nodes` wait for the next round too.

    Each participant holds one etcd lease of `lease_ttl` seconds, kept alive in the background:
    when a process dies, its key disappears `lease_ttl` seconds later and the others learn it.

    Many participants can share one `rdzv.Connection`; it then reads and watches each round's
    control keys once for all of them. Bad arguments raise `ValueError` here.
    """

    def __init__(
        self,
        connection: Connection,
        run_id: str,
        *,
        min_nodes: int,
        max_nodes: int,
        last_call_timeout: float = 30,
        join_timeout: float = 600,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        key_prefix: str = DEFAULT_ROUNDS_PREFIX,
    ) -> None:
        self._connection = connection
        self._run_id = validate_run_id(run_id)
        min_nodes = _positive_int("min_nodes", min_nodes, minimum=1, maximum=MAX_NODES)
        max_nodes = _positive_int("max_nodes", max_nodes, minimum=1, maximum=MAX_NODES)
        if max_nodes < min_nodes:
            raise ValueError(f"max_nodes ({max_nodes}) must be at least min_nodes ({min_nodes}).")
        self._settings = Settings(
            min_nodes, max_nodes, _seconds("last_call_timeout", last_call_timeout)
        )
        self._join_timeout = _seconds("join_timeout", join_timeout)
        self._lease_ttl = _positive_int("lease_ttl", lease_ttl, minimum=2, maximum=_MAX_LEASE_TTL)
        self._layout = Layout(validate_key_prefix(key_prefix), self._run_id)
        self._latest = 0  # the latest completed round this participant knows of
        self._keeper: LeaseKeeper | None = None
        self._key: bytes | None = None  # our member key, once we joined a round
        self._coordinating: dict[int, asyncio.Task[None]] = {}
        self._waiting: int | None = None  # the round a join waits in
        self._joining = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"<rdzv.AsyncRendezvous run_id={self._run_id!r} min_nodes="
            f"{self._settings.min_nodes} max_nodes={self._settings.max_nodes} on "
            f"{self._connection!r}>"
        )

    @property
    def run_id(self) -> str:
        """The rendezvous's run id."""
        return self._run_id

    @property
    def connection(self) -> Connection:
        """The connection this participant uses."""
        return self._connection

    @property
    def max_node_info(self) -> int:
        """The most bytes of node info `join` accepts.

        1024, or fewer when the membership of `max_nodes` nodes would not fit in one etcd value.
        """
        share = MEMBERSHIP_BUDGET // self._settings.max_nodes - ENTRY_OVERHEAD
        return min(MAX_NODE_INFO, share)

    async def __aenter__(self) -> AsyncRendezvous:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.leave()

    # -------------------------------------------------------------------------------- joining

    async def join(self, node_info: bytes = b"") -> Membership:
        """Join the next round and return it once it completed, with this node's rank.

        A node that is a member of a round leaves it by joining again. Raises
        `RendezvousTimeoutError` after `join_timeout` seconds (the node then leaves the round it
        waited in), `RendezvousClosedError` if the rendezvous is closed, and
        `RendezvousConnectionError` if etcd does not answer within the connection's read
        timeout. `ValueError` if `node_info` is not bytes or longer than `max_node_info`.
        """
        if not isinstance(node_info, bytes | bytearray):
            raise ValueError(f"node_info must be bytes, not {type(node_info).__name__}.")
        if len(node_info) > self.max_node_info:
            raise ValueError(
                f"node_info is {len(node_info)} bytes; with max_nodes="
                f"{self._settings.max_nodes} it may have at most {self.max_node_info}."
            )
        async with self._joining:
            with anyio.move_on_after(self._join_timeout):
                try:
                    return await self._join(bytes(node_info))
                except BaseException:
                    await self._withdraw()
                    raise
            raise RendezvousTimeoutError(
                f"No round of {self._run_id!r} completed within the join timeout "
                f"({self._join_timeout:g} s); this node left the round it waited in.",
                run_id=self._run_id,
                round=self._latest + 1,
                timeout=self._join_timeout,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _join(self, info: bytes) -> Membership:
        while True:
            keeper = await self._lease()
            try:
                number, coordinator_revision = await self._enter(keeper, info)
            except RendezvousLeaseNotFoundError:
                self._drop_lease()
                continue
            if coordinator_revision is not None:
                self._coordinate(number, keeper, coordinator_revision)
            self._waiting = number
            membership = await self._wait_in(number, keeper)
            self._waiting = None
            if membership is not None:
                return membership

    async def _lease(self) -> LeaseKeeper:
        if self._keeper is not None and not self._keeper.expired:
            return self._keeper
        self._drop_lease()
        lease_id = await self._connection.grant_lease(self._lease_ttl)
        self._keeper = self._connection.keep_alive(lease_id, self._lease_ttl)
        return self._keeper

    def _drop_lease(self) -> None:
        """Forget a lease etcd no longer has: our key went with it."""
        if self._keeper is not None:
            self._keeper.release()
        self._keeper, self._key = None, None

    async def _enter(self, keeper: LeaseKeeper, info: bytes) -> tuple[int, int | None]:
        """Put our key into the open round; return its number, and our coordinator key's revision.

        The revision is None unless we took the coordinator's key.
        """
        layout, lease = self._layout, keeper.lease_id
        while True:
            number = self._latest + 1
            key = layout.member(number, lease)
            coordinator = layout.coordinator(number)
            success: list[Put | Delete | Nested] = []
            if self._key is not None and self._key != key:
                success.append(Delete(self._key))  # leaving our previous round, atomically
            success.append(Put(key, info, lease))
            take = Put(coordinator, member_name(lease), lease)
            success.append(Nested((Compare.absent(coordinator),), (take,)))
            try:
                result = await self._connection.txn(
                    [Compare.absent(layout.closed), latest_is(layout, number - 1)],
                    success,
                    [Get(layout.latest), Get(layout.closed)],
                    what=f"join round {number} of {self._run_id!r}",
                )
            except RendezvousOutcomeUnknownError:
                joined = await self._resolve_join(key, coordinator, lease)
                if joined is None:
                    continue
                self._key = key
                return number, joined or None
            if result.succeeded:
                self._key = key
                return number, result.revision if result.nested[-1] else None
            latest, closed = result.ranges
            if closed:
                raise self._closed_error()
            self._latest = round_number(latest[0].value if latest else None, key=layout.latest)

    async def _resolve_join(self, key: bytes, coordinator: bytes, lease: int) -> int | None:
        """After a lost answer: whether our join landed, and if so our coordinator key's revision.

        None if it did not land, 0 if it did and we did not take the coordinator's key. Only
        this participant writes keys on its lease, so what is there tells.
        """
        kv = await self._connection.get(key)
        if kv is None or kv.lease != lease:
            return None
        taken = await self._connection.get(coordinator)
        if taken is not None and taken.lease == lease:
            return taken.mod_revision
        return 0

    async def _wait_in(self, number: int, keeper: LeaseKeeper) -> Membership | None:
        """Wait until round `number` completes; None if we must join another round."""
        async with round_control(self._connection, self._layout.control(number)) as control:
            while True:
                outcome = await self._next_outcome(control, number, keeper)
                if isinstance(outcome, Membership):
                    return outcome
                if outcome == "closed":
                    raise self._closed_error()
                if outcome == "surplus":
                    logger.debug(
                        "round %d of %r is full: waiting for the next", number, self._run_id
                    )
                    return None
                if outcome == "lease lost":
                    logger.warning(
                        "the lease of a participant waiting in round %d of %r expired; it joins "
                        "again with a new one (was its process stalled, or etcd unreachable?)",
                        number,
                        self._run_id,
                        extra={"rdzv_lease": keeper.lease_id},
                    )
                    self._drop_lease()
                    return None
                await self._elect(control, number, keeper.lease_id)

    async def _next_outcome(
        self, control: RoundControl, number: int, keeper: LeaseKeeper
    ) -> Membership | _Outcome:
        """What happens next to a participant waiting in round `number`."""
        outcome: Membership | _Outcome | RendezvousError = "lease lost"
        async with anyio.create_task_group() as waiting:

            async def on_expiry() -> None:
                await keeper.wait_expired()
                await control.changed()

            waiting.start_soon(on_expiry)
            try:
                outcome = await control.wait_for(lambda: self._outcome(control, number, keeper))
            except RendezvousError as error:
                outcome = error  # raised below, not wrapped in an exception group
            waiting.cancel_scope.cancel()
        if isinstance(outcome, RendezvousError):
            raise outcome
        return outcome

    def _outcome(
        self, control: RoundControl, number: int, keeper: LeaseKeeper
    ) -> Membership | _Outcome | None:
        done = control.get(b"done")
        if done is not None:
            _, members, ranks = control.membership(done)
            rank = ranks.get(keeper.lease_id)
            self._latest = max(self._latest, number)
            if rank is None:
                return "surplus"
            logger.debug(
                "joined round %d of %r as rank %d of %d", number, self._run_id, rank, len(members)
            )
            return Membership(self._run_id, number, rank, len(members), members, keeper.lease_id)
        if keeper.expired:
            return "lease lost"
        if control.get(b"closed") is not None:
            return "closed"
        if self._may_elect(control, number):
            return "elect"
        return None

    def _may_elect(self, control: RoundControl, number: int, *, holding: bool = False) -> bool:
        """Whether to try to take round `number`'s vacant coordinator key now.

        Not while another local participant tries (`holding`: we hold the election lock), and
        not twice for one state of the mirror.
        """
        return (
            control.get(b"coordinator") is None
            and control.version != control.election_version
            and (holding or not control.election.locked())
            and number not in self._coordinating
        )

    async def _elect(self, control: RoundControl, number: int, lease: int) -> None:
        """Take the vacant coordinator's key of round `number`, if nobody else does first.

        One participant per connection tries at a time, and not again until the mirror
        changes: a coordinator's death wakes every waiter, but costs etcd few requests.
        """
        async with control.election:
            if not self._may_elect(control, number, holding=True):
                return
            control.election_version = control.version
            coordinator = self._layout.coordinator(number)
            key = self._layout.member(number, lease)
            try:
                result = await self._connection.txn(
                    # Also after completion: the coordinator then reports departures.
                    [Compare.absent(coordinator), Compare(key, "create_revision", ">", 0)],
                    [Put(coordinator, member_name(lease), lease)],
                    what=f"take over the coordination of round {number}",
                )
                revision = result.revision if result.succeeded else None
            except RendezvousOutcomeUnknownError:
                taken = await self._connection.get(coordinator)
                revision = taken.mod_revision if taken and taken.lease == lease else None
            except RendezvousLeaseNotFoundError:
                return  # our lease is gone: the waiter learns it from the keeper
            if revision is not None and self._keeper is not None:
                logger.debug("coordinating round %d of %r", number, self._run_id)
                self._coordinate(number, self._keeper, revision)

    def _coordinate(self, number: int, keeper: LeaseKeeper, revision: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run_coordinator(number, keeper, revision)
        )
        self._coordinating[number] = task
        task.add_done_callback(lambda _: self._coordinating.pop(number, None))

    async def _run_coordinator(self, number: int, keeper: LeaseKeeper, revision: int) -> None:
        while not keeper.expired:
            try:
                async with round_control(self._connection, self._layout.control(number)) as control:
                    coordinator = Coordinator(
                        self._connection,
                        self._layout,
                        number,
                        revision=revision,
                        settings=self._settings,
                        control=control,
                    )
                    await coordinator.run()
                    return
            except RendezvousError:
                # etcd did not answer for a whole read timeout: our key still says that we
                # coordinate, so go on when it answers again (or our lease lapses meanwhile).
                await asyncio.sleep(_RETRY_COORDINATION)

    async def _withdraw(self) -> None:
        """After a failed join: resign, delete our key, or let our lease lapse if we cannot."""
        number, self._waiting = self._waiting, None
        key, self._key = self._key, None
        with anyio.CancelScope(shield=True):
            try:
                if number is not None:
                    await self._resign(number)
                if key is not None:
                    await self._connection.delete(key)
            except RendezvousError:
                self._drop_lease()  # our keys expire with the lease, within lease_ttl

    async def _resign(self, number: int) -> None:
        """Stop coordinating round `number`, and free its coordinator key for a waiter."""
        task = self._coordinating.pop(number, None)
        if task is not None:
            await _stop([task], self._connection.read_timeout)
        if self._keeper is not None:
            coordinator = self._layout.coordinator(number)
            mine = member_name(self._keeper.lease_id)
            with contextlib.suppress(RendezvousOutcomeUnknownError):  # deleting is idempotent
                await self._connection.txn(
                    [Compare.value_is(coordinator, mine)],
                    [Delete(coordinator)],
                    what=f"resign the coordination of round {number}",
                )

    def _closed_error(self) -> RendezvousClosedError:
        return RendezvousClosedError(
            f"The rendezvous {self._run_id!r} is closed: nobody can join it any more.",
            run_id=self._run_id,
        )

    # --------------------------------------------------------------------------------- others

    async def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round.

        They are the nodes that joined after the latest completed round (including its members
        that joined again), and those that joined it beyond its size and are moving on.
        """
        layout = self._layout
        while True:
            number = self._latest
            result = await self._connection.txn(
                [],
                [
                    Get(layout.latest),
                    Get(layout.size(number)),
                    Get(layout.members(number), prefix=True, count_only=True),
                    Get(layout.members(number + 1), prefix=True, count_only=True),
                ],
                what=f"count the nodes waiting in {self._run_id!r}",
            )
            latest, size = result.ranges[:2]
            current = round_number(latest[0].value if latest else None, key=layout.latest)
            if current == number:
                members = round_number(size[0].value if size else None, key=layout.size(number))
                return result.counts[3] + max(0, result.counts[2] - members)
            self._latest = current

    async def wait_for_departure(
        self, membership: Membership, *, timeout: float | None = None
    ) -> bool:
        """Wait until a member of `membership`'s round is gone; False if `timeout` passed first.

        A member is gone when it joined again, left, or its lease expired (it died). This
        costs etcd nothing per member: the round's coordinator watches the members and writes
        one key that everybody else watches.
        """
        number = membership.round
        names = {member_name(member.id) for member in membership.members}
        with anyio.move_on_after(timeout):
            async with round_control(self._connection, self._layout.control(number)) as control:
                while True:
                    outcome = await control.wait_for(
                        lambda: self._departure(control, number, names)
                    )
                    if outcome:
                        return True
                    await self._elect(control, number, membership.member_id)
        return False

    def _departure(self, control: RoundControl, number: int, names: set[bytes]) -> bool | None:
        if control.get(b"departed") is not None or control.get(b"done") is None:
            return True  # reported, or the round's keys are gone: the next round completed
        if control.get(b"coordinator") is None:
            if control.coordinators & names:
                return True  # the coordinator was a member, and its key went with its lease
            if self._may_elect(control, number):
                return False  # somebody must watch the members: try to
        return None

    async def close(self) -> None:
        """Close the rendezvous for everybody.

        Joins from now on raise `RendezvousClosedError`, and so do the joins waiting in the
        open round.
        """
        layout = self._layout
        while True:
            try:
                result = await self._connection.txn(
                    [Compare.absent(layout.closed)],
                    [Put(layout.closed, b"closed"), Get(layout.latest)],
                    [Get(layout.latest)],
                    what=f"close {self._run_id!r}",
                )
                break
            except RendezvousOutcomeUnknownError:
                continue  # closing twice is harmless
        # No round completes after `closed` (completing compares it), so this is the open one.
        latest = result.ranges[-1]
        number = round_number(latest[0].value if latest else None, key=layout.latest) + 1
        await self._connection.put(layout.closed_in(number), b"closed")
        if result.succeeded:
            logger.info("closed the rendezvous %r", self._run_id)

    async def is_closed(self) -> bool:
        """Whether the rendezvous is closed."""
        return await self._connection.get(self._layout.closed) is not None

    async def leave(self) -> None:
        """Leave: stop coordinating, delete our key and revoke our lease. Harmless twice.

        The other members of our round see a departure.
        """
        await _stop(list(self._coordinating.values()), self._connection.read_timeout)
        keeper, self._keeper, self._key = self._keeper, None, None
        if keeper is not None:
            keeper.release()
            with contextlib.suppress(RendezvousError):
                await self._connection.revoke_lease(keeper.lease_id)


async def _stop(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Cancel coordinator tasks and wait for them to end, `timeout` seconds at most."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
