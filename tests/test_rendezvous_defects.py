"""Defects of the scalable rendezvous (`rdzv.AsyncRendezvous`), each pinned by a test.

Every test runs against the session's real etcd, under its own key prefix, and asserts the
behaviour wanted once the defect is fixed: one rank per process when a lease is presumed lost,
joins and elections whose answers come late, foreign values where rdzv keeps its keys, `close()`
and `leave()` while joins wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal, TypeVar

import aetcd
import anyio
import pytest

import rdzv
from conftest import Participants
from rdzv._rendezvous._layout import Decision, encode_decision
from rdzv.testing import FaultProxy
from support import LoseAnswers, agreed_members, poll_until

pytestmark = pytest.mark.anyio

T = TypeVar("T")
Outcome = rdzv.Membership | BaseException


class Counted:
    """Wraps a call of a connection (`txn`, `get`, or a wrapper of one) and counts its calls."""

    def __init__(self, call: Callable[..., Awaitable[Any]]) -> None:
        self._call = call
        self.calls = 0
        self.returned = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Count, then make the call."""
        self.calls += 1
        result = await self._call(*args, **kwargs)
        self.returned += 1
        return result


def count_txns(connection: rdzv.Connection, monkeypatch: pytest.MonkeyPatch) -> Counted:
    """Count the transactions sent on `connection` from now on."""
    counter = Counted(connection.txn)
    monkeypatch.setattr(connection, "txn", counter)
    return counter


async def settle(tasks: Sequence[asyncio.Future[T]], *, timeout: float) -> list[T | BaseException]:
    """Wait for `tasks` up to `timeout` s; each one's result or exception, in order.

    A task still running then is cancelled and reported as a TimeoutError.
    """
    await asyncio.wait(tasks, timeout=timeout)
    outcomes: list[T | BaseException] = []
    for task in tasks:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
            outcomes.append(TimeoutError(f"still running after {timeout} s"))
        elif task.cancelled():
            outcomes.append(asyncio.CancelledError())
        else:
            error = task.exception()
            outcomes.append(task.result() if error is None else error)
    return outcomes


async def outcome(call: Coroutine[Any, Any, T], *, timeout: float) -> T | BaseException:
    """`call`'s result or exception, run as a task of its own for `timeout` s at most."""
    [result] = await settle([asyncio.ensure_future(call)], timeout=timeout)
    return result


async def join_outcomes(nodes: list[rdzv.AsyncRendezvous], *, timeout: float = 15) -> list[Outcome]:
    """Join every node at once; each one's membership or exception, in the nodes' order."""
    tasks = [asyncio.ensure_future(node.join(b"node-%d" % i)) for i, node in enumerate(nodes)]
    return await settle(tasks, timeout=timeout)


def memberships(outcomes: list[Outcome]) -> list[rdzv.Membership]:
    """The memberships, after asserting that every join returned one."""
    failed = [repr(outcome) for outcome in outcomes if not isinstance(outcome, rdzv.Membership)]
    assert not failed, f"joins that failed: {failed}"
    return [outcome for outcome in outcomes if isinstance(outcome, rdzv.Membership)]


async def assert_one_member_per_process(
    reader: rdzv.AsyncRendezvous, got: list[rdzv.Membership]
) -> None:
    """Each completed round of `got` has exactly the processes that got it, once each."""
    for number in {m.round for m in got}:
        in_round = [m for m in got if m.round == number]
        ids = {member.id for member in await agreed_members(reader, in_round)}
        returned = {m.member_id for m in in_round}
        assert ids == returned, (
            f"round {number} has members {sorted(ids)}, but its joins returned "
            f"{sorted(returned)}: {len(ids - returned)} member(s) are nobody's"
        )
        assert {m.world_size for m in in_round} == {len(in_round)}


async def member_keys(raw_etcd: aetcd.Client, etcd_key_prefix: str, number: int) -> list[Any]:
    """The member keys of round `number` of run "job", read behind rdzv's back."""
    return list(await raw_etcd.get_prefix(f"{etcd_key_prefix}/job/round/{number}/m/".encode()))


def members_at_least(
    raw_etcd: aetcd.Client, etcd_key_prefix: str, count: int, number: int = 1
) -> Callable[[], Awaitable[bool]]:
    """A check for `poll_until`: round `number` has at least `count` member keys."""

    async def check() -> bool:
        return len(await member_keys(raw_etcd, etcd_key_prefix, number)) >= count

    return check


def key_present(raw_etcd: aetcd.Client, key: str) -> Callable[[], Awaitable[bool]]:
    """A check for `poll_until`: `key` exists."""

    async def check() -> bool:
        return await raw_etcd.get(key.encode()) is not None

    return check


async def _true(value: bool) -> bool:
    """`value`, as a check for `poll_until`."""
    return value


@pytest.fixture
def proxied_read_timeout() -> float:
    """`proxied` (conftest) rides out the held answers of these tests within 10 s."""
    return 10.0


# ------------------------------------------------------------------ 1. two ranks for one process


@pytest.mark.slow
async def test_a_participant_whose_answers_stop_past_its_ttl_holds_one_rank(
    participants: Participants,
    proxy: FaultProxy,
    proxied: rdzv.Connection,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """A participant that lost etcd's answers (not etcd) for a TTL never holds two keys."""
    settings: dict[str, Any] = {"min_nodes": 3, "max_nodes": 4, "last_call_timeout": 6}
    first, second = (participants(**settings) for _ in range(2))
    cut_off = participants(**settings, connection=proxied)
    tasks: list[asyncio.Future[rdzv.Membership]] = []
    with anyio.fail_after(30):
        # The first joiner coordinates, on a connection that keeps working.
        for count, node in enumerate([first, second, cut_off], start=1):
            tasks.append(asyncio.ensure_future(node.join(b"node-%d" % count)))
            await poll_until(members_at_least(raw_etcd, etcd_key_prefix, count))
        # Hold just after a keep-alive answer: etcd keeps the lease for a TTL from the last
        # keep-alive it got, which the participant sent (etcd got it) but never heard back.
        answered = proxy.forwarded("responses")
        await proxy.wait_for_async(lambda: proxy.forwarded("responses") > answered)
        proxy.hold("responses")
        await anyio.sleep(2 + 0.3)
        proxy.release("responses")
    got = memberships(await settle(tasks, timeout=20))
    await assert_one_member_per_process(first, got)


# ------------------------------------------------- 2. a late copy of a join, or of an election


async def test_a_join_that_took_the_coordinator_key_and_landed_late_completes(
    participants: Participants, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join whose lost transaction lands after its resolving read still completes a round."""
    node = participants(min_nodes=1, max_nodes=1, join_timeout=8)
    # The join's transaction loses its answer, and lands just before its resend.
    monkeypatch.setattr(node.connection, "txn", LoseAnswers(node.connection, "late"))
    with anyio.fail_after(15):
        [membership] = memberships(await join_outcomes([node], timeout=12))
    assert (membership.round, membership.world_size) == (1, 1)


async def test_an_election_that_landed_late_still_completes_the_round(
    participants: Participants,
    connection: rdzv.Connection,
    etcd_endpoints: str,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """A waiter whose election lands after its resolving read still coordinates the round."""
    coordinator_key = f"{etcd_key_prefix}/job/round/1/c/coordinator"
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as other:
        quitter = participants(min_nodes=3, max_nodes=3, connection=other)
        waiter, *latecomers = (participants(min_nodes=3, max_nodes=3) for _ in range(3))
        with anyio.fail_after(20):
            quitting = asyncio.ensure_future(quitter.join(b"quitter"))
            await poll_until(key_present(raw_etcd, coordinator_key))
            waiting = asyncio.ensure_future(waiter.join(b"waiter"))
            await poll_until(members_at_least(raw_etcd, etcd_key_prefix, 2))
            # The next transaction on the shared connection is the waiter's election: it loses
            # its answer, and lands just before the connection's next transaction.
            election = Counted(LoseAnswers(connection, "late"))
            reads = Counted(connection.get)
            monkeypatch.setattr(connection, "txn", election)
            monkeypatch.setattr(connection, "get", reads)
            quitting.cancel()  # the coordinator withdraws: it resigns and deletes its key
            await asyncio.wait([quitting])
            await poll_until(lambda: _true(election.calls >= 1))
            # Today the waiter reads the vacant key, before the election lands, and gives up.
            with anyio.move_on_after(3):
                await poll_until(lambda: _true(reads.returned >= 1 or election.calls >= 2))
        # The first latecomer's join is the connection's next transaction.
        late = [asyncio.ensure_future(node.join(b"latecomer")) for node in latecomers]
        got = memberships(await settle([waiting, *late], timeout=12))
    assert {m.world_size for m in got} == {3}
    await assert_one_member_per_process(waiter, got)


async def test_an_election_that_landed_late_still_reports_a_departure(
    participants: Participants,
    connection: rdzv.Connection,
    etcd_endpoints: str,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """A member whose election lands after its resolving read still learns of a departure."""
    coordinator_key = f"{etcd_key_prefix}/job/round/1/c/coordinator"
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as other:
        leaver = participants(min_nodes=2, max_nodes=2, connection=other)
        stayer, bystander = (participants(min_nodes=2, max_nodes=2) for _ in range(2))
        with anyio.fail_after(20):
            leaving = asyncio.ensure_future(leaver.join(b"leaver"))
            await poll_until(key_present(raw_etcd, coordinator_key))
            [_, membership] = memberships(
                await settle([leaving, asyncio.ensure_future(stayer.join(b"stayer"))], timeout=10)
            )
            # The coordinator's key vanishes behind everybody's back: the coordinator stops,
            # and the stayer, waiting for a departure, takes the vacant key over.
            await raw_etcd.delete(coordinator_key.encode())
            election = Counted(LoseAnswers(connection, "late"))
            reads = Counted(connection.get)
            monkeypatch.setattr(connection, "txn", election)
            monkeypatch.setattr(connection, "get", reads)
            departure = asyncio.ensure_future(stayer.wait_for_departure(membership, timeout=10))
            await poll_until(lambda: _true(election.calls >= 1))
            # Today the stayer reads the vacant key, before the election lands, and gives up.
            with anyio.move_on_after(3):
                await poll_until(lambda: _true(reads.returned >= 1 or election.calls >= 2))
            # The connection's next transaction: the election lands just before it.
            await bystander.num_nodes_waiting()
            await leaver.leave()
        with anyio.fail_after(15):
            assert await departure, "the departure of a member was never reported"


# ------------------------------------------------------------- 4. foreign values at latest, done


def _without(prefix: str, message: str) -> str:
    """`message` with the test's key prefix (which holds the test's name) taken out."""
    return message.replace(prefix, "<prefix>")


@pytest.mark.parametrize("value", [b"0", b"01", b"007"])
async def test_a_round_number_not_written_canonically_is_a_state_error(
    participants: Participants,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
    value: bytes,
) -> None:
    """A `latest` of leading zeros raises RendezvousStateError naming it, after few requests."""
    await raw_etcd.put(f"{etcd_key_prefix}/job/latest".encode(), value)
    node = participants(join_timeout=3)
    txns = count_txns(node.connection, monkeypatch)
    error = await outcome(node.join(), timeout=15)
    assert txns.calls < 20, f"{txns.calls} transactions, then {error!r}"
    assert isinstance(error, rdzv.RendezvousStateError), repr(error)
    assert "latest" in _without(etcd_key_prefix, str(error))


async def test_a_foreign_membership_of_round_one_without_latest_is_a_state_error(
    participants: Participants,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """A `done` for round 1 with no `latest` raises RendezvousStateError, after few requests."""
    foreign = encode_decision(
        Decision(
            1,
            1,
            view_revision=1,
            first_revision=1,
            coordinator=0xABC,
            coordinator_is_member=True,
            ids=(0xABC,),
        )
    )
    await raw_etcd.put(f"{etcd_key_prefix}/job/round/1/c/done".encode(), foreign)
    node = participants(join_timeout=3)
    txns = count_txns(node.connection, monkeypatch)
    error = await outcome(node.join(), timeout=15)
    assert txns.calls < 20, f"{txns.calls} transactions, then {error!r}"
    assert isinstance(error, rdzv.RendezvousStateError), repr(error)
    message = _without(etcd_key_prefix, str(error))
    assert "done" in message or "latest" in message, message


# --------------------------------------------------------------------- 5. close() and lost answers


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["responses", "both"])
async def test_a_close_that_etcd_never_answers_ends_within_the_read_timeout(
    participants: Participants, proxy: FaultProxy, direction: Literal["responses", "both"]
) -> None:
    """close() on a connection that gets no answers raises within about one read timeout."""
    read_timeout = 2
    async with rdzv.connect(proxy.endpoint, read_timeout=read_timeout) as unanswered:
        closer = participants(connection=unanswered)
        assert not await closer.is_closed()  # the connection works, until now
        proxy.hold(direction)
        started = time.monotonic()
        closing = await outcome(closer.close(), timeout=30)
        took = time.monotonic() - started
        proxy.release(direction)
    assert isinstance(
        closing, rdzv.RendezvousOutcomeUnknownError | rdzv.RendezvousConnectionError
    ), repr(closing)
    assert took < read_timeout + 1.5, f"close() took {took:.1f} s, then {closing!r}"


@pytest.mark.slow
async def test_a_leave_that_etcd_never_answers_ends_within_the_read_timeout(
    participants: Participants, proxy: FaultProxy
) -> None:
    """leave() of a coordinating waiter, on a connection that gets no answers, ends in time."""
    read_timeout = 2
    async with rdzv.connect(proxy.endpoint, read_timeout=read_timeout) as unanswered:
        leaver = participants(min_nodes=2, max_nodes=2, connection=unanswered)
        joining = asyncio.ensure_future(leaver.join(b"leaver"))
        await poll_until(lambda: _true(bool(leaver._coordinating)))
        proxy.hold("both")
        started = time.monotonic()
        leaving = await outcome(leaver.leave(), timeout=30)
        took = time.monotonic() - started
        proxy.release("both")
        [join_ended] = await settle([joining], timeout=10)
    assert leaving is None, repr(leaving)
    assert isinstance(join_ended, rdzv.RendezvousClosedError), repr(join_ended)
    assert took < read_timeout + 1.5, f"leave() took {took:.1f} s"


@pytest.mark.slow
async def test_a_coordinator_stops_trying_to_complete_its_round_after_close(
    participants: Participants,
    connection: rdzv.Connection,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """Once the rendezvous is closed, its coordinator no longer tries to complete a round."""
    coordinator, member = (
        participants(min_nodes=2, max_nodes=3, last_call_timeout=1) for _ in range(2)
    )
    txns = count_txns(connection, monkeypatch)
    joins = [asyncio.ensure_future(node.join()) for node in (coordinator, member)]
    with anyio.fail_after(10):
        await poll_until(members_at_least(raw_etcd, etcd_key_prefix, 2))
    async with rdzv.connect(proxy.endpoint, read_timeout=2) as unanswered:
        closer = participants(connection=unanswered)
        assert not await closer.is_closed()
        # etcd applies the close, but its answer never comes back.
        proxy.hold("responses")
        await outcome(closer.close(), timeout=30)
        proxy.release("responses")
    await anyio.sleep(0.5)  # the last call is over: today the coordinator tries to complete
    before = txns.calls
    await anyio.sleep(2)
    sent = txns.calls - before
    await settle(joins, timeout=1)
    assert sent < 5, f"{sent} transactions in the 2 s after close()"


# ------------------------------------------------------------------ 6. leave() and pending joins


async def test_leave_ends_a_join_waiting_on_the_same_participant(
    participants: Participants, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """A join still waiting for its round raises RendezvousClosedError when leave() is called."""
    node = participants(min_nodes=2, max_nodes=2, join_timeout=30)
    waiting = asyncio.ensure_future(node.join())
    with anyio.fail_after(10):
        await poll_until(members_at_least(raw_etcd, etcd_key_prefix, 1))
        await node.leave()
    [joined] = await settle([waiting], timeout=5)
    assert isinstance(joined, rdzv.RendezvousClosedError), repr(joined)


async def test_a_join_after_leave_is_refused(participants: Participants) -> None:
    """join() on a participant that left raises RendezvousClosedError at once."""
    node = participants()
    with anyio.fail_after(10):
        await node.join()
        await node.leave()
    joined = await outcome(node.join(), timeout=5)
    assert isinstance(joined, rdzv.RendezvousClosedError), repr(joined)


# ----------------------------------------------------- 8-10. foreign keys among the round's keys


async def test_a_stray_key_among_the_member_keys_is_skipped_with_a_warning(
    participants: Participants,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key among the member keys that is no member key is skipped, with a warning naming it."""
    stray = f"{etcd_key_prefix}/job/round/1/m/zzz"
    await raw_etcd.put(stray.encode(), b"not a member")
    nodes = [participants(min_nodes=2, max_nodes=2, join_timeout=10) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="rdzv.rendezvous"):
        got = memberships(await join_outcomes(nodes))
    assert {m.round for m in got} == {1}
    await assert_one_member_per_process(nodes[0], got)
    warned = [
        record
        for record in caplog.records
        if record.name == "rdzv.rendezvous"
        and record.levelno == logging.WARNING
        and ("zzz" in record.getMessage() or "zzz" in str(getattr(record, "rdzv_key", "")))
    ]
    assert warned, "no warning names the stray key"


async def test_a_member_key_without_a_lease_is_no_member(
    participants: Participants, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """A member key that lives on no lease (nobody keeps it alive) is not counted."""
    phantom = f"{etcd_key_prefix}/job/round/1/m/00000000000000ff"
    await raw_etcd.put(phantom.encode(), b"phantom")
    nodes = [participants(min_nodes=2, max_nodes=2, join_timeout=10) for _ in range(2)]
    got = memberships(await join_outcomes(nodes))
    assert {m.round for m in got} == {1}
    assert 0xFF not in {member.id for member in await nodes[0].read_members(got[0])}
    await assert_one_member_per_process(nodes[0], got)


async def test_a_foreign_coordinator_value_does_not_stall_the_round(
    participants: Participants, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """A coordinator key that names no member and lives on no lease does not stop a round."""
    coordinator = f"{etcd_key_prefix}/job/round/1/c/coordinator"
    await raw_etcd.put(coordinator.encode(), b"not-a-member")
    node = participants(min_nodes=1, max_nodes=1, join_timeout=8)
    [membership] = memberships(await join_outcomes([node]))
    assert (membership.round, membership.world_size) == (1, 1)
