"""Writes whose answers are lost in a real network (a FaultProxy) are applied and reported once.

The connection lists the proxy first and the etcd itself second: a write sent through the
proxy loses its answer (or its request), and the connection fails over to the direct endpoint
to resolve what happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import rdzv
from rdzv.testing import FaultProxy
from support import LoseAnswers, etcd_metric, present

pytestmark = pytest.mark.anyio

# With two endpoints an attempt gets a third of this: a lost answer is noticed after ~1.3 s.
READ_TIMEOUT = 4
_LEASES_GRANTED = "etcd_debugging_lease_granted_total"


@pytest.fixture
async def through_proxy(proxy: FaultProxy, etcd_endpoints: str) -> AsyncIterator[rdzv.Connection]:
    """A connection that uses the proxy first, and etcd directly after a failover."""
    async with rdzv.connect(
        f"{proxy.endpoint},{etcd_endpoints}", read_timeout=READ_TIMEOUT
    ) as conn:
        yield conn


@pytest.fixture
def our_store(through_proxy: rdzv.Connection, store_prefix: str) -> rdzv.AsyncEtcdStore:
    """The `store` fixture's store, on the connection through the proxy.

    `store` itself is on a direct connection: another writer, and a witness of etcd's state.
    """
    return rdzv.AsyncEtcdStore(through_proxy, prefix=store_prefix)


@pytest.mark.slow
async def test_set_state_whose_answer_is_lost_is_reported_written(
    through_proxy: rdzv.Connection,
    connection: rdzv.Connection,
    proxy: FaultProxy,
    etcd_key_prefix: str,
) -> None:
    """A write that etcd applied but whose answer never came back is reported written, once."""
    backend = rdzv.AsyncEtcdBackend(through_proxy, "job", key_prefix=etcd_key_prefix)
    _, token, _ = present(await backend.set_state(b"round 1"))
    proxy.hold("responses")
    state, new_token, written = present(await backend.set_state(b"round 2", token))
    assert (state, written) == (b"round 2", True)
    direct = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
    assert await direct.get_state() == (b"round 2", new_token)


async def test_set_state_whose_request_lands_late_is_reported_written(
    backend: rdzv.AsyncEtcdBackend, connection: rdzv.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that lands late, after its re-send was decided, is reported written, not lost."""
    _, token, _ = present(await backend.set_state(b"round 1"))
    # The first request is lost and lands just before the re-send, which then fails against it.
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "late"))
    state, new_token, written = present(await backend.set_state(b"round 2", token))
    monkeypatch.undo()
    assert (state, written) == (b"round 2", True)
    assert await backend.get_state() == (b"round 2", new_token)
    assert new_token > token


@pytest.mark.slow
async def test_store_add_whose_request_is_lost_after_others_added(
    our_store: rdzv.AsyncEtcdStore,
    store: rdzv.AsyncEtcdStore,
    proxy: FaultProxy,
) -> None:
    """An add lost in the network is not taken for this store's earlier add of the same bytes."""
    ours, theirs = our_store, store
    assert await ours.add("counter", 1) == 1
    assert await theirs.add("counter", 1) == 2
    proxy.drop("requests")
    assert await ours.add("counter", 1) == 3
    assert await theirs.get("counter", timeout=5) == b"3"


@pytest.mark.slow
async def test_store_add_whose_answer_is_lost_is_applied_once(
    our_store: rdzv.AsyncEtcdStore,
    store: rdzv.AsyncEtcdStore,
    proxy: FaultProxy,
) -> None:
    """An add that etcd applied but whose answer never came back is applied exactly once."""
    ours, theirs = our_store, store
    assert await ours.add("counter", 5) == 5
    assert await theirs.add("counter", 5) == 10
    proxy.hold("responses")
    assert await ours.add("counter", 5) == 15
    assert await theirs.get("counter", timeout=5) == b"15"


@pytest.mark.slow
async def test_lease_grant_whose_answer_is_lost_grants_one_lease(
    through_proxy: rdzv.Connection, proxy: FaultProxy, etcd_endpoints: str
) -> None:
    """A grant whose answer is lost returns the lease that landed; etcd grants no second one."""
    await through_proxy.status()
    granted_before = await etcd_metric(etcd_endpoints, _LEASES_GRANTED)
    proxy.hold("responses")
    lease_id = await through_proxy.grant_lease(60)
    assert proxy.held("responses") > 0  # the first grant's answer was lost
    assert await etcd_metric(etcd_endpoints, _LEASES_GRANTED) == granted_before + 1
    assert await through_proxy.lease_time_to_live(lease_id) > 0
    await through_proxy.revoke_lease(lease_id)


@pytest.mark.slow
async def test_call_queued_on_a_replaced_channel_is_sent_on_the_new_one(
    proxy: FaultProxy, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A write that waited while another call failed over succeeds on the next endpoint."""
    endpoints = f"{proxy.endpoint},{etcd_endpoints}"
    # One request in flight at a time: the write waits behind a read that gets no answer.
    async with rdzv.connect(endpoints, read_timeout=READ_TIMEOUT, max_in_flight=1) as conn:
        backend = rdzv.AsyncEtcdBackend(conn, "job", key_prefix=etcd_key_prefix)
        await backend.get_state()
        proxy.hold("responses")
        results: dict[str, object] = {}

        async def read() -> None:
            results["read"] = await backend.get_state()

        async def write() -> None:
            results["write"] = await backend.set_state(b"state")

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await proxy.wait_for_async(lambda: proxy.held("responses") > 0)
            group.start_soon(write)
    written = results["write"]
    assert isinstance(written, tuple)
    assert (written[0], written[2]) == (b"state", True)
    assert results["read"] in (None, (b"state", written[1]))


async def test_compare_set_lost_then_overwritten_reports_the_swap(
    our_store: rdzv.AsyncEtcdStore,
    store: rdzv.AsyncEtcdStore,
    proxy: FaultProxy,
    connection: rdzv.Connection,
) -> None:
    """A swap that landed, lost its answer and was overwritten before the retry still counts."""
    ours, theirs = our_store, store
    await ours.set("key", b"old")
    key = f"{ours.prefix}key".encode()
    before = present(await connection.get(key))
    changes = connection.watch(key, start_revision=before.mod_revision + 1)
    proxy.hold("responses")
    async with anyio.create_task_group() as group:
        results: list[bytes] = []

        async def swap() -> None:
            results.append(await ours.compare_set("key", b"old", b"new"))

        group.start_soon(swap)
        # The swap reaches etcd and lands; its answer is held. Someone else writes next; then
        # the connection breaks, and the answer is lost.
        with anyio.fail_after(READ_TIMEOUT):
            landed = await changes.__anext__()
        await changes.aclose()
        assert landed.kv.value == b"new"
        await theirs.set("key", b"theirs")
        proxy.cut()
    assert results == [b"new"]
    assert await theirs.get("key", timeout=1) == b"theirs"
