"""Lease keep-alives: every lease of a connection refreshed on one shared stream, against etcd."""

from __future__ import annotations

import asyncio
import time

import aetcd
import anyio
import pytest

import rdzv
from rdzv._etcd import LeaseKeeper, keep_alive, refresh_lease, resume, suspend
from rdzv.testing import FaultProxy
from support import remaining_until

pytestmark = pytest.mark.anyio

# Short leases keep the tests fast; etcd's test servers grant TTLs from 1 s.
TTL = 2
# Slack on time bounds, for slow or busy machines.
SLACK = 1.5
# How long a test waits for something that should happen at once.
WAIT = 5.0
# The names of the keep-alive stream's two tasks.
TASK_NAMES = {"rdzv-lease-keepalive-sender", "rdzv-lease-keepalive-reader"}


def _keepalive_tasks() -> set[asyncio.Task[object]]:
    """The keep-alive tasks that run on this loop now."""
    return {task for task in asyncio.all_tasks() if task.get_name() in TASK_NAMES}


async def _until_answered(keeper: LeaseKeeper) -> None:
    """Wait until etcd has answered a keep-alive for `keeper`'s lease (its bound moved on)."""
    granted = keeper.alive_until
    with anyio.fail_after(WAIT):
        while True:
            if keeper.alive_until > granted:
                return
            await anyio.sleep(0.01)


async def _alive(connection: rdzv.Connection, lease_id: int) -> bool:
    """Whether etcd still has the lease."""
    return await connection.lease_time_to_live(lease_id) > 0


async def test_kept_lease_outlives_its_ttl(connection: rdzv.Connection) -> None:
    """A kept lease is still there, and not reported expired, well after its TTL."""
    lease_id = await connection.grant_lease(TTL)
    keeper = keep_alive(connection, lease_id, TTL)
    await anyio.sleep(TTL * 1.5)
    assert await _alive(connection, lease_id)
    assert not keeper.expired
    keeper.release()


@pytest.mark.slow
async def test_released_lease_expires(connection: rdzv.Connection) -> None:
    """After release(), etcd lets the lease expire about ttl seconds after its last refresh."""
    lease_id = await connection.grant_lease(TTL)
    keeper = keep_alive(connection, lease_id, TTL)
    await _until_answered(keeper)
    keeper.release()
    keeper.release()  # harmless twice
    released_at = time.monotonic()
    with anyio.fail_after(TTL + SLACK):
        await keeper.wait_expired()
    await remaining_until(connection, lease_id, lambda remaining: remaining == -1)
    assert time.monotonic() - released_at >= TTL - 1


async def test_lease_revoked_elsewhere_is_reported_expired_within_ttl(
    connection: rdzv.Connection, raw_etcd: aetcd.Client
) -> None:
    """A kept lease that another client revokes makes wait_expired() return within about ttl."""
    lease_id = await connection.grant_lease(TTL)
    keeper = keep_alive(connection, lease_id, TTL)
    await _until_answered(keeper)
    await raw_etcd.revoke_lease(lease_id)
    started = time.monotonic()
    with anyio.fail_after(TTL + SLACK):
        await keeper.wait_expired()
    assert keeper.expired
    # etcd's answer (TTL 0) to the next refresh says so, before the lease would have run out.
    assert time.monotonic() - started < TTL


async def test_revoke_lease_deletes_it_and_expires_its_keepers(
    connection: rdzv.Connection,
) -> None:
    """revoke_lease removes the lease at once, marks its keeper expired, and is harmless twice."""
    lease_id = await connection.grant_lease(60)
    keeper = keep_alive(connection, lease_id, 60)
    await connection.revoke_lease(lease_id)
    assert keeper.expired
    assert await connection.lease_time_to_live(lease_id) == -1
    await connection.revoke_lease(lease_id)


async def test_refresh_lease_restores_the_full_ttl(connection: rdzv.Connection) -> None:
    """One refresh_lease brings a lease's remaining time back to its full ttl, never beyond."""
    ttl = 3
    lease_id = await connection.grant_lease(ttl)
    await remaining_until(connection, lease_id, lambda remaining: remaining <= ttl - 2)
    await refresh_lease(connection, lease_id)
    # etcd reports whole seconds, rounded down: a full ttl reads as ttl - 1 a moment later.
    remaining = await remaining_until(connection, lease_id, lambda remaining: remaining >= ttl - 1)
    assert remaining <= ttl


@pytest.mark.slow
async def test_thousands_of_leases_stay_alive_on_one_stream(
    connection: rdzv.Connection,
) -> None:
    """2,000 leases kept on one connection all outlive their TTL, with two tasks for them all."""
    count = 2000
    # Longer than TTL: 2,000 leases at 2 s are 3,000 keep-alives a second, more than a loaded
    # 2-core machine running CI reliably sends in time.
    ttl = 6
    lease_ids: list[int] = []
    keepers: list[LeaseKeeper] = []
    tasks_before = asyncio.all_tasks()
    for start in range(0, count, 500):
        granted = await asyncio.gather(
            *(connection.grant_lease(ttl) for _ in range(start, min(start + 500, count)))
        )
        # Kept at once: granting 2,000 can take seconds on a loaded machine.
        keepers += [keep_alive(connection, lease_id, ttl) for lease_id in granted]
        lease_ids += granted
    # Not a task per lease: the sender, the reader, and gRPC's own task for the stream.
    assert len(asyncio.all_tasks() - tasks_before) <= 3
    await anyio.sleep(ttl * 1.5)
    remaining = await asyncio.gather(*(connection.lease_time_to_live(i) for i in lease_ids))
    assert min(remaining) > 0
    assert not any(keeper.expired for keeper in keepers)
    assert len(_keepalive_tasks()) == 2
    for lease_id in lease_ids:
        await connection.revoke_lease(lease_id)


@pytest.mark.slow
async def test_stream_comes_back_after_its_connection_is_cut(
    proxy: FaultProxy, proxied: rdzv.Connection, connection: rdzv.Connection
) -> None:
    """When the TCP connection under the stream is cut, twice, the lease is still kept."""
    lease_id = await proxied.grant_lease(TTL)
    keeper = keep_alive(proxied, lease_id, TTL)
    await _until_answered(keeper)
    for _ in range(2):
        proxy.cut()
        await anyio.sleep(TTL / 2)
    await anyio.sleep(TTL)
    assert await _alive(connection, lease_id)
    assert not keeper.expired
    assert proxy.connections_accepted >= 2
    keeper.release()


@pytest.mark.slow
async def test_kept_leases_are_refreshed_again_after_suspend_and_resume(
    connection: rdzv.Connection,
) -> None:
    """suspend() ends the stream's tasks; after resume() the lease is kept past its TTL."""
    lease_id = await connection.grant_lease(TTL)
    keeper = keep_alive(connection, lease_id, TTL)
    await _until_answered(keeper)
    await suspend(connection)
    assert not _keepalive_tasks()
    resume(connection)
    await anyio.sleep(TTL * 1.5)
    assert await _alive(connection, lease_id)
    assert not keeper.expired
    keeper.release()


async def test_closing_with_keepers_held_ends_the_stream(etcd_endpoints: str) -> None:
    """aclose() with leases kept ends both tasks; keeping or refreshing afterwards is refused."""
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
        lease_ids = [await connection.grant_lease(TTL) for _ in range(10)]
        keepers = [keep_alive(connection, lease_id, TTL) for lease_id in lease_ids]
        await _until_answered(keepers[-1])
        assert len(_keepalive_tasks()) == 2
    assert not _keepalive_tasks()
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        keep_alive(connection, lease_ids[0], TTL)
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        await refresh_lease(connection, lease_ids[0])


def test_closing_with_keepers_leaves_nothing_for_the_next_loop(etcd_endpoints: str) -> None:
    """Closing a connection whose stream is busy leaves no gRPC operation to a later loop."""

    async def keep_then_close() -> None:
        async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
            lease_ids = [await connection.grant_lease(TTL) for _ in range(20)]
            keepers = [keep_alive(connection, lease_id, TTL) for lease_id in lease_ids]
            for lease_id in lease_ids:
                await refresh_lease(connection, lease_id)
            await _until_answered(keepers[-1])

    for _ in range(5):
        asyncio.run(keep_then_close())

    async def still_works() -> int:
        async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
            return await connection.grant_lease(TTL)

    assert asyncio.run(still_works()) > 0


async def test_bad_lease_ids_and_ttls_are_refused(connection: rdzv.Connection) -> None:
    """keep_alive needs a positive int lease id and ttl, and says which one is wrong."""
    with pytest.raises(ValueError, match="lease id"):
        keep_alive(connection, 0, TTL)
    with pytest.raises(ValueError, match="TTL"):
        keep_alive(connection, 1, 0)
    with pytest.raises(ValueError, match="TTL"):
        keep_alive(connection, 1, True)
