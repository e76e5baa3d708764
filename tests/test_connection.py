"""Connecting: unreachable servers fail within the read timeout; several endpoints fail over."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

import rdzv
from rdzv._etcd import Get, keep_alive
from rdzv.testing import EtcdCluster, EtcdServer, FaultProxy
from support import closed_port, present

pytestmark = pytest.mark.anyio


@pytest.mark.slow
async def test_unreachable_endpoint_fails_within_read_timeout() -> None:
    """Opening a connection to a dead endpoint raises RendezvousConnectionError in time."""
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError) as caught:
        async with rdzv.connect(f"127.0.0.1:{closed_port()}", read_timeout=1.5):
            pass
    assert time.monotonic() - started < 1.5 + 1.0
    assert str(caught.value).startswith("The connection to etcd has failed: no answer within")
    assert caught.value.__cause__ is not None


@pytest.mark.slow
async def test_connection_error_names_endpoints_time_waited_and_last_status() -> None:
    """The error says which endpoints were tried, for how long, and etcd's last gRPC status."""
    endpoints = (f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}")
    with pytest.raises(rdzv.RendezvousConnectionError) as caught:
        async with rdzv.connect(",".join(endpoints), read_timeout=1.5):
            pass
    error = caught.value
    assert error.endpoints == endpoints
    assert error.waited is not None
    assert 1.0 <= error.waited < 2.5
    assert error.code == "UNAVAILABLE"
    assert error.endpoint in endpoints
    assert error.details
    message = str(error)
    assert all(endpoint in message for endpoint in endpoints)
    assert f"within {error.waited:.1f} s" in message
    assert f"was UNAVAILABLE: {error.details}" in message
    assert isinstance(error.__cause__, Exception)


@pytest.mark.slow
async def test_backend_call_on_unreachable_endpoint_fails_within_read_timeout(
    etcd_key_prefix: str,
) -> None:
    """get_state against a dead endpoint raises RendezvousConnectionError instead of hanging."""
    connection = rdzv.connect(f"127.0.0.1:{closed_port()}", read_timeout=1)
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
    started = time.monotonic()
    try:
        with pytest.raises(rdzv.RendezvousConnectionError):
            await backend.get_state()
        with pytest.raises(rdzv.RendezvousConnectionError):
            await backend.set_state(b"x")
    finally:
        await connection.aclose()
    assert time.monotonic() - started < 2 * 1 + 2.0


async def test_dead_first_endpoint_fails_over_to_the_next(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With a dead endpoint listed first, calls succeed on the live one."""
    endpoints = f"127.0.0.1:{closed_port()},{etcd_endpoints}"
    async with rdzv.connect(endpoints, read_timeout=10) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        _, token, written = present(await backend.set_state(b"state"))
        assert written
        assert await backend.get_state() == (b"state", token)


async def test_closed_connection_refuses_calls(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """After aclose, calls raise RendezvousError instead of reopening silently."""
    async with rdzv.connect(etcd_endpoints) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        await backend.get_state()


async def test_one_connection_serves_many_backends(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Backends for many run ids share one connection."""
    backends = [
        rdzv.AsyncEtcdBackend(connection, f"run-{i}", key_prefix=etcd_key_prefix) for i in range(5)
    ]
    for i, backend in enumerate(backends):
        await backend.set_state(str(i).encode())
    assert [present(await b.get_state())[0] for b in backends] == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.slow
async def test_call_made_while_the_server_restarts_succeeds_once_it_is_back(
    etcd_key_prefix: str,
) -> None:
    """A server that is down for a moment is retried within the read timeout, not reported."""
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint, read_timeout=20) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
            _, token, _ = present(await backend.set_state(b"before"))
            await anyio.to_thread.run_sync(server.kill)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_restart_after, server, 1.0)
                assert await backend.get_state() == (b"before", token)
                assert present(await backend.set_state(b"after", token))[2]


async def _restart_after(server: EtcdServer, seconds: float) -> None:
    await anyio.sleep(seconds)
    await anyio.to_thread.run_sync(server.restart)


@pytest.mark.slow
async def test_writes_continue_after_the_leader_of_a_cluster_dies(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str
) -> None:
    """Killing the leader of a 3-member cluster only delays compare-and-swap writes."""
    async with rdzv.connect(etcd_cluster.endpoints, read_timeout=15) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        _, token, _ = present(await backend.set_state(b"0"))
        leader = await anyio.to_thread.run_sync(etcd_cluster.leader)
        await anyio.to_thread.run_sync(leader.kill)
        for value in range(1, 6):
            result = await backend.set_state(str(value).encode(), token)
            assert result is not None
            assert result[2]
            token = result[1]
        assert await backend.get_state() == (b"5", token)


def test_a_close_cut_short_by_a_cancellation_leaves_no_grpc_work_for_later_loops(
    etcd_endpoints: str,
) -> None:
    """A close that a cancel scope interrupts mid-watch still finishes: later loops stay clean.

    gRPC completes cancelled operations through one process-wide queue; those of a loop that
    closed first used to fail the next loop with "Event loop is closed".
    """

    async def cancelled_while_watching() -> None:
        with anyio.move_on_after(0.3):
            async with rdzv.connect(etcd_endpoints) as connection:
                keep_alive(connection, await connection.grant_lease(5), 5)
                async for _ in connection.watch(b"/rdzv-test/never-written", start_revision=1):
                    pass

    async def errors_of_a_later_loop() -> list[dict[str, object]]:
        errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        async with rdzv.connect(etcd_endpoints) as connection:
            for _ in range(10):
                await connection.get(b"/rdzv-test/never-written")
                await asyncio.sleep(0.05)
        return errors

    errors = []
    for _ in range(5):
        anyio.run(cancelled_while_watching, backend="asyncio")
        errors += anyio.run(errors_of_a_later_loop, backend="asyncio")
    assert errors == []


async def test_a_transaction_that_only_reads_is_retried_when_its_answer_is_lost(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A read-only transaction whose answer the network loses fails over, never 'unknown'."""
    key = f"{etcd_key_prefix}/k".encode()
    with FaultProxy(etcd_endpoints) as proxy:
        async with rdzv.connect(f"{proxy.endpoint},{etcd_endpoints}", read_timeout=4) as conn:
            await conn.put(key, b"v")
            proxy.hold("responses")
            result = await conn.txn([], [Get(key), Get(key, prefix=True, count_only=True)])
    assert result.ranges[0][0].value == b"v"
    assert result.counts[1] == 1
