"""A cancellation that lands while rdzv waits for etcd stays the caller's own.

gRPC ends a cancelled call with a CancelledError of its own, which anyio's cancel scopes do not
recognise; these tests hold etcd's answers (a FaultProxy) so that the cancellation lands during a
gRPC call, and check that timeouts and cancel scopes work as they document. The sync facade never
reports a cancellation that nothing asked for as a close.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import api as torch_api

import rdzv
from rdzv._etcd import ConnectionOptions, keep_alive
from rdzv._portal import Portal
from rdzv._torch_rounds import create_rounds_handler
from rdzv.testing import FaultProxy

pytestmark = pytest.mark.anyio

# Generous bounds: these tests check that nothing hangs, not how fast it ends.
SLACK = 15.0


async def test_a_join_on_a_silent_etcd_times_out_with_rdzvs_error(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """join() on an etcd that never answers raises RendezvousTimeoutError after join_timeout."""
    async with rdzv.connect(proxy.endpoint, read_timeout=5) as connection:
        participant = rdzv.AsyncRendezvous(
            connection, "job", min_nodes=1, max_nodes=1, join_timeout=1, key_prefix=etcd_key_prefix
        )
        proxy.hold()
        started = time.monotonic()
        with anyio.fail_after(SLACK), pytest.raises(rdzv.RendezvousTimeoutError):
            await participant.join()
        assert time.monotonic() - started >= 1
        proxy.restore()
        await participant.leave()


async def test_move_on_after_swallows_its_timeout_during_a_store_write(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """anyio.move_on_after around store.set on a silent etcd ends the block and goes on."""
    async with rdzv.connect(proxy.endpoint, read_timeout=30) as connection:
        store = rdzv.AsyncEtcdStore(connection, prefix=f"{etcd_key_prefix}/store/")
        proxy.hold()
        went_on = False
        with anyio.fail_after(SLACK):
            with anyio.move_on_after(1) as scope:
                await store.set("key", b"value")
            went_on = True
        assert went_on
        assert scope.cancelled_caught
        proxy.restore()


async def test_the_lease_keep_alive_outlives_a_silent_etcd(proxy: FaultProxy) -> None:
    """A keep-alive stream that timed out opening on a silent etcd opens once etcd answers."""
    async with rdzv.connect(proxy.endpoint, read_timeout=2) as connection:
        lease_id = await connection.grant_lease(6)
        proxy.hold()
        keeper = keep_alive(connection, lease_id, 6)
        before = keeper.alive_until
        await anyio.sleep(3)  # longer than the attempt to open the stream
        proxy.restore()
        with anyio.fail_after(SLACK):
            while True:  # until etcd answers a keep-alive (the bound moves on)
                if keeper.alive_until > before:
                    break
                await anyio.sleep(0.1)
        keeper.release()


def test_rounds_handler_on_a_silent_etcd_times_out_as_torchs_error(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """next_rendezvous() on a silent etcd raises torch's timeout error; shutdown() then closes."""
    params = RendezvousParameters(
        "etcd-v3-rounds",
        proxy.endpoint,
        "job",
        1,
        1,
        local_addr="127.0.0.1",
        key_prefix=f"{etcd_key_prefix}/rdzv",
        store_prefix=f"{etcd_key_prefix}/store/",
        read_timeout="5",
        join_timeout="1",
        close_timeout="10",
    )
    handler = create_rounds_handler(params)
    try:
        proxy.hold()
        started = time.monotonic()
        with pytest.raises(torch_api.RendezvousTimeoutError):
            handler.next_rendezvous()
        assert time.monotonic() - started < SLACK
        proxy.restore()
    finally:
        closed = handler.shutdown()
    assert closed


async def test_a_tasks_own_cancellation_during_an_etcd_call_is_raised_as_given(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """Task.cancel(msg) during a get raises that CancelledError, message and all."""
    key = f"{etcd_key_prefix}/key".encode()
    async with rdzv.connect(proxy.endpoint, read_timeout=30) as connection:
        proxy.hold()
        task = asyncio.get_running_loop().create_task(connection.get(key))
        await proxy.wait_for_async(lambda: proxy.held("requests") > 0)
        task.cancel("stop")
        with anyio.fail_after(SLACK), pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert raised.value.args == ("stop",)
        proxy.restore()
        assert await connection.get(key) is None


def test_a_stray_cancellation_through_the_sync_facade_is_not_called_a_close(
    etcd_endpoints: str,
) -> None:
    """A CancelledError escaping a facade call that nothing cancelled is not reported as closed."""

    async def stray() -> None:
        raise asyncio.CancelledError

    portal = Portal.open(ConnectionOptions(etcd_endpoints))
    try:
        with pytest.raises(rdzv.RendezvousError) as raised:
            portal.call(stray)
    finally:
        portal.close()
    assert "closed" not in str(raised.value)
    assert isinstance(raised.value.__cause__, asyncio.CancelledError)
