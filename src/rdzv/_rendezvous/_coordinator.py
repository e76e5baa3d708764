"""The coordinator of a round: the one participant that decides when the round completes.

Deciding needs the round's whole membership, so exactly one participant follows it: the
coordinator watches the round's member keys and its arrivals counter (one watch, from the
round's first arrival on: O(N) events for the round, not O(N) per participant). It completes
the round with one transaction that etcd applies at most once:

    if  closed is absent
    and latest == round - 1                  (the round is still open)
    and the coordinator key is still ours    (we were not replaced)
    and no member key of round - 1 is left   (the previous round is over)
    then put done = decision, put latest = round, delete round - 1's keys

The decision (`_layout.Decision`) names the members by arrival number: a few bytes whatever the
round's size, from which every node computes its own rank. When the coordinator cannot number
every member's arrival (etcd compacted the counter's history before it started watching, or
another program wrote under the member prefix), it lists the member ids instead.

A round can complete only when no member of the previous round is left, as in PyTorch's
dynamic rendezvous: nodes that arrive while a round runs wait for the next one, and do not form
a round of their own. After completion the coordinator keeps watching the members, and writes
`departed` when one of them is gone (it left, joined again, or its lease expired).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio
import anyio.abc

from rdzv._errors import (
    RendezvousCompactedError,
    RendezvousError,
    RendezvousStateError,
    RendezvousWatchCompactedError,
)
from rdzv._etcd import (
    Compare,
    Connection,
    Delete,
    Get,
    KeyValue,
    Put,
    TxnResult,
    answer_itself,
    read_deadline,
    settle,
)
from rdzv._rendezvous._control import RoundControl
from rdzv._rendezvous._layout import (
    Decision,
    Layout,
    encode_decision,
    is_member_key,
    round_number,
)
from rdzv._rendezvous._members import keys_of, member_keys

logger = logging.getLogger("rdzv.rendezvous")


@dataclasses.dataclass(frozen=True)
class Settings:
    """When a round completes."""

    min_nodes: int
    max_nodes: int
    last_call_timeout: float


class Coordinator:
    """Decides the completion of round `number`, then reports the first departure."""

    def __init__(
        self,
        connection: Connection,
        layout: Layout,
        number: int,
        *,
        revision: int,
        member_id: int,
        settings: Settings,
        control: RoundControl,
    ) -> None:
        self._connection = connection
        self._layout = layout
        self._number = number
        self._revision = revision  # the mod revision of our coordinator key
        self._member_id = member_id
        self._settings = settings
        self._control = control
        self._members: dict[bytes, KeyValue] | None = None
        self._view = 0  # the revision `_members` is as of
        self._first: int | None = None  # the revision of the first arrival, once followed
        self._arrival_at: dict[int, int] = {}  # revision of a join: its arrival number
        self._chosen: set[bytes] | None = None  # the keys of the members we chose
        self._previous_empty = number == 1
        self._wake = asyncio.Event()
        self._followers: anyio.abc.TaskGroup | None = None
        self._failures: list[RendezvousError] = []
        self._ignored: set[bytes] = set()  # foreign keys under the member prefix, logged once

    async def run(self) -> None:
        """Coordinate until the round's first departure is written, or we are replaced.

        Raises the first `RendezvousError` of its calls and watches (a plain one, not a group).
        """
        async with anyio.create_task_group() as followers:
            self._followers = followers
            followers.start_soon(self._guarded, self._follow_members)
            followers.start_soon(self._guarded, self._follow_control)
            if not self._previous_empty:
                followers.start_soon(self._guarded, self._follow_previous)
            await self._guarded(self._coordinate)
            followers.cancel_scope.cancel()
        if self._failures:
            raise self._failures[0]

    async def _guarded(self, work: Callable[[], Awaitable[object]]) -> None:
        """Run `work`; its `RendezvousError` ends the coordination (raised by `run`)."""
        try:
            await work()
        except RendezvousError as error:
            self._failures.append(error)
            assert self._followers is not None
            self._followers.cancel_scope.cancel()

    async def _coordinate(self) -> None:
        if await self._decide():
            await self._report_departure()

    # ------------------------------------------------------------------------- what we follow

    def _still_ours(self) -> bool:
        if self._control.get(b"closed") is not None:
            return False
        if self._control.revision < self._revision:
            # The mirror has not seen our own write of the key yet (it was shared with other
            # participants before we took the key): it cannot say that the key is not ours.
            return True
        kv = self._control.get(b"coordinator")
        return kv is not None and kv.mod_revision == self._revision

    async def _follow_control(self) -> None:
        while True:
            await self._control.wait_for(
                functools.partial(self._control.newer, self._control.version)
            )
            self._wake.set()

    def _is_member(self, kv: KeyValue) -> bool:
        """Whether `kv` is the key of a participant: named after the live lease it is on.

        Anything else under the member prefix was written by another program (a key without a
        lease would be a member that never leaves); it is skipped, and logged once.
        """
        if is_member_key(self._layout, kv):
            return True
        self._ignore(kv, "its name is not the id of the lease it is on")
        return False

    def _ignore(self, kv: KeyValue, why: str) -> None:
        """Log once that `kv` is skipped: another program wrote it."""
        if kv.key not in self._ignored:
            self._ignored.add(kv.key)
            logger.warning(
                "ignoring %r in round %d: not a participant's key (%s); another program wrote it",
                kv.key,
                self._number,
                why,
                extra={"rdzv_key": kv.key.decode(errors="backslashreplace")},
            )

    async def _follow_members(self) -> None:
        """Follow the member keys, and the arrival number of each join, from the first arrival.

        Replayed from the revision of the round's first arrival, the watch shows every join
        (and its arrival number) in order. Once the round completed, or if etcd compacted that
        history, the keys are read and followed from now: no member is numbered then.
        """
        counter_key = self._layout.arrivals(self._number)
        replay = self._control.get(b"done") is None
        while True:
            self._members, self._arrival_at, self._first = None, {}, None
            counter = await self._counter(counter_key) if replay else None
            if counter is not None:
                # The state before the first arrival: no participant's key yet.
                self._first = start = counter.create_revision
                self._members, self._view = {}, start - 1
            else:
                prefix = self._layout.members(self._number)
                kvs, self._view = await self._connection.range(prefix, prefix=True)
                self._members = {kv.key: kv for kv in kvs if self._is_member(kv)}
                start = self._view + 1
            self._wake.set()
            changes = self._connection.watch(counter_key, start_revision=start, prefix=True)
            try:
                async for event in changes:
                    self._apply(event.kv, deleted=event.deleted, counter_key=counter_key)
                    self._wake.set()
            except RendezvousWatchCompactedError:
                replay = False  # etcd no longer holds the changes we need: read the members
            finally:
                await changes.aclose()

    async def _counter(self, counter_key: bytes) -> KeyValue | None:
        """The arrivals counter; the keys that no join counted (older than it) are logged."""
        kvs, _ = await self._connection.range(counter_key, prefix=True)
        counter = next((kv for kv in kvs if kv.key == counter_key), None)
        for kv in kvs:
            if counter is not None and kv.create_revision < counter.create_revision:
                self._ignore(kv, "it is older than the round's first join")
        return counter

    def _apply(self, kv: KeyValue, *, deleted: bool, counter_key: bytes) -> None:
        assert self._members is not None
        self._view = kv.mod_revision
        if kv.key == counter_key:
            if not deleted:
                self._arrival_at[kv.mod_revision] = kv.version
        elif deleted or not self._is_member(kv):
            self._members.pop(kv.key, None)
        else:
            self._members[kv.key] = kv

    async def _follow_previous(self) -> None:
        """Until no member of the previous round is left."""
        prefix = self._layout.members(self._number - 1)
        while True:
            counted = await self._connection.txn([], [Get(prefix, prefix=True, count_only=True)])
            left = counted.counts[0]
            if not left:
                break
            changes = self._connection.watch(
                prefix, start_revision=counted.revision + 1, prefix=True
            )
            try:
                async for event in changes:
                    left += -1 if event.deleted else int(event.kv.version == 1)
                    if left <= 0:
                        break
            except RendezvousWatchCompactedError:
                continue  # count again
            finally:
                await changes.aclose()
            if left <= 0:
                break
        self._previous_empty = True
        self._wake.set()

    async def _sleep_until_woken(self, timeout: float | None) -> None:
        with anyio.move_on_after(timeout):
            await self._wake.wait()
        self._wake.clear()

    # ------------------------------------------------------------------------------- deciding

    async def _decide(self) -> bool:
        """Complete the round when it is time; False if the round is no longer ours to decide."""
        last_call_from: float | None = None
        while True:
            if not self._still_ours():
                return False
            if self._control.get(b"done") is not None:
                return True
            timeout = None
            if self._members is not None and self._previous_empty:
                count = len(self._members)
                if count < self._settings.min_nodes:
                    last_call_from = None
                elif last_call_from is None:
                    last_call_from = time.monotonic()
                if count >= self._settings.min_nodes:
                    assert last_call_from is not None
                    remaining = last_call_from + self._settings.last_call_timeout - time.monotonic()
                    timeout = remaining
                    if count >= self._settings.max_nodes or remaining <= 0:
                        completed = await self._complete(self._members)
                        if completed is not None:
                            return completed
                        timeout = None  # the previous round is not over: woken when it is
            await self._sleep_until_woken(timeout)

    async def _complete(self, members: dict[bytes, KeyValue]) -> bool | None:
        """Try to write the membership.

        True once the round is complete (by us or not), False if it can no longer be ours to
        complete (closed, or we were replaced), None if it may be completed later.
        """
        chosen = sorted(members.values(), key=lambda kv: kv.create_revision)
        chosen = chosen[: self._settings.max_nodes]
        layout, number = self._layout, self._number
        compare, success, failure = self._completion(chosen)
        deadline = read_deadline(self._connection)

        async def send() -> TxnResult:
            what = f"complete round {number}"
            return await self._connection.txn(
                compare, success, failure, what=what, deadline=deadline
            )

        async def answered(result: TxnResult, _: bool) -> bool | None:
            if not result.succeeded:
                return self._refused(result.counts[0], *result.ranges[1:])
            self._chosen = {kv.key for kv in chosen}
            logger.info(
                "round %d completed with %d members",
                number,
                len(chosen),
                extra={
                    "rdzv_key": layout.done(number).decode(errors="backslashreplace"),
                    "rdzv_revision": result.revision,
                },
            )
            return True

        # A lost answer is sent again: if an earlier copy landed, `latest` moved on, and the
        # next one is refused and says so (`_refused`).
        return await settle(send, answered=answered, deadline=deadline)

    def _completion(
        self, chosen: list[KeyValue]
    ) -> tuple[list[Compare], list[Put | Delete], list[Get]]:
        """The transaction that completes the round with `chosen`: compare, success, failure."""
        layout, number = self._layout, self._number
        compare = [
            Compare.absent(layout.closed),
            latest_is(layout, number - 1),
            Compare.mod_revision_is(layout.coordinator(number), self._revision),
        ]
        success: list[Put | Delete] = [
            Put(layout.done(number), encode_decision(self._decision(chosen))),
            Put(layout.latest, b"%d" % number),
            Put(layout.size(number), b"%d" % len(chosen)),
        ]
        if number > 1:
            compare.append(Compare.prefix_empty(layout.members(number - 1)))
            success.append(Delete(layout.round(number - 1), prefix=True))
        failure = [
            Get(layout.members(number - 1), prefix=True, count_only=True),
            Get(layout.latest),
            Get(layout.closed),
            Get(layout.coordinator(number)),
        ]
        return compare, success, failure

    def _decision(self, chosen: list[KeyValue]) -> Decision:
        """The decision that makes `chosen` (in rank order) the round's members."""
        arrivals = [self._arrival_at.get(kv.create_revision) for kv in chosen]
        numbered = [arrival for arrival in arrivals if arrival is not None]
        by_arrival = (
            self._first is not None
            and len(numbered) == len(chosen)
            and all(a < b for a, b in itertools.pairwise(numbered))
        )
        ids: tuple[int, ...] | None = None
        gaps: tuple[int, ...] | None = None
        if by_arrival:
            members = set(numbered)
            last = numbered[-1] if numbered else 0
            gaps = tuple(arrival for arrival in range(1, last) if arrival not in members)
        else:
            ids = tuple(kv.lease for kv in chosen)
        return Decision(
            self._number,
            len(chosen),
            view_revision=self._view,
            first_revision=self._first or 0,
            coordinator=self._member_id,
            coordinator_is_member=any(kv.lease == self._member_id for kv in chosen),
            gaps=gaps,
            ids=ids,
        )

    def _refused(
        self,
        previous_left: int,
        latest: tuple[KeyValue, ...],
        closed: tuple[KeyValue, ...],
        coordinator: tuple[KeyValue, ...],
    ) -> bool | None:
        """Why etcd refused our completion: what `_complete` returns."""
        layout, number = self._layout, self._number
        completed = round_number(latest[0].value if latest else None, key=layout.latest)
        if completed >= number:
            return True  # by an attempt of ours whose answer was lost
        if closed or not coordinator or coordinator[0].mod_revision != self._revision:
            return False
        if number > 1 and previous_left:
            # A member of the previous round is left after all (the count we followed was
            # stale): follow it again, and complete when it is gone.
            self._previous_empty = False
            assert self._followers is not None
            self._followers.start_soon(self._guarded, self._follow_previous)
            return None
        raise RendezvousStateError(
            f"Round {number} cannot complete: {layout.latest!r} says that round {completed} is "
            f"the latest, although round {number - 1} completed; another program wrote it. "
            "Choose another run id, or delete the rendezvous's keys.",
        )

    # ------------------------------------------------------------------------------ departure

    async def _report_departure(self) -> None:
        # Our own write of `done` reaches the mirror a moment after its answer reached us.
        done = await self._control.wait_for(self._done_or_not_ours)
        if not isinstance(done, KeyValue) or self._control.get(b"departed") is not None:
            return  # replaced, closed, or reported already
        keys = await self._chosen_keys(self._control.decision(done))
        while self._still_ours() and self._control.get(b"done") is done:
            current = self._members if self._members is not None else {}
            gone = sorted(keys - current.keys()) if keys is not None else [b"unknown"]
            if self._members is not None and gone:
                await self._write_departed(done, gone[0])
                logger.info(
                    "a member left round %d: %d of %d are gone",
                    self._number,
                    len(gone),
                    len(keys) if keys is not None else self._control.decision(done).size,
                )
                return
            await self._sleep_until_woken(None)

    async def _write_departed(self, done: KeyValue, gone: bytes) -> None:
        """Write `departed` (the name of the member key `gone`) while `done` exists."""
        deadline = read_deadline(self._connection)

        async def send() -> TxnResult:
            return await self._connection.txn(
                # Only while `done` exists: once the next round completed and deleted this
                # round's keys, a `departed` key would be left behind for ever.
                [Compare(done.key, "create_revision", ">", 0)],
                [Put(self._layout.departed(self._number), gone.rsplit(b"/", 1)[-1])],
                what=f"report a departure from round {self._number}",
                deadline=deadline,
            )

        # Writing the same key again is harmless: a lost answer is sent again.
        await settle(send, answered=answer_itself, deadline=deadline)

    async def _chosen_keys(self, decision: Decision) -> set[bytes] | None:
        """The keys of the round's members: ours if we chose them, else listed or read.

        None if they can no longer be read (etcd compacted the revision they were chosen at):
        the departure is then reported at once (`departed` = `unknown`), and the members
        rendezvous again rather than run on with departures that nobody would report.
        """
        if self._chosen is not None:
            return self._chosen
        listed = keys_of(self._layout, decision)
        if listed is not None:
            return listed
        try:
            kvs = await member_keys(self._connection, self._layout, decision)
        except RendezvousCompactedError:
            return None
        return {kv.key for kv in kvs}

    def _done_or_not_ours(self) -> KeyValue | Literal[False] | None:
        if not self._still_ours():
            return False
        return self._control.get(b"done")


def latest_is(layout: Layout, number: int) -> Compare:
    """`latest` says that round `number` is the latest complete one."""
    if number == 0:
        return Compare.absent(layout.latest)
    return Compare.value_is(layout.latest, b"%d" % number)
