"""The attempt driver: every call keeps its bound, survives a closed channel, re-authenticates."""

from __future__ import annotations

import functools
import multiprocessing
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

import rdzv
from rdzv.testing import EtcdServer
from support import present

pytestmark = pytest.mark.anyio

# What a call may take past its read timeout: scheduling, closing a channel, a last backoff.
MARGIN = 1.0


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never answers (a frozen member)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def own_server() -> Iterator[EtcdServer]:
    """An etcd of this test's own, to pause without disturbing other tests."""
    with EtcdServer() as server:
        yield server


@pytest.mark.slow
async def test_connect_to_a_silent_endpoint_keeps_its_bound(black_hole: str) -> None:
    """Opening a connection to an endpoint that never answers fails within read_timeout."""
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError):
        async with rdzv.connect(black_hole, read_timeout=1.5):
            pass
    assert time.monotonic() - started < 1.5 + MARGIN


@pytest.mark.slow
async def test_set_state_on_a_frozen_server_keeps_its_bound(
    own_server: EtcdServer, etcd_key_prefix: str
) -> None:
    """A write to a frozen etcd ends within read_timeout, resolution included: outcome unknown."""
    async with rdzv.connect(own_server.endpoint, read_timeout=2) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        await backend.set_state(b"round 1")
        own_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(rdzv.RendezvousOutcomeUnknownError) as caught:
                await backend.set_state(b"round 2")
            elapsed = time.monotonic() - started
        finally:
            own_server.resume()
    assert elapsed < 2 + MARGIN
    assert caught.value.key == backend.key


@pytest.mark.slow
async def test_call_waiting_on_a_channel_closed_by_failover_moves_on(
    black_hole: str, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A write waiting for a channel that another call's failover closes succeeds elsewhere."""
    endpoints = f"{black_hole},{etcd_endpoints}"
    # With two endpoints, one attempt gets a third of the read timeout (at least 1 s).
    connection = rdzv.Connection(endpoints, read_timeout=4)
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
    try:
        results: dict[str, object] = {}

        async def write() -> None:
            results["write"] = await backend.set_state(b"state")

        async def read() -> None:
            results["read"] = await backend.get_state()

        # The read fails over first, closing the channel the write is waiting for.
        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.sleep(0.5)
            group.start_soon(write)
    finally:
        await connection.aclose()
    written = results["write"]
    assert isinstance(written, tuple)
    assert written[0] == b"state"
    assert written[2] is True
    assert results["read"] in (None, (b"state", written[1]))


async def test_unauthorized_watch_fails_fast(auth_server: EtcdServer, auth_password: str) -> None:
    """A user without permission on the key gets RendezvousAuthError at once, not a timeout."""
    async with rdzv.connect(
        auth_server.endpoint, read_timeout=6, username="bob", password=auth_password
    ) as connection:
        started = time.monotonic()
        changes = connection.watch(b"/allowed/watched", start_revision=0)
        with pytest.raises(rdzv.RendezvousAuthError) as caught:
            await changes.__anext__()
        await changes.aclose()
    assert time.monotonic() - started < 2
    assert caught.value.endpoint == auth_server.endpoint


@pytest.mark.slow
async def test_watch_authenticates_again_after_an_etcd_restart(
    auth_server: EtcdServer, auth_password: str, etcd_key_prefix: str
) -> None:
    """After etcd restarts (its auth tokens gone), a watch re-authenticates and misses nothing."""
    key = f"/allowed{etcd_key_prefix}/watched".encode()
    credentials = functools.partial(
        rdzv.connect,
        auth_server.endpoint,
        username="alice",
        password=auth_password,
        read_timeout=15,
    )
    async with credentials() as watcher:
        start = await watcher.put(key, b"before")
        changes = watcher.watch(key, start_revision=start + 1)
        try:
            auth_server.restart()
            async with credentials() as writer:
                await writer.put(key, b"after")
            with anyio.fail_after(15):
                event = await changes.__anext__()
        finally:
            await changes.aclose()
    assert event.kv.value == b"after"


def test_facade_call_in_flight_at_close_is_a_rendezvous_error(
    own_server: EtcdServer, etcd_key_prefix: str
) -> None:
    """A synchronous call in flight when the facade closes raises RendezvousError."""
    backend = rdzv.EtcdBackend(own_server.endpoint, "job", key_prefix=etcd_key_prefix)
    outcome: list[BaseException | object] = []

    def call() -> None:
        try:
            outcome.append(backend.get_state())
        except BaseException as error:
            outcome.append(error)

    own_server.pause()
    try:
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        backend.close()
        caller.join(10)
    finally:
        own_server.resume()
    assert not caller.is_alive()
    [result] = outcome
    assert isinstance(result, rdzv.RendezvousError), repr(result)


def _child_uses_its_own_facade(endpoints: str, key_prefix: str) -> None:
    """In a forked child: make a facade of its own and read the parent's state through it."""
    with rdzv.EtcdBackend(endpoints, "job", key_prefix=key_prefix, read_timeout=10) as own:
        result = own.get_state()
    raise SystemExit(0 if result is not None and result[0] == b"state" else 3)


@pytest.mark.slow
def test_fork_while_the_facade_is_busy(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Forking while calls are in flight: children work, and every parent call completes."""
    context = multiprocessing.get_context("fork")
    outcomes: list[object] = []
    stop = threading.Event()
    with rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix) as parent:
        parent.set_state(b"state")

        def busy() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(parent.get_state())
                except BaseException as error:
                    outcomes.append(error)

        callers = [threading.Thread(target=busy) for _ in range(4)]
        for caller in callers:
            caller.start()
        exit_codes = []
        try:
            for _ in range(5):
                child = context.Process(
                    target=_child_uses_its_own_facade, args=(etcd_endpoints, etcd_key_prefix)
                )
                child.start()
                child.join(30)
                if child.exitcode is None:
                    child.kill()
                exit_codes.append(child.exitcode)
        finally:
            stop.set()
            for caller in callers:
                caller.join(30)
    assert exit_codes == [0] * 5
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert errors == []
    assert len(outcomes) > 5


@pytest.mark.slow
async def test_a_member_of_another_cluster_is_never_used(
    own_server: EtcdServer, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """After the cluster's member dies, another etcd at the next endpoint is not taken for it."""
    async with rdzv.connect(etcd_endpoints, read_timeout=5) as other:
        await rdzv.AsyncEtcdBackend(other, "job", key_prefix=etcd_key_prefix).set_state(b"theirs")
    endpoints = f"{own_server.endpoint},{etcd_endpoints}"
    async with rdzv.connect(endpoints, read_timeout=4) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        assert await backend.get_state() is None
        own_server.kill()
        try:
            # The other etcd holds a state at the same key; reading it would be a wrong answer.
            with pytest.raises(rdzv.RendezvousConnectionError):
                await backend.get_state()
        finally:
            own_server.restart()
        assert await backend.get_state() is None


@pytest.mark.slow
async def test_reads_and_writes_authenticate_again_after_an_etcd_restart(
    auth_server: EtcdServer, auth_password: str, etcd_key_prefix: str
) -> None:
    """After etcd restarts (its auth tokens gone), a read and a write re-authenticate and work."""
    async with rdzv.connect(
        auth_server.endpoint, read_timeout=15, username="alice", password=auth_password
    ) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=f"/allowed{etcd_key_prefix}")
        _, token, _ = present(await backend.set_state(b"before"))
        auth_server.restart()
        assert await backend.get_state() == (b"before", token)
        auth_server.restart()
        state, _, written = present(await backend.set_state(b"after", token))
    assert (state, written) == (b"after", True)


def _child_reports_grpc_unusable(endpoints: str) -> None:
    """In a forked child: making a facade must raise the clear error, nothing worse."""
    try:
        rdzv.EtcdBackend(endpoints, "job", read_timeout=5).close()
    except rdzv.RendezvousError as error:
        raise SystemExit(4 if "forked while gRPC" in str(error) else 3) from None
    raise SystemExit(0)


@pytest.mark.slow
def test_fork_while_grpc_stays_busy_gives_the_child_a_clear_error(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """If gRPC cannot go idle before a fork, the child gets a RendezvousError, not a crash."""
    context = multiprocessing.get_context("fork")
    with (
        rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix),
        start_blocking_portal("asyncio") as portal,
    ):
        # A channel that is not rdzv's facade's keeps gRPC's poller thread alive.
        other = portal.call(rdzv.connect(etcd_endpoints).__aenter__)
        try:
            child = context.Process(target=_child_reports_grpc_unusable, args=(etcd_endpoints,))
            child.start()
            child.join(30)
            if child.exitcode is None:
                child.kill()
        finally:
            portal.call(other.aclose)
    assert child.exitcode == 4
