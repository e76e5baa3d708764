"""The fault-injection proxy, against the real session etcd, through rdzv.

Each test puts a `FaultProxy` between an rdzv connection and etcd, switches one fault on, and
checks what the client sees and, over a second connection straight to etcd, what etcd holds.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import rdzv
from rdzv.testing import FaultProxy

pytestmark = pytest.mark.anyio

# The read timeout of connections through the proxy: calls that a fault stalls fail this fast.
# Two seconds leave a first write on a fresh connection (a lease grant and a transaction) time
# enough on a loaded machine, under coverage.
READ_TIMEOUT = 2.0
# Slack on time bounds, for slow or busy machines.
SLACK = 1.5
# How long a test waits for something that should happen at once.
WAIT = 5.0
# How long a held request is left to settle before it counts as complete: far less than the
# read timeout, far more than the microseconds a client takes to write one request.
SETTLE = 0.2


@pytest.fixture
def proxied_read_timeout() -> float:
    """The read timeout of `proxied` (conftest), which these tests wait out."""
    return READ_TIMEOUT


@pytest.fixture
def through_proxy(proxied: rdzv.Connection, etcd_key_prefix: str) -> rdzv.AsyncEtcdBackend:
    """A backend for run id "job" whose connection goes through the proxy."""
    return rdzv.AsyncEtcdBackend(proxied, "job", key_prefix=etcd_key_prefix)


@pytest.fixture
async def direct(etcd_endpoints: str, etcd_key_prefix: str) -> AsyncIterator[rdzv.AsyncEtcdBackend]:
    """The same backend on a connection straight to etcd: what etcd holds, behind the proxy."""
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
        yield rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)


async def _token(backend: rdzv.AsyncEtcdBackend, state: bytes) -> int:
    """Write `state` as the first state and return its token."""
    result = await backend.set_state(state)
    assert result is not None
    assert result[0] == state
    assert result[2]
    return result[1]


async def _stored(direct: rdzv.AsyncEtcdBackend) -> bytes | None:
    """The state that etcd holds now."""
    result = await direct.get_state()
    return None if result is None else result[0]


async def _until_stored(direct: rdzv.AsyncEtcdBackend, state: bytes) -> None:
    """Wait until etcd holds `state`; fail after WAIT seconds."""
    with anyio.fail_after(WAIT):
        while True:
            if await _stored(direct) == state:
                return
            await anyio.sleep(0.01)


# -------------------------------------------------------------------------------- traffic


async def test_traffic_passes_unchanged_without_faults(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """With no fault, calls through the proxy work and every byte is forwarded."""
    token = await _token(through_proxy, b"one")
    assert await through_proxy.get_state() == (b"one", token)
    assert await _stored(direct) == b"one"
    assert proxy.forwarded("requests") > 0
    assert proxy.forwarded("responses") > 0
    assert proxy.forwarded() == proxy.forwarded("requests") + proxy.forwarded("responses")
    await proxy.wait_for_async(lambda: proxy.held() == 0, timeout=WAIT)  # nothing stays
    assert proxy.dropped() == 0
    assert (proxy.connections_accepted, proxy.connections_open) == (1, 1)


@pytest.mark.slow
async def test_held_responses_fail_the_call_while_the_write_lands(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """With responses held, a write fails within its read timeout, yet etcd applied it."""
    token = await _token(through_proxy, b"one")
    proxy.hold("responses")
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError):
        await through_proxy.set_state(b"two", token)
    assert time.monotonic() - started < READ_TIMEOUT + SLACK
    assert await _stored(direct) == b"two"
    assert proxy.held("responses") > 0


async def test_answer_held_then_cut_is_lost_although_the_write_landed(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """Holding the answer of an applied write, then cutting, discards only the answer."""
    token = await _token(through_proxy, b"one")
    proxy.hold("responses")
    sent = proxy.forwarded("requests")
    results = []

    async def write() -> None:
        results.append(await through_proxy.set_state(b"two", token))

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        await proxy.wait_for_async(lambda: proxy.forwarded("requests") > sent, timeout=WAIT)
        await _until_stored(direct, b"two")
        await proxy.wait_for_async(lambda: proxy.held("responses") > 0, timeout=WAIT)
        held = proxy.held("responses")
        proxy.cut()
        assert proxy.connections_open == 0
        assert proxy.dropped("responses") >= held
        proxy.restore()
    # rdzv's own part: the write whose answer was lost is found and reported written.
    stored = await direct.get_state()
    assert stored is not None
    assert results == [(b"two", stored[1], True)]


@pytest.mark.slow
async def test_held_requests_released_later_land_late(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """A request held until its call has failed lands when released, with nothing after it."""
    token = await _token(through_proxy, b"one")
    proxy.hold("requests")
    async with anyio.create_task_group() as group:

        async def write() -> None:
            with pytest.raises(rdzv.RendezvousConnectionError):
                await through_proxy.set_state(b"late", token)

        group.start_soon(write)
        await proxy.wait_for_async(lambda: proxy.held("requests") > 0, timeout=WAIT)
        await anyio.sleep(SETTLE)
        request = proxy.held("requests")
    # The call has failed, and its cancellation is held behind the request.
    assert await _stored(direct) == b"one"
    assert proxy.held("requests") > request
    forwarded = proxy.forwarded("requests")
    proxy.release("requests", nbytes=request)
    await proxy.wait_for_async(
        lambda: proxy.forwarded("requests") == forwarded + request, timeout=WAIT
    )
    await _until_stored(direct, b"late")
    assert proxy.held("requests") > 0  # the rest stays held


async def test_release_forwards_held_requests_in_time_for_the_call(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """Requests released before the read timeout pass on in order and the call succeeds."""
    async with rdzv.connect(proxy.endpoint, read_timeout=10) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        proxy.hold("requests")
        async with anyio.create_task_group() as group:
            group.start_soon(backend.set_state, b"one")
            await proxy.wait_for_async(lambda: proxy.held("requests") > 0, timeout=WAIT)
            proxy.release("requests")
        result = await backend.get_state()
        assert result is not None
        assert result[0] == b"one"
        await proxy.wait_for_async(lambda: proxy.held() == 0, timeout=WAIT)


@pytest.mark.slow
async def test_dropped_requests_vanish_while_the_connection_stays_open(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """Dropping is a black hole: calls time out, nothing reaches etcd, the connection stays."""
    token = await _token(through_proxy, b"one")
    proxy.drop("requests")
    forwarded = proxy.forwarded("requests")
    with pytest.raises(rdzv.RendezvousConnectionError):
        await through_proxy.set_state(b"two", token)
    assert proxy.forwarded("requests") == forwarded
    assert proxy.dropped("requests") > 0
    assert (proxy.connections_accepted, proxy.connections_open) == (1, 1)
    assert await _stored(direct) == b"one"


@pytest.mark.slow
async def test_drop_discards_what_was_held(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, direct: rdzv.AsyncEtcdBackend
) -> None:
    """Switching a holding direction to drop discards its held bytes: they never arrive."""
    token = await _token(through_proxy, b"one")
    proxy.hold("requests")
    async with anyio.create_task_group() as group:

        async def write() -> None:
            with pytest.raises(rdzv.RendezvousConnectionError):
                await through_proxy.set_state(b"two", token)

        group.start_soon(write)
        await proxy.wait_for_async(lambda: proxy.held("requests") > 0, timeout=WAIT)
        held = proxy.held("requests")
        proxy.drop("requests")
        assert proxy.held("requests") == 0
        assert proxy.dropped("requests") >= held
    proxy.restore()
    assert await _stored(direct) == b"one"


@pytest.mark.slow
async def test_connections_that_lost_bytes_are_reset_when_the_drop_ends(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend
) -> None:
    """Ending a drop resets the connections that lost bytes: no stream goes on after a gap."""
    token = await _token(through_proxy, b"one")
    proxy.drop("requests")
    with pytest.raises(rdzv.RendezvousConnectionError):
        await through_proxy.get_state()
    assert proxy.dropped("requests") > 0
    proxy.restore()
    assert proxy.connections_open == 0
    assert await through_proxy.get_state() == (b"one", token)
    assert proxy.connections_open == 1


async def test_delay_postpones_each_byte(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend
) -> None:
    """A delay on both directions makes a round trip last at least twice the delay."""
    token = await _token(through_proxy, b"one")
    proxy.delay(0.2)
    started = time.monotonic()
    assert await through_proxy.get_state() == (b"one", token)
    assert time.monotonic() - started >= 0.4
    proxy.restore()
    started = time.monotonic()
    assert await through_proxy.get_state() == (b"one", token)
    assert time.monotonic() - started < 0.4


async def test_cut_resets_every_connection_and_the_client_reconnects(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend
) -> None:
    """cut() closes the open connections at once; rdzv's next call opens a new one."""
    token = await _token(through_proxy, b"one")
    assert proxy.connections_open == 1
    proxy.cut()
    assert proxy.connections_open == 0
    assert await through_proxy.get_state() == (b"one", token)
    assert (proxy.connections_accepted, proxy.connections_open) == (2, 1)


@pytest.mark.slow
async def test_refused_connections_fail_calls_until_allowed_again(
    proxy: FaultProxy, through_proxy: rdzv.AsyncEtcdBackend, etcd_key_prefix: str
) -> None:
    """With new connections refused, a cut client cannot reconnect until refusing ends."""
    token = await _token(through_proxy, b"one")
    proxy.refuse_new()
    proxy.cut()
    with pytest.raises(rdzv.RendezvousConnectionError):
        await through_proxy.get_state()
    assert proxy.connections_refused > 0
    assert (proxy.connections_accepted, proxy.connections_open) == (1, 0)
    proxy.refuse_new(False)
    # A new client: the refused one's gRPC channel waits out its reconnect backoff (up to a
    # second) before trying again, which is gRPC's business, not the proxy's.
    async with rdzv.connect(proxy.endpoint, read_timeout=READ_TIMEOUT) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        assert await backend.get_state() == (b"one", token)
    assert proxy.connections_accepted >= 2


def test_a_target_gone_before_the_clients_end_of_stream_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A target that reset its connection before the client ended its stream logs no error."""
    # A plain TCP target rather than etcd: the test decides when it resets its connection.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)
        with FaultProxy(f"127.0.0.1:{listener.getsockname()[1]}") as proxy:
            host, port = proxy.endpoint.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=WAIT) as client:
                target, _ = listener.accept()
                # The target ends its stream: the proxy passes the end on and stops reading.
                target.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""
                # Then it resets the connection, unseen: the proxy's end of the client's stream
                # meets a socket that cannot take it any more.
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                target.close()
                client.shutdown(socket.SHUT_WR)
                proxy.wait_for(lambda: proxy.connections_open == 0, timeout=WAIT)
            # A second connection passed on: the proxy's loop has finished with the first.
            with socket.create_connection((host, int(port)), timeout=WAIT):
                listener.accept()[0].close()
        gc.collect()  # a task's exception that nobody retrieved is logged once it is collected
    assert [
        record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR
    ] == []


# ---------------------------------------------------------------------------------- waits


async def test_wait_for_async_times_out_when_the_condition_never_comes(
    proxy: FaultProxy,
) -> None:
    """wait_for_async raises TimeoutError once its timeout has passed."""
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await proxy.wait_for_async(lambda: proxy.forwarded() > 0, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 0.3 + SLACK


def test_wait_for_times_out_when_the_condition_never_comes(proxy: FaultProxy) -> None:
    """wait_for, from synchronous code, raises TimeoutError once its timeout has passed."""
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        proxy.wait_for(lambda: proxy.connections_accepted > 0, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 0.3 + SLACK


def test_wait_for_returns_once_a_client_connects(proxy: FaultProxy) -> None:
    """wait_for wakes when the proxy's counters change, from another thread's traffic."""
    host, port = proxy.endpoint.rsplit(":", 1)
    timer = threading.Timer(0.1, lambda: _connect_and_close(host, int(port)))
    timer.start()
    try:
        proxy.wait_for(lambda: proxy.connections_accepted == 1, timeout=WAIT)
    finally:
        timer.join()


def _connect_and_close(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=WAIT):
        pass


async def test_wait_for_refuses_to_block_a_running_event_loop(proxy: FaultProxy) -> None:
    """The blocking wait_for, called in a coroutine, raises instead of freezing the loop."""
    with pytest.raises(RuntimeError, match="wait_for_async"):
        proxy.wait_for(lambda: True, timeout=0.1)


# ------------------------------------------------------------------------------ lifecycle


def test_close_leaves_no_thread_and_can_be_repeated(etcd_endpoints: str) -> None:
    """close() ends the proxy's thread before returning, open connections or not; twice is ok."""
    before = set(threading.enumerate())
    proxy = FaultProxy(etcd_endpoints)
    proxy.start()
    assert len(set(threading.enumerate()) - before) == 1
    host, port = proxy.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT):
        proxy.wait_for(lambda: proxy.connections_open == 1, timeout=WAIT)
        proxy.close()
    assert set(threading.enumerate()) - before == set()
    proxy.close()


def test_a_proxy_starts_once(etcd_endpoints: str) -> None:
    """The endpoint exists only once started, and a proxy cannot be started twice."""
    proxy = FaultProxy(etcd_endpoints)
    with pytest.raises(RuntimeError):
        _ = proxy.endpoint
    with proxy:
        assert proxy.endpoint.startswith("127.0.0.1:")
        with pytest.raises(RuntimeError):
            proxy.start()
    with pytest.raises(RuntimeError):
        proxy.start()


def test_fault_arguments_are_checked(proxy: FaultProxy) -> None:
    """Unknown directions, negative delays and partial releases of both ways are refused."""
    with pytest.raises(ValueError, match="direction"):
        proxy.hold("sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero or more"):
        proxy.delay(-1)
    with pytest.raises(ValueError, match="one direction"):
        proxy.release("both", nbytes=10)
    with pytest.raises(ValueError, match="zero or more"):
        proxy.release("requests", nbytes=-1)


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.1:", ":2379", "127.0.0.1:99999"])
def test_a_malformed_target_is_refused(target: str) -> None:
    """The target must be "host:port"."""
    with pytest.raises(ValueError, match="host:port"):
        FaultProxy(target)
