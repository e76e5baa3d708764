"""The scalable rendezvous (`rdzv.AsyncRendezvous`) against a real etcd.

Rounds, ranks, late and surplus nodes, liveness from leases, closing, and bounds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import aetcd
import anyio
import pytest

import rdzv
from conftest import Participants
from rdzv._demo import etcd_requests
from rdzv._rendezvous._control import round_control
from rdzv.testing import EtcdServer
from support import LoseAnswers, agreed_members, closed_port, poll_until, present

pytestmark = pytest.mark.anyio


async def join_all(
    participants: list[rdzv.AsyncRendezvous], timeout: float = 20
) -> list[rdzv.Membership]:
    """Join every participant at once; their memberships, in the participants' order."""
    results: dict[int, rdzv.Membership] = {}

    async def join(index: int) -> None:
        results[index] = await participants[index].join(b"node-%d" % index)

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as group:
            for index in range(len(participants)):
                group.start_soon(join, index)
    return [results[index] for index in range(len(participants))]


async def keys_under(raw_etcd: aetcd.Client, prefix: str) -> list[bytes]:
    """The keys under `prefix`, read behind rdzv's back."""
    return [kv.key for kv in await raw_etcd.get_prefix(prefix.encode())]


async def test_round_completes_when_max_nodes_joined(participants: Participants) -> None:
    """max_nodes joins complete a round at once, without waiting for the last call."""
    nodes = [participants(min_nodes=1, max_nodes=3, last_call_timeout=600) for _ in range(3)]
    memberships = await join_all(nodes)
    assert sorted(m.rank for m in memberships) == [0, 1, 2]
    assert {m.world_size for m in memberships} == {3}
    assert {m.round for m in memberships} == {1}


async def test_every_member_sees_the_same_members_in_the_same_order(
    participants: Participants,
) -> None:
    """All members of a round agree on it, and the members read back index their ranks."""
    nodes = [participants(min_nodes=4, max_nodes=4) for _ in range(4)]
    memberships = await join_all(nodes)
    members = await agreed_members(nodes[0], memberships)
    assert sorted(m.info for m in members) == [b"node-%d" % i for i in range(4)]


async def test_round_completes_with_min_nodes_after_the_last_call(
    participants: Participants,
) -> None:
    """With min_nodes but fewer than max_nodes, the round completes after last_call_timeout."""
    nodes = [participants(min_nodes=2, max_nodes=5, last_call_timeout=1.0) for _ in range(2)]
    started = time.monotonic()
    memberships = await join_all(nodes)
    assert time.monotonic() - started >= 1.0
    assert {m.world_size for m in memberships} == {2}


async def test_ranks_follow_the_order_of_arrival(
    participants: Participants, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """The node that joined first gets rank 0, the next rank 1, and so on."""
    nodes = [participants(min_nodes=3, max_nodes=3) for _ in range(3)]
    ranks: dict[int, int] = {}

    async def join(index: int) -> None:
        ranks[index] = (await nodes[index].join()).rank

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(join, index)

                async def arrived(count: int = index + 1) -> bool:
                    keys = await keys_under(raw_etcd, f"{etcd_key_prefix}/job/round/1/m/")
                    return len(keys) >= count

                await poll_until(arrived)
    assert ranks == {0: 0, 1: 1, 2: 2}


async def test_fewer_than_min_nodes_time_out_and_leave_no_key(
    participants: Participants, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Below min_nodes no round completes: join raises after join_timeout and removes its key."""
    node = participants(min_nodes=2, max_nodes=2, join_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousTimeoutError) as caught:
        await node.join()
    assert 1.5 <= time.monotonic() - started < 10
    assert (caught.value.run_id, caught.value.round) == ("job", 1)
    assert await keys_under(raw_etcd, f"{etcd_key_prefix}/job/round/1/m/") == []


async def test_a_node_beyond_max_nodes_waits_for_the_next_round(
    participants: Participants,
) -> None:
    """A surplus node is not in the completed round, and is counted as waiting."""
    nodes = [participants(min_nodes=2, max_nodes=2, last_call_timeout=600) for _ in range(3)]
    finished: list[rdzv.Membership] = []
    round_complete = anyio.Event()

    async def join(node: rdzv.AsyncRendezvous) -> None:
        finished.append(await node.join())
        if len(finished) == 2:
            round_complete.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for node in nodes:
                group.start_soon(join, node)
            await round_complete.wait()
            assert await nodes[0].num_nodes_waiting() == 1
            assert [m.world_size for m in finished] == [2, 2]
            group.cancel_scope.cancel()


async def test_a_late_node_does_not_change_a_completed_round(
    participants: Participants,
) -> None:
    """A node arriving after its round completed waits for the next one; the round stays."""
    first, second = (participants(min_nodes=1, max_nodes=3) for _ in range(2))
    members = await join_all([first, second])
    late = participants(min_nodes=1, max_nodes=3)
    with anyio.move_on_after(1.5):
        await late.join()
        pytest.fail("the late node completed a round while the previous one ran")
    assert await first.num_nodes_waiting() == 0  # it left when its join was cancelled
    assert {m.round for m in members} == {1}


async def test_a_round_waits_until_every_member_of_the_previous_one_left(
    participants: Participants,
) -> None:
    """Waiting nodes form no round of their own: the next round starts when the last left."""
    alone = participants(min_nodes=1, max_nodes=2, last_call_timeout=0.2)
    first = await alone.join(b"a")
    newcomer = participants(min_nodes=1, max_nodes=2, last_call_timeout=0.2)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            result: list[rdzv.Membership] = []

            async def join_late() -> None:
                result.append(await newcomer.join(b"b"))

            group.start_soon(join_late)
            await anyio.sleep(1.0)  # five last calls
            assert result == []
            assert await alone.num_nodes_waiting() == 1
            second = await alone.join(b"a")
    assert second.round == result[0].round == first.round + 1
    assert second.world_size == 2


async def test_joining_again_starts_a_later_round(participants: Participants) -> None:
    """Round numbers strictly increase as the members join again."""
    nodes = [participants(min_nodes=2, max_nodes=2) for _ in range(2)]
    rounds = [(await join_all(nodes))[0].round for _ in range(3)]
    assert rounds == [1, 2, 3]


async def test_the_keys_of_finished_rounds_are_removed(
    participants: Participants, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Once a round completes, nothing of the round before it is left in etcd."""
    nodes = [participants(min_nodes=2, max_nodes=2) for _ in range(2)]
    for _ in range(3):
        await join_all(nodes)
    rounds = {
        key.split(b"/round/")[1].split(b"/")[0]
        for key in await keys_under(raw_etcd, f"{etcd_key_prefix}/job/round/")
    }
    assert rounds == {b"3"}


async def test_a_dead_member_is_seen_by_the_others_through_its_lease(
    participants: Participants, raw_etcd: aetcd.Client
) -> None:
    """When a member's lease ends (its process died), the others' wait for departure returns."""
    nodes = [participants(min_nodes=3, max_nodes=3) for _ in range(3)]
    memberships = await join_all(nodes)
    with anyio.fail_after(10):
        await raw_etcd.revoke_lease(memberships[2].member_id)
        assert await nodes[0].wait_for_departure(memberships[0])
        assert await nodes[1].wait_for_departure(memberships[1])


async def test_a_dead_coordinator_is_seen_as_a_departure(
    participants: Participants, raw_etcd: aetcd.Client
) -> None:
    """The member that coordinated the round is watched too: its death is a departure."""
    nodes = [participants(min_nodes=2, max_nodes=2) for _ in range(2)]
    memberships = await join_all(nodes)
    with anyio.fail_after(10):
        rank_0 = next(m.member_id for m in memberships if m.rank == 0)  # it arrived first
        await raw_etcd.revoke_lease(rank_0)
        survivor = 1 if memberships[0].rank == 0 else 0
        assert await nodes[survivor].wait_for_departure(memberships[survivor])


async def test_a_member_joining_again_is_a_departure(participants: Participants) -> None:
    """A member that joins the next round has left this one."""
    nodes = [participants(min_nodes=1, max_nodes=2, last_call_timeout=600) for _ in range(2)]
    memberships = await join_all(nodes)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(nodes[0].join)
            assert await nodes[1].wait_for_departure(memberships[1])
            group.cancel_scope.cancel()


async def test_wait_for_departure_returns_false_after_its_timeout(
    participants: Participants,
) -> None:
    """With everybody still there, waiting for a departure ends at its timeout."""
    nodes = [participants(min_nodes=2, max_nodes=2) for _ in range(2)]
    memberships = await join_all(nodes)
    with anyio.fail_after(10):
        assert not await nodes[0].wait_for_departure(memberships[0], timeout=0.5)


async def test_a_dead_coordinator_is_replaced_while_the_round_gathers(
    participants: Participants, etcd_endpoints: str, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """If the coordinator dies before the round completes, a later participant takes over."""
    doomed_connection = await rdzv.connect(etcd_endpoints, read_timeout=2).__aenter__()
    first = participants(
        min_nodes=2, max_nodes=3, last_call_timeout=0.3, connection=doomed_connection
    )
    others = [participants(min_nodes=2, max_nodes=3, last_call_timeout=0.3) for _ in range(2)]

    async def die() -> None:
        with pytest.raises(rdzv.RendezvousError):
            await first.join()

    async def coordinating() -> bool:
        kvs = await raw_etcd.get_prefix(f"{etcd_key_prefix}/job/round/1/c/".encode())
        return bool(kvs)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(die)
            await poll_until(coordinating)
            assert first._keeper is not None
            dead = first._keeper.lease_id
            # The process dies: its connection is gone, and its lease ends 2 s later.
            await doomed_connection.aclose()
            memberships = await join_all(others)
    assert {m.world_size for m in memberships} == {2}
    assert dead not in {member.id for member in await agreed_members(others[0], memberships)}


async def test_close_ends_waiting_joins_and_refuses_new_ones(participants: Participants) -> None:
    """After close(), a waiting join and every later join raise RendezvousClosedError."""
    waiting, closer, later = (participants(min_nodes=3, max_nodes=3) for _ in range(3))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            errors: list[BaseException] = []

            async def join() -> None:
                with pytest.raises(rdzv.RendezvousClosedError) as caught:
                    await waiting.join()
                errors.append(caught.value)

            group.start_soon(join)
            await anyio.sleep(0.3)
            await closer.close()
        with pytest.raises(rdzv.RendezvousClosedError):
            await later.join()
    assert len(errors) == 1
    assert await later.is_closed()


async def test_a_join_whose_answer_was_lost_joins_once(
    participants: Participants,
    monkeypatch: pytest.MonkeyPatch,
    etcd_key_prefix: str,
    raw_etcd: aetcd.Client,
) -> None:
    """A join transaction whose answer was lost is resolved by reading, never sent blindly."""
    nodes = [participants(min_nodes=2, max_nodes=2) for _ in range(2)]
    monkeypatch.setattr(nodes[0].connection, "txn", LoseAnswers(nodes[0].connection, "before"))
    memberships = await join_all(nodes)
    assert sorted(m.rank for m in memberships) == [0, 1]
    assert len(await agreed_members(nodes[1], memberships)) == 2


async def test_a_foreign_value_at_latest_is_a_state_error(
    participants: Participants, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A value that is not a round number where rdzv keeps one raises RendezvousStateError."""
    await raw_etcd.put(f"{etcd_key_prefix}/job/latest".encode(), b"not a number")
    with anyio.fail_after(10), pytest.raises(rdzv.RendezvousStateError):
        await participants().join()


async def test_unreachable_etcd_is_a_connection_error_within_the_read_timeout() -> None:
    """With etcd unreachable, join raises RendezvousConnectionError within read_timeout."""
    connection = rdzv.connect(f"127.0.0.1:{closed_port()}", read_timeout=1)
    node = rdzv.AsyncRendezvous(connection, "job", min_nodes=1, max_nodes=1)
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(rdzv.RendezvousConnectionError):
        await node.join()
    assert time.monotonic() - started < 5
    await connection.aclose()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"min_nodes": 0}, "min_nodes"),
        ({"min_nodes": 1.5}, "min_nodes"),
        ({"max_nodes": 1, "min_nodes": 2}, "max_nodes"),
        ({"max_nodes": 10**6}, "max_nodes"),
        ({"last_call_timeout": 0}, "last_call_timeout"),
        ({"last_call_timeout": float("nan")}, "last_call_timeout"),
        ({"join_timeout": float("inf")}, "join_timeout"),
        ({"join_timeout": -1}, "join_timeout"),
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"lease_ttl": True}, "lease_ttl"),
        ({"run_id": "a/b"}, "run id"),
        ({"key_prefix": "relative"}, "key prefix"),
    ],
)
def test_bad_arguments_are_a_value_error_naming_them(
    arguments: dict[str, object], named: str
) -> None:
    """Each bad argument raises ValueError at construction, naming it."""
    connection = rdzv.connect("127.0.0.1")  # never opened: nothing is sent
    settings: dict[str, object] = {"run_id": "job", "min_nodes": 1, "max_nodes": 2, **arguments}
    run_id = settings.pop("run_id")
    with pytest.raises(ValueError, match=named):
        rdzv.AsyncRendezvous(connection, run_id, **settings)  # type: ignore[arg-type]


async def test_node_info_over_the_limit_is_a_value_error(participants: Participants) -> None:
    """Node info longer than max_node_info raises ValueError naming node_info, sending nothing."""
    node = participants(max_nodes=rdzv.MAX_NODES)
    assert node.max_node_info == 1024  # no value holds the membership: max_nodes does not cut it
    with pytest.raises(ValueError, match="node_info"):
        await node.join(b"x" * 1025)


async def test_a_waiter_takes_over_when_the_coordinator_dies(
    participants: Participants, etcd_endpoints: str, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A participant already waiting becomes coordinator when the coordinator's lease ends."""
    doomed_connection = await rdzv.connect(etcd_endpoints, read_timeout=2).__aenter__()
    doomed = participants(min_nodes=3, max_nodes=3, connection=doomed_connection)
    nodes = [participants(min_nodes=3, max_nodes=3) for _ in range(3)]
    coordinator_key = f"{etcd_key_prefix}/job/round/1/c/coordinator".encode()
    memberships: list[rdzv.Membership] = []

    async def join(node: rdzv.AsyncRendezvous) -> None:
        memberships.append(await node.join())

    async def coordinator() -> bytes | None:
        kv = await raw_etcd.get(coordinator_key)
        return None if kv is None else bytes(kv.value)

    async def die() -> None:
        with pytest.raises(rdzv.RendezvousError):
            await doomed.join()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(die)
            await poll_until(lambda: _is_not_none(coordinator()))
            first = await coordinator()
            assert first is not None
            group.start_soon(join, nodes[0])
            await poll_until(lambda: _count_at_least(raw_etcd, etcd_key_prefix, 2))
            # The process dies: its connection is gone, and its lease ends 2 s later.
            await doomed_connection.aclose()
            await poll_until(lambda: _holds_other_than(coordinator(), first))
            for node in nodes[1:]:
                group.start_soon(join, node)
    assert [m.world_size for m in memberships] == [3, 3, 3]
    assert first is not None
    members = await agreed_members(nodes[1], memberships)
    assert int(first, 16) not in {member.id for member in members}


async def test_a_join_that_times_out_frees_the_coordinator_key(
    participants: Participants, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A coordinator whose join timed out resigns: the next node coordinates without waiting."""
    with pytest.raises(rdzv.RendezvousTimeoutError):
        await participants(min_nodes=2, max_nodes=2, join_timeout=0.5).join()
    assert await raw_etcd.get(f"{etcd_key_prefix}/job/round/1/c/coordinator".encode()) is None
    with anyio.fail_after(10):
        membership = await participants(min_nodes=1, max_nodes=1).join()
    assert membership.round == 1


async def _is_not_none(value: Awaitable[object]) -> bool:
    return await value is not None


async def _holds_other_than(value: Awaitable[bytes | None], other: bytes) -> bool:
    held = await value
    return held is not None and held != other


async def _count_at_least(raw_etcd: aetcd.Client, key_prefix: str, number: int) -> bool:
    return len(await keys_under(raw_etcd, f"{key_prefix}/job/round/1/m/")) >= number


async def test_a_coordinator_on_a_connection_already_watching_its_round_completes_it(
    participants: Participants, connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A coordinator whose connection's mirror of the round lags behind its key completes it."""
    control = f"{etcd_key_prefix}/job/round/1/c/".encode()
    for _ in range(5):
        async with round_control(connection, control):
            node = participants(min_nodes=1, max_nodes=1, join_timeout=5)
            with anyio.fail_after(10):
                membership = await node.join()
            await node.leave()
        assert membership.world_size == 1
        control = f"{etcd_key_prefix}/job/round/{membership.round + 1}/c/".encode()


async def test_a_join_on_a_connection_of_its_own_costs_etcd_three_requests(
    etcd_key_prefix: str,
) -> None:
    """A node on its own connection joins with a LeaseGrant, one Txn and one Watch: no Range."""
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint) as first, rdzv.connect(server.endpoint) as own:
            coordinator, node = (
                rdzv.AsyncRendezvous(
                    each, "job", min_nodes=2, max_nodes=2, key_prefix=etcd_key_prefix
                )
                for each in (first, own)
            )
            with anyio.fail_after(20):
                async with anyio.create_task_group() as group:
                    group.start_soon(coordinator.join)
                    await poll_until(lambda: _has_keys(first, etcd_key_prefix, 1))
                    before = present(await etcd_requests(server.endpoint))
                    membership = await node.join()
                    after = present(await etcd_requests(server.endpoint))
            await coordinator.leave()
            await node.leave()
    sent = {method: after.get(method, 0) - before.get(method, 0) for method in after}
    assert membership.world_size == 2
    # The node's LeaseGrant, Txn and Watch; the coordinator's one Txn that completes the round.
    assert {method: count for method, count in sent.items() if count} == {
        "LeaseGrant": 1,
        "Txn": 2,
        "Watch": 1,
    }


async def _has_keys(connection: rdzv.Connection, prefix: str, count: int) -> bool:
    kvs, _ = await connection.range(f"{prefix}/job/round/1/m/".encode(), prefix=True)
    return len(kvs) >= count
