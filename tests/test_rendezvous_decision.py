"""A round's decision: a few bytes whatever the round's size, from which each node gets its rank.

The coordinator numbers every join by arrival (the round's counter key, put in the join's
transaction) and writes `done` as the round's size plus the arrival numbers that are not
members; nobody receives the membership, which `read_members` reads on demand.
"""

from __future__ import annotations

import asyncio

import aetcd
import anyio
import pytest

import rdzv
from conftest import Participants
from rdzv._rendezvous._layout import Decision, decode_decision, encode_decision
from rdzv.testing import EtcdServer
from support import LoseAnswers, agreed_members, etcd_metric, poll_until, present

pytestmark = pytest.mark.anyio


def _decision(**fields: object) -> Decision:
    base: dict[str, object] = {
        "number": 3,
        "size": 4,
        "view_revision": 120,
        "first_revision": 100,
        "coordinator": 0xABC,
        "coordinator_is_member": True,
        "gaps": (2, 5),
    }
    return Decision(**{**base, **fields})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the value


def test_a_decision_reads_back_as_written() -> None:
    """encode_decision and decode_decision round-trip both kinds of decision."""
    for decision in (_decision(), _decision(gaps=None, ids=(7, 3, 9, 1))):
        assert decode_decision(encode_decision(decision), key=b"done") == decision


def test_ranks_skip_the_arrivals_that_are_not_members() -> None:
    """Arrivals 1..7 without 2 and 5 are ranks 0..3; a gap, or one past the size, is no member."""
    decision = _decision()
    ranks = {arrival: decision.rank(0, arrival) for arrival in range(1, 9)}
    assert ranks == {1: 0, 2: None, 3: 1, 4: 2, 5: None, 6: 3, 7: None, 8: None}


def test_a_decision_listing_ids_ranks_by_id() -> None:
    """A decision of ids gives each listed id its place, and no rank to others."""
    decision = _decision(gaps=None, ids=(7, 3, 9, 1))
    assert [decision.rank(member_id, None) for member_id in (7, 3, 9, 1, 8)] == [0, 1, 2, 3, None]


def test_a_rank_by_arrival_needs_the_arrival() -> None:
    """Without its arrival number a node cannot tell its rank from a decision of gaps."""
    with pytest.raises(LookupError):
        _decision().rank(0xABC, None)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"rdzv-round\x01" + bytes(30),
        encode_decision(_decision())[:-3],
        encode_decision(_decision()) + b"x",
        encode_decision(_decision(gaps=(5, 2))),
        encode_decision(_decision(gaps=None, ids=(1, 2))),
    ],
)
def test_a_foreign_decision_is_a_state_error(value: bytes) -> None:
    """Anything encode_decision did not write raises RendezvousStateError naming the key."""
    with pytest.raises(rdzv.RendezvousStateError, match="done"):
        decode_decision(value, key=b"done")


# ------------------------------------------------------------------------------ in etcd


async def _done(raw_etcd: aetcd.Client, prefix: str, number: int) -> bytes:
    kv = await raw_etcd.get(f"{prefix}/job/round/{number}/c/done".encode())
    value: bytes = present(kv).value
    return value


async def test_the_decision_of_a_large_round_is_as_small_as_of_a_small_one(
    participants: Participants, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """`done` takes as many bytes for 40 members as for 2: nobody is sent the membership."""
    sizes = []
    for number, count in ((1, 2), (2, 40)):
        nodes = [participants(min_nodes=count, max_nodes=count, run_id="job") for _ in range(count)]
        with anyio.fail_after(30):
            got = await asyncio.gather(*(node.join(b"x" * 64) for node in nodes))
        assert {m.round for m in got} == {number}
        await agreed_members(nodes[0], list(got))
        sizes.append(len(await _done(raw_etcd, etcd_key_prefix, number)))
        for node in nodes:
            await node.leave()
    assert sizes[0] == sizes[1] < 100


async def test_a_join_withdrawn_before_completion_is_a_gap(participants: Participants) -> None:
    """A node that withdrew leaves a gap in the arrivals, and the ranks stay 0..W-1."""
    first, quitter, *others = (participants(min_nodes=3, max_nodes=3) for _ in range(4))
    with anyio.fail_after(20):
        joining = [asyncio.ensure_future(first.join(b"first"))]
        await poll_until(lambda: _waiting(first, 1))
        quitting = asyncio.ensure_future(quitter.join(b"quitter"))
        await poll_until(lambda: _waiting(first, 2))
        quitting.cancel()
        await asyncio.wait([quitting])
        for node in others:
            joining.append(asyncio.ensure_future(node.join(b"other")))
        got = list(await asyncio.gather(*joining))
    assert got[0]._decision.gaps == (2,)
    members = await agreed_members(first, got)
    assert [member.info for member in members] == [b"first", b"other", b"other"]


async def test_a_join_that_landed_twice_keeps_its_first_arrival(
    participants: Participants,
    etcd_endpoints: str,
    monkeypatch: pytest.MonkeyPatch,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
) -> None:
    """A join whose answer was lost and that landed again ranks by its first copy, no gap."""
    async with rdzv.connect(etcd_endpoints) as own:
        twice = participants(min_nodes=2, max_nodes=2, connection=own)
        monkeypatch.setattr(own, "txn", LoseAnswers(own, "before"))
        later = participants(min_nodes=2, max_nodes=2)
        with anyio.fail_after(20):
            joining = asyncio.ensure_future(twice.join(b"twice"))
            members = f"{etcd_key_prefix}/job/round/1/m/".encode()
            await poll_until(lambda: _put_twice(raw_etcd, members))  # sent again, landed again
            got = [await later.join(b"later"), await joining]
    assert (got[1].rank, got[0].rank) == (0, 1)
    assert got[0]._decision.gaps == ()  # the second copy counted no arrival
    await agreed_members(later, got)


async def test_a_key_no_join_counted_makes_the_coordinator_list_ids(
    participants: Participants, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """A participant-like key written without the counter: the decision lists the member ids."""
    first, second = (participants(min_nodes=3, max_nodes=3) for _ in range(2))
    lease = await raw_etcd.lease(10)
    foreign = f"{etcd_key_prefix}/job/round/1/m/{lease.id:016x}".encode()
    with anyio.fail_after(20):
        joining = asyncio.ensure_future(first.join(b"first"))
        await poll_until(lambda: _waiting(second, 1))
        await raw_etcd.put(foreign, b"foreign", lease=lease)
        got = [await second.join(b"second"), await joining]
    decision = got[0]._decision
    assert decision.gaps is None
    assert lease.id in present(decision.ids)
    members = await agreed_members(first, got)
    assert [member.info for member in members] == [b"first", b"foreign", b"second"]
    await lease.revoke()


async def test_members_of_a_compacted_round_cannot_be_read(etcd_key_prefix: str) -> None:
    """read_members raises RendezvousCompactedError once etcd compacted the round's revision."""
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint) as connection:
            node = rdzv.AsyncRendezvous(
                connection, "job", min_nodes=1, max_nodes=1, key_prefix=etcd_key_prefix
            )
            with anyio.fail_after(20):
                membership = await node.join(b"me")
                assert [m.info for m in await node.read_members(membership)] == [b"me"]
                await connection.put(f"{etcd_key_prefix}/other".encode(), b"moves on")
                host, port = server.endpoint.rsplit(":", 1)
                async with aetcd.Client(host, int(port)) as raw:
                    await raw.compact(connection.revision)
                with pytest.raises(rdzv.RendezvousCompactedError):
                    await node.read_members(membership)
            await node.leave()


async def test_etcd_sends_a_node_alone_as_many_bytes_in_a_large_round_as_in_a_small_one(
    etcd_key_prefix: str,
) -> None:
    """Bytes from etcd per join, each node on its own connection: 32 nodes cost what 4 do."""
    per_join = []
    with EtcdServer() as server:
        for count in (4, 32):
            connections = [rdzv.connect(server.endpoint) for _ in range(count)]
            for connection in connections:
                await connection.open()
            nodes = [
                rdzv.AsyncRendezvous(
                    connection,
                    f"job-{count}",
                    min_nodes=count,
                    max_nodes=count,
                    key_prefix=etcd_key_prefix,
                )
                for connection in connections
            ]
            before = await etcd_metric(server.endpoint, _SENT)
            with anyio.fail_after(60):
                got = await asyncio.gather(*(node.join(b"x" * 64) for node in nodes))
            per_join.append((await etcd_metric(server.endpoint, _SENT) - before) / count)
            assert sorted(m.rank for m in got) == list(range(count))
            for node, connection in zip(nodes, connections, strict=True):
                await node.leave()
                await connection.aclose()
    # Before, each node was sent the membership: 8 times the members, 8 times the bytes.
    assert per_join[1] < 1.5 * per_join[0], per_join


_SENT = "etcd_network_client_grpc_sent_bytes_total"


async def _put_twice(raw_etcd: aetcd.Client, prefix: bytes) -> bool:
    return any(kv.version >= 2 for kv in await raw_etcd.get_prefix(prefix))


async def _waiting(node: rdzv.AsyncRendezvous, count: int) -> bool:
    return await node.num_nodes_waiting() >= count
