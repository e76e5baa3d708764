"""`AsyncRendezvous`: a rendezvous whose cost grows with the number of nodes, not its square.

Each participant writes one key of its own, on its own lease, with one transaction, and then
waits on a mirror of its round's few control keys that its connection shares among all of its
participants. One participant per round, the coordinator, follows the members and completes
the round (see `_coordinator`). Nobody rewrites a shared value to join, nobody watches all
members to learn that a round completed, and nobody is sent the membership: a node computes
its rank from its arrival number and the round's small decision (see `_layout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
from typing import Final, Literal

import anyio

from rdzv._errors import (
    RendezvousClosedError,
    RendezvousCompactedError,
    RendezvousError,
    RendezvousLeaseNotFoundError,
    RendezvousOutcomeUnknownError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv._etcd import (
    AGAIN,
    Again,
    Compare,
    Connection,
    Get,
    KeyValue,
    Nested,
    Put,
    TxnResult,
    answer_itself,
    keep_alive,
    read_deadline,
    settle,
)
from rdzv._etcd._keepalive import LeaseKeeper
from rdzv._etcd._values import Delete
from rdzv._rendezvous._control import RoundControl, Seen, round_control
from rdzv._rendezvous._coordinator import Coordinator, Settings, latest_is
from rdzv._rendezvous._layout import Decision, Layout, Member, member_name, round_number
from rdzv._rendezvous._members import read_members
from rdzv._validation import shown, validate_key_prefix, validate_run_id

DEFAULT_ROUNDS_PREFIX: Final = "/rdzv/rounds"
"""Where `AsyncRendezvous` keeps its keys by default: `{key_prefix}/{run_id}/...`."""

DEFAULT_LEASE_TTL: Final = 15
"""Seconds after which a participant that stopped answering is gone: PyTorch's default
keep-alive interval (5 s) times its default number of missed keep-alives (3)."""

MAX_NODE_INFO: Final = 1024
"""The most bytes of node info a participant may join with."""

MAX_NODES: Final = 131_072
"""The largest `max_nodes`. No value holds a round's membership, but a decision that lists
member ids (see `_layout.Decision`) must still fit in one etcd value: 8 bytes per member."""

logger = logging.getLogger("rdzv.rendezvous")

_MAX_TIMEOUT: Final = 86_400 * 365
_MAX_LEASE_TTL: Final = 86_400
_RETRY_COORDINATION: Final = 1.0


@dataclasses.dataclass(frozen=True)
class Membership:
    """A completed round, as one of its members sees it.

    Ranks follow the order in which the members joined, as etcd serialized their join
    transactions (the create revision of their keys): the node that has waited longest gets
    rank 0, and no clock decides anything. Every member of a round agrees on who holds which
    rank; `AsyncRendezvous.read_members` reads the members, with their node info, in rank order.
    """

    run_id: str
    round: int
    """The round's number: 1 for the first round, and larger for every later one."""
    rank: int
    """This member's rank, 0 .. world_size - 1: its position in `members`."""
    world_size: int
    """How many members the round has: from `min_nodes` to `max_nodes`."""
    member_id: int
    """This member's id."""
    _decision: Decision = dataclasses.field(repr=False)
    # What the round's coordinator decided, as it wrote it: `read_members` reads by it.


_Outcome = Literal["surplus", "lease lost", "closed", "elect"]


class _Absent(enum.Enum):
    ABSENT = enum.auto()


_ABSENT: Final = _Absent.ABSENT
"""Our key is not in the round we tried to join (a join whose answer was lost never landed)."""

_Entered = tuple[int, Seen | None, int | _Absent | None]
"""What a join's transaction found: the round, its control keys, our arrival number."""


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
        # A lease we stopped keeping alive without etcd saying that it is gone: revoked before
        # we write anything on another one, so that we never have two keys in a round.
        self._abandoned: int | None = None
        # Our member keys: the one of the round we joined, and one whose join may have landed.
        self._keys: list[bytes] = []
        self._coordinating: dict[int, asyncio.Task[None]] = {}
        # (round, coordinator key revision) of the coordinations that ran to their end.
        self._coordinated: set[tuple[int, int]] = set()
        self._waiting: int | None = None  # the round a join waits in
        self._joining = asyncio.Lock()
        self._left = False
        self._join_scope: anyio.CancelScope | None = None  # cancelled by `leave`

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
        """The most bytes of node info `join` accepts: `MAX_NODE_INFO`, whatever `max_nodes`."""
        return MAX_NODE_INFO

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
        timeout (`RendezvousOutcomeUnknownError`, a subclass, if a join whose answer was lost
        could not be settled in that time; the node then withdraws whatever of it landed).
        `ValueError` if `node_info` is not bytes or longer than `max_node_info`.
        """
        if not isinstance(node_info, bytes | bytearray):
            raise ValueError(f"node_info must be bytes, not {type(node_info).__name__}.")
        if len(node_info) > self.max_node_info:
            raise ValueError(
                f"node_info is {len(node_info)} bytes; with max_nodes="
                f"{self._settings.max_nodes} it may have at most {self.max_node_info}."
            )
        async with self._joining:
            if self._left:
                raise self._left_error()
            with anyio.CancelScope() as self._join_scope:
                with anyio.move_on_after(self._join_timeout):
                    try:
                        return await self._join(bytes(node_info))
                    except BaseException:
                        await self._withdraw()
                        raise
                    finally:
                        self._join_scope = None
                raise RendezvousTimeoutError(
                    f"No round of {self._run_id!r} completed within the join timeout "
                    f"({self._join_timeout:g} s); this node left the round it waited in.",
                    run_id=self._run_id,
                    round=self._latest + 1,
                    timeout=self._join_timeout,
                )
            raise self._left_error()  # `leave` cancelled the join
        raise AssertionError("unreachable")  # pragma: no cover

    async def _join(self, info: bytes) -> Membership:
        while True:
            keeper = await self._lease()
            try:
                entered = await self._enter(keeper, info)
            except RendezvousLeaseNotFoundError:
                self._drop_lease()  # etcd says that it is gone, and our keys with it
                continue
            # If we took the coordinator key, the waiter sees it in the mirror and adopts it.
            number, seen, arrival = entered
            if isinstance(arrival, _Absent):
                continue  # no copy of our lost join landed before the round completed
            self._waiting = number
            membership = await self._wait_in(number, keeper, seen, arrival)
            self._waiting = None
            if membership is not None:
                return membership

    async def _lease(self) -> LeaseKeeper:
        """Our lease: the one we hold unless etcd says that it is gone, else a new one.

        A presumed loss is not a loss: a keeper whose answers stopped coming presumes its lease
        expired, while etcd may still get its keep-alives and hold its keys. Only once etcd
        says that a lease is gone (or we revoked it) do we write on another one, so no round
        ever holds two keys of ours.
        """
        keeper = self._keeper
        if keeper is not None and not keeper.expired:
            return keeper
        if self._left:
            raise self._left_error()
        if keeper is not None:
            self._abandon_lease()  # until etcd says whether it still has it
            if await self._connection.lease_time_to_live(keeper.lease_id) > 0:
                logger.info(
                    "the lease of a participant of %r was presumed expired, but etcd still "
                    "has it: keeping it",
                    self._run_id,
                    extra={"rdzv_lease": keeper.lease_id},
                )
                self._abandoned = None
                self._keeper = keep_alive(self._connection, keeper.lease_id, self._lease_ttl)
                return self._keeper
            self._abandoned = None  # gone, and our keys with it
        if self._abandoned is not None:
            await self._connection.revoke_lease(self._abandoned)  # harmless if it is gone
            self._abandoned = None
        asked = time.monotonic()
        lease_id = await self._connection.grant_lease(self._lease_ttl)
        self._keeper = keep_alive(self._connection, lease_id, self._lease_ttl, granted_at=asked)
        return self._keeper

    def _drop_lease(self) -> None:
        """Forget a lease etcd no longer has: our keys went with it."""
        if self._keeper is not None:
            self._keeper.release()
        self._keeper = None

    def _abandon_lease(self) -> None:
        """Stop keeping our lease alive, when etcd cannot be told: its keys lapse with it."""
        if self._keeper is not None:
            self._abandoned = self._keeper.lease_id
        self._drop_lease()

    async def _enter(self, keeper: LeaseKeeper, info: bytes) -> _Entered:
        """Put our key into the open round: its number, its control keys, our arrival number.

        The arrival number is `_ABSENT` if our key is not in the round. The control keys, read
        in the same transaction, save the waiter a read: its watch starts there. They say
        whether we hold the coordinator key, so a copy of our join that landed late and took it
        is recognised as our own. A join whose answer was lost is sent again, within the read
        timeout: the same key, value and lease, so a copy that lands late (or twice) changes
        nothing, and the key's create revision (our rank) stays that of the first to land.
        The control keys are None if we only know that a lost join may have landed.
        """
        layout, lease = self._layout, keeper.lease_id
        deadline = read_deadline(self._connection)
        number = self._latest + 1  # the round of the attempt just sent

        async def send() -> TxnResult:
            nonlocal number
            number = self._latest + 1
            compare, success, failure = self._join_request(number, lease, info)
            what = f"join round {number} of {self._run_id!r}"
            return await self._connection.txn(
                compare, success, failure, what=what, deadline=deadline
            )

        async def lost() -> Again:
            key = layout.member(number, lease)
            if key not in self._keys:
                self._keys.append(key)  # ours to delete: a copy may land after we give up
            return AGAIN  # the same key, value and lease: see above

        async def answered(result: TxnResult, after_lost: bool) -> _Entered | Again:
            if result.succeeded:
                self._keys = [layout.member(number, lease)]
                [arrivals], [ours], control = result.ranges[-3:]
                seen = (control, result.revision)
                if ours.create_revision == result.revision:
                    return number, seen, arrivals.version
                # Put again: the arrival that counts is the first copy's.
                return number, seen, await self._arrival(number, ours, deadline)
            latest, closed = result.ranges
            if closed:
                raise self._closed_error()
            self._latest = self._refused_join(number, latest)
            if after_lost and self._latest == number:
                # A lost attempt may have landed before the round completed: our key says.
                key = layout.member(number, lease)
                landed = await self._connection.get(key, deadline=deadline)
                if landed is None:
                    return number, None, _ABSENT
                return number, None, await self._arrival(number, landed, deadline)
            return AGAIN

        return await settle(send, answered=answered, lost=lost, deadline=deadline)

    def _join_request(
        self, number: int, lease: int, info: bytes
    ) -> tuple[list[Compare], list[Put | Delete | Nested | Get], list[Get]]:
        """The join transaction of round `number`: compare, success and failure."""
        layout = self._layout
        key = layout.member(number, lease)
        coordinator = layout.coordinator(number)
        # Leaving our previous round, and any key a lost join may have left, atomically.
        success: list[Put | Delete | Nested | Get] = [
            Delete(old) for old in self._keys if old != key
        ]
        take = Put(coordinator, member_name(lease), lease)
        counter = layout.arrivals(number)
        success += [
            Put(key, info, lease),
            # Its version is now our arrival number. Only the copy that creates our key counts:
            # a copy of a lost join that lands again would leave a gap in the arrivals, and
            # every node of the round is sent the gaps (under overload, thousands of them).
            Nested((Compare.absent(key),), (Put(counter, b""),)),
            Nested((Compare.absent(coordinator),), (take,)),
            Get(counter),
            Get(key),
            Get(layout.control(number), prefix=True),
        ]
        compare = [Compare.absent(layout.closed), latest_is(layout, number - 1)]
        return compare, success, [Get(layout.latest), Get(layout.closed)]

    async def _arrival(self, number: int, ours: KeyValue, deadline: float) -> int | None:
        """The arrival number of the join that created our key `ours` (None: unknown now).

        The counter, read as it was at the key's creation: the join put both.
        """
        counter = self._layout.arrivals(number)
        try:
            kv = await self._connection.get(
                counter, revision=ours.create_revision, deadline=deadline
            )
        except RendezvousCompactedError:
            return None  # etcd no longer knows: unless the round lists ids, we are not a member
        return kv.version if kv is not None and kv.mod_revision == ours.create_revision else None

    def _refused_join(self, number: int, latest: tuple[KeyValue, ...]) -> int:
        """The latest round, after etcd refused our join of round `number` with `latest`.

        Raises `RendezvousStateError` if `latest` cannot be rdzv's.
        """
        layout = self._layout
        current = round_number(latest[0].value if latest else None, key=layout.latest)
        if current < self._latest or current == number - 1:
            # `latest` went back (we saw round `self._latest` complete), or holds what we
            # compared it with and yet the comparison failed: rdzv did not write it.
            raise RendezvousStateError(
                f"The key {layout.latest!r} says that round {current} is the latest, but round "
                f"{max(self._latest, number - 1)} of {self._run_id!r} completed: another "
                "program wrote or deleted keys of this rendezvous. Choose another run id, or "
                "delete its keys (rdzv reset)."
            )
        return current

    async def _wait_in(
        self, number: int, keeper: LeaseKeeper, seen: Seen | None, arrival: int | None
    ) -> Membership | None:
        """Wait until round `number` completes; None if we must join another round."""
        prefix = self._layout.control(number)
        async with round_control(self._connection, prefix, seen=seen) as control:
            while True:
                outcome = await self._next_outcome(control, number, keeper, arrival)
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
                        "the lease of a participant waiting in round %d of %r is presumed "
                        "expired (was its process stalled, or etcd unreachable?); it joins "
                        "again, on a new lease if etcd says the old one is gone",
                        number,
                        self._run_id,
                        extra={"rdzv_lease": keeper.lease_id},
                    )
                    return None
                await self._elect(control, number, keeper.lease_id)

    async def _next_outcome(
        self, control: RoundControl, number: int, keeper: LeaseKeeper, arrival: int | None
    ) -> Membership | _Outcome:
        """What happens next to a participant waiting in round `number`."""
        outcome: Membership | _Outcome | RendezvousError = "lease lost"
        async with anyio.create_task_group() as waiting:

            async def on_expiry() -> None:
                await keeper.wait_expired()
                await control.changed()

            waiting.start_soon(on_expiry)
            try:
                outcome = await control.wait_for(
                    lambda: self._outcome(control, number, keeper, arrival)
                )
            except RendezvousError as error:
                outcome = error  # raised below, not wrapped in an exception group
            waiting.cancel_scope.cancel()
        if isinstance(outcome, RendezvousError):
            raise outcome
        return outcome

    def _outcome(
        self, control: RoundControl, number: int, keeper: LeaseKeeper, arrival: int | None
    ) -> Membership | _Outcome | None:
        done = control.get(b"done")
        if done is not None:
            decision = control.decision(done)
            self._latest = max(self._latest, number)
            try:
                rank = decision.rank(keeper.lease_id, arrival)
            except LookupError:
                logger.warning(
                    "round %d of %r completed, but this node's arrival number is unknown "
                    "(etcd compacted it): it joins the next round",
                    number,
                    self._run_id,
                )
                rank = None
            if rank is None:
                return "surplus"
            logger.debug(
                "joined round %d of %r as rank %d of %d", number, self._run_id, rank, decision.size
            )
            return Membership(self._run_id, number, rank, decision.size, keeper.lease_id, decision)
        if keeper.expired:
            return "lease lost"
        if control.get(b"closed") is not None:
            return "closed"
        self._adopt(control, number)
        if self._may_elect(control, number):
            return "elect"
        return None

    def _may_elect(self, control: RoundControl, number: int, *, holding: bool = False) -> bool:
        """Whether to try to take round `number`'s vacant coordinator key now.

        Vacant: absent, or holding what no participant writes. Not while another local
        participant tries (`holding`: we hold the election lock), and not twice for one state
        of the mirror.
        """
        return (
            _vacant(control.get(b"coordinator"))
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
            seen = control.get(b"coordinator")
            if seen is not None:
                logger.warning(
                    "replacing %r = %r, which no participant wrote",
                    coordinator,
                    seen.value[:40],
                    extra={"rdzv_key": coordinator.decode(errors="backslashreplace")},
                )
            key = self._layout.member(number, lease)
            deadline = read_deadline(self._connection)

            async def send() -> TxnResult:
                return await self._connection.txn(
                    # Also after completion: the coordinator then reports departures.
                    [
                        Compare.mod_revision_is(coordinator, seen.mod_revision if seen else 0),
                        Compare(key, "create_revision", ">", 0),
                    ],
                    [Put(coordinator, member_name(lease), lease)],
                    what=f"take over the coordination of round {number}",
                    deadline=deadline,
                )

            async def answered(result: TxnResult, _: bool) -> int | None:
                return result.revision if result.succeeded else None

            async def lost() -> int | None:
                # If it lands later, the mirror shows the key and we adopt it (`_adopt`).
                taken = await self._connection.get(coordinator, deadline=deadline)
                return _held_by((taken,) if taken else (), lease)

            try:
                revision = await settle(send, answered=answered, lost=lost, deadline=deadline)
            except RendezvousLeaseNotFoundError:
                return  # our lease is gone: the waiter learns it from the keeper
            keeper = self._keeper
            if revision is not None and keeper is not None and keeper.lease_id == lease:
                logger.debug("coordinating round %d of %r", number, self._run_id)
                self._coordinate(number, keeper, revision)

    def _coordinate(self, number: int, keeper: LeaseKeeper, revision: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run_coordinator(number, keeper, revision)
        )
        self._coordinating[number] = task
        task.add_done_callback(lambda _: self._coordinating.pop(number, None))

    def _adopt(self, control: RoundControl, number: int) -> None:
        """Coordinate round `number` if its coordinator key is ours and nobody here runs it.

        The key is ours after our join took it, and also when a join or an election of ours
        whose answer was lost landed after we looked: unless we coordinate, nobody does.
        """
        kv, keeper = control.get(b"coordinator"), self._keeper
        if kv is None or keeper is None or number in self._coordinating:
            return
        revision = _held_by((kv,), keeper.lease_id)
        if revision is not None and (number, revision) not in self._coordinated:
            logger.debug("coordinating round %d of %r", number, self._run_id)
            self._coordinate(number, keeper, revision)

    async def _run_coordinator(self, number: int, keeper: LeaseKeeper, revision: int) -> None:
        extra = {"rdzv_round": number}
        while not keeper.expired:
            try:
                async with round_control(self._connection, self._layout.control(number)) as control:
                    coordinator = Coordinator(
                        self._connection,
                        self._layout,
                        number,
                        revision=revision,
                        member_id=keeper.lease_id,
                        settings=self._settings,
                        control=control,
                    )
                    await coordinator.run()
                    # Done (or replaced): never again for this key, though it is still ours.
                    self._coordinated.add((number, revision))
                    return
            except RendezvousError as error:
                # etcd did not answer for a whole read timeout, or holds a value rdzv did not
                # write: our key still says that we coordinate, so go on when it answers again
                # (or the value is mended, or our lease lapses meanwhile).
                level = logging.WARNING if isinstance(error, RendezvousStateError) else logging.INFO
                logger.log(
                    level,
                    "the coordinator of round %d of %r failed, and tries again in %g s: %s",
                    number,
                    self._run_id,
                    _RETRY_COORDINATION,
                    error,
                    extra=extra,
                )
                await asyncio.sleep(_RETRY_COORDINATION)
            except Exception:
                # Never silently: a waiter takes over the key that we free.
                logger.exception(
                    "the coordinator of round %d of %r failed", number, self._run_id, extra=extra
                )
                with contextlib.suppress(RendezvousError):
                    await self._free_coordinator_key(number, keeper.lease_id)
                return

    async def _withdraw(self) -> None:
        """After a failed join: resign, delete our keys, or let our lease lapse if we cannot."""
        number, self._waiting = self._waiting, None
        # Still ours to delete in the next join: a copy of a lost join may land after this.
        keys = list(self._keys)
        # Shielded, so one deadline for it all: it never outlasts a read timeout.
        deadline = read_deadline(self._connection)
        with anyio.CancelScope(shield=True):
            try:
                if number is not None:
                    await self._resign(number, deadline)
                for key in keys:
                    await self._connection.delete(key, deadline=deadline)
            except RendezvousError:
                # Our keys expire with the lease, within lease_ttl; the next join revokes it
                # before it writes on another one.
                self._abandon_lease()

    async def _resign(self, number: int, deadline: float) -> None:
        """Stop coordinating round `number`, and free its coordinator key for a waiter."""
        task = self._coordinating.pop(number, None)
        if task is not None:
            await _stop([task], deadline - time.monotonic())
        if self._keeper is not None:
            await self._free_coordinator_key(number, self._keeper.lease_id, deadline)

    async def _free_coordinator_key(
        self, number: int, lease: int, deadline: float | None = None
    ) -> None:
        coordinator = self._layout.coordinator(number)
        limit = read_deadline(self._connection) if deadline is None else deadline

        async def send() -> TxnResult:
            return await self._connection.txn(
                [Compare.value_is(coordinator, member_name(lease))],
                [Delete(coordinator)],
                what=f"resign the coordination of round {number}",
                deadline=limit,
            )

        # Deleting twice is harmless: a lost answer is sent again; if etcd never says, the key
        # goes with our lease.
        with contextlib.suppress(RendezvousOutcomeUnknownError):
            await settle(send, answered=answer_itself, deadline=limit)

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
        with anyio.move_on_after(timeout):
            async with round_control(self._connection, self._layout.control(number)) as control:
                while True:
                    outcome = await control.wait_for(lambda: self._departure(control, number))
                    if outcome:
                        return True
                    await self._elect(control, number, membership.member_id)
        return False

    def _departure(self, control: RoundControl, number: int) -> bool | None:
        done = control.get(b"done")
        if control.get(b"departed") is not None or done is None:
            return True  # reported, or the round's keys are gone: the next round completed
        self._adopt(control, number)
        if control.get(b"coordinator") is None:
            decision = control.decision(done)
            if (
                decision.coordinator_is_member
                and member_name(decision.coordinator) in control.coordinators
            ):
                return True  # the coordinator was a member, and its key went with its lease
            if self._may_elect(control, number):
                return False  # somebody must watch the members: try to
        return None

    async def read_members(self, membership: Membership) -> tuple[Member, ...]:
        """The members of `membership`'s round, in rank order, with their node info.

        One read of the round's member keys as they were when its coordinator chose them, so
        it costs etcd the round's size in bytes: nobody receives it unless they ask. Raises
        `RendezvousCompactedError` once etcd has compacted that revision.
        """
        return await read_members(self._connection, self._layout, membership._decision)

    async def close(self) -> None:
        """Close the rendezvous for everybody, within the connection's read timeout.

        Joins from now on raise `RendezvousClosedError`, and so do the joins waiting in the
        open round: one transaction writes `closed` and tells that round. Raises
        `RendezvousOutcomeUnknownError` if etcd did not answer and the rendezvous may or may
        not be closed, `RendezvousConnectionError` if nothing was written.
        """
        layout = self._layout
        deadline = read_deadline(self._connection)
        number = self._latest  # a guess of the latest round; the transaction checks it

        async def send() -> TxnResult:
            return await self._connection.txn(
                # No round completes after `closed` (completing compares it), so the open round
                # is the one after `latest`.
                [latest_is(layout, number)],
                [Put(layout.closed, b"closed"), Put(layout.closed_in(number + 1), b"closed")],
                [Get(layout.latest)],
                what=f"close {self._run_id!r}",
                deadline=deadline,
            )

        async def answered(result: TxnResult, _: bool) -> Again | None:
            nonlocal number
            if result.succeeded:
                return None
            [latest] = result.ranges
            number = round_number(latest[0].value if latest else None, key=layout.latest)
            return AGAIN

        # Closing twice is harmless: a lost answer is sent again, all within one deadline.
        await settle(send, answered=answered, deadline=deadline)
        logger.info("closed the rendezvous %r", self._run_id)

    async def is_closed(self) -> bool:
        """Whether the rendezvous is closed."""
        return await self._connection.get(self._layout.closed) is not None

    async def leave(self) -> None:
        """Leave for good: end a pending join, stop coordinating, delete our keys. Harmless twice.

        The other members of our round see a departure. A pending join, and every join of
        this object from now on, raises `RendezvousClosedError`. It takes the connection's read
        timeout at most: a lease etcd could not be told to revoke lapses after its TTL.
        """
        self._left = True
        if self._join_scope is not None:
            self._join_scope.cancel()
        deadline = read_deadline(self._connection)
        await _stop(list(self._coordinating.values()), deadline - time.monotonic())
        keeper, self._keeper, self._keys = self._keeper, None, []
        leases = [keeper.lease_id] if keeper is not None else []
        if self._abandoned is not None:
            leases.append(self._abandoned)
            self._abandoned = None
        if keeper is not None:
            keeper.release()
        for lease in leases:
            with contextlib.suppress(RendezvousError):
                await self._connection.revoke_lease(lease, deadline=deadline)

    def _left_error(self) -> RendezvousClosedError:
        return RendezvousClosedError(
            f"This participant left the rendezvous {self._run_id!r} (leave()): make a new "
            "one to join again.",
            run_id=self._run_id,
        )


def _vacant(coordinator: KeyValue | None) -> bool:
    """Whether a coordinator key is free to take: absent, or not written by a participant."""
    return coordinator is None or _held_by((coordinator,), coordinator.lease) is None


def _held_by(coordinator: tuple[KeyValue, ...], lease: int) -> int | None:
    """The mod revision of the coordinator key if the participant of `lease` holds it."""
    held = coordinator[0] if coordinator else None
    if held is not None and lease and held.lease == lease and held.value == member_name(lease):
        return held.mod_revision
    return None


async def _stop(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Cancel coordinator tasks and wait for them to end, `timeout` seconds at most."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, timeout))
