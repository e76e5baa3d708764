"""Faults under the scalable rendezvous: a member killed mid-join, a leader killed mid-round."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import anyio
import pytest

import rdzv
from rdzv._etcd import Get
from rdzv.testing import EtcdCluster
from support import agreed_members, poll_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOINER = textwrap.dedent(
    """
    import asyncio, sys
    import rdzv

    async def main():
        async with rdzv.connect(sys.argv[1]) as connection:
            node = rdzv.AsyncRendezvous(connection, "job", min_nodes=3, max_nodes=3,
                                        lease_ttl=2, key_prefix=sys.argv[2])
            await node.join(b"doomed")

    asyncio.run(main())
    """
)


async def count(connection: rdzv.Connection, prefix: str) -> int:
    """How many keys are under `prefix`."""
    result = await connection.txn([], [Get(prefix.encode(), prefix=True, count_only=True)])
    return result.counts[0]


async def test_a_member_killed_mid_join_is_gone_within_its_lease_and_replaced(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """kill -9 of a waiting joiner (the coordinator) frees its place within its lease TTL."""
    members = f"{etcd_key_prefix}/job/round/1/m/"
    doomed = await anyio.open_process(
        [sys.executable, "-c", JOINER, etcd_endpoints, etcd_key_prefix]
    )
    try:
        async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
            with anyio.fail_after(30):
                await poll_until(lambda: _at_least(connection, members, 1))
                doomed.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await poll_until(lambda: _at_most(connection, members, 0))
            assert time.monotonic() - killed_at < 2 + 3  # its lease, and etcd's granularity
            nodes = [
                rdzv.AsyncRendezvous(
                    connection,
                    "job",
                    min_nodes=2,
                    max_nodes=3,
                    last_call_timeout=0.2,
                    lease_ttl=2,
                    key_prefix=etcd_key_prefix,
                )
                for _ in range(2)
            ]
            memberships: list[rdzv.Membership] = []
            with anyio.fail_after(30):
                async with anyio.create_task_group() as group:
                    for node in nodes:
                        group.start_soon(_join_into, node, memberships)
            assert [m.world_size for m in memberships] == [2, 2]
            joined = await agreed_members(nodes[0], memberships)
            assert b"doomed" not in {member.info for member in joined}
            for node in nodes:
                await node.leave()
    finally:
        if doomed.returncode is None:
            doomed.kill()
        with anyio.fail_after(30):
            await doomed.wait()


async def _join_into(node: rdzv.AsyncRendezvous, memberships: list[rdzv.Membership]) -> None:
    memberships.append(await node.join())


async def _at_least(connection: rdzv.Connection, prefix: str, number: int) -> bool:
    return await count(connection, prefix) >= number


async def _at_most(connection: rdzv.Connection, prefix: str, number: int) -> bool:
    return await count(connection, prefix) <= number


async def test_killing_the_leader_while_200_nodes_join_loses_and_duplicates_no_member(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str
) -> None:
    """A leader change during a 200-node round: every node gets one rank, nobody twice."""
    leader = await anyio.to_thread.run_sync(etcd_cluster.leader)
    others = [member for member in etcd_cluster.members if member is not leader]
    endpoints = ",".join(member.endpoint for member in [leader, *others])
    nodes_count = 200
    async with rdzv.connect(endpoints, read_timeout=10) as connection:
        nodes = [
            rdzv.AsyncRendezvous(
                connection,
                "job",
                min_nodes=nodes_count,
                max_nodes=nodes_count,
                lease_ttl=10,
                key_prefix=etcd_key_prefix,
            )
            for _ in range(nodes_count)
        ]
        memberships: list[rdzv.Membership] = []
        with anyio.fail_after(90):
            async with anyio.create_task_group() as group:
                for node in nodes:
                    group.start_soon(_join_into, node, memberships)
                await poll_until(
                    lambda: _at_least(connection, f"{etcd_key_prefix}/job/round/1/m/", 50)
                )
                await anyio.to_thread.run_sync(leader.kill)
        assert len(memberships) == nodes_count
        assert sorted(m.rank for m in memberships) == list(range(nodes_count))
        members = await agreed_members(nodes[0], memberships)
        assert {member.id for member in members} == {m.member_id for m in memberships}
        assert len(members) == nodes_count
        with anyio.fail_after(60):
            for node in nodes:
                await node.leave()
    assert await anyio.to_thread.run_sync(etcd_cluster.leader) is not leader
