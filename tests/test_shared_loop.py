"""Facades of one process share one event-loop thread, and one connection per connection options."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from torch.distributed.elastic.rendezvous import api as torch_api

import rdzv
from rdzv._portal import shared_connections
from rdzv.testing import EtcdServer
from rdzv.torch import create_backend
from support import new_threads_end, present, torch_params

LOOP_THREAD = "rdzv-event-loop"


def _loop_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == LOOP_THREAD]


def _users(connection: rdzv.Connection) -> int:
    """How many open facades of this process use `connection` (0: none, it is closed)."""
    return dict((id(shared), users) for shared, users in shared_connections()).get(
        id(connection), 0
    )


OpenFacade = Callable[..., rdzv.EtcdBackend]


@pytest.fixture
def open_facade(etcd_endpoints: str, etcd_key_prefix: str) -> Iterator[OpenFacade]:
    """Open an `rdzv.EtcdBackend` under this test's prefix; each is closed at the end."""
    made: list[rdzv.EtcdBackend] = []

    def open_(run_id: str = "job", *, read_timeout: float = 10) -> rdzv.EtcdBackend:
        facade = rdzv.EtcdBackend(
            etcd_endpoints, run_id, key_prefix=etcd_key_prefix, read_timeout=read_timeout
        )
        made.append(facade)
        return facade

    yield open_
    for facade in made:
        facade.close()


# ----------------------------------------------------------------------------------- sharing


def test_facades_with_the_same_options_share_one_connection(
    open_facade: OpenFacade,
) -> None:
    """Two facades made with the same endpoints and options use one Connection."""
    first, second = open_facade("one"), open_facade("two")
    assert first.connection is second.connection
    assert _users(first.connection) == 2


def test_facades_share_one_event_loop_thread(open_facade: OpenFacade) -> None:
    """However many facades a process opens, at most one rdzv event-loop thread runs."""
    facades = [open_facade(f"job-{index}") for index in range(8)]
    facades.append(open_facade("slow", read_timeout=20))  # another connection, the same thread
    for facade in facades:
        facade.set_state(b"x")
    assert len(_loop_threads()) == 1


def test_the_same_endpoints_written_differently_share(
    open_facade: OpenFacade, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """An http:// scheme and an explicit protocol="http" name the same connection."""
    plain = open_facade()
    with rdzv.EtcdBackend(
        f"http://{etcd_endpoints}", "job", key_prefix=etcd_key_prefix, read_timeout=10
    ) as schemed:
        assert schemed.connection is plain.connection


def test_a_different_read_timeout_gets_its_own_connection(
    open_facade: OpenFacade,
) -> None:
    """Facades whose read timeouts differ do not share: the timeout belongs to the connection."""
    short, long = open_facade(read_timeout=5), open_facade(read_timeout=10)
    assert short.connection is not long.connection
    assert (short.connection.read_timeout, long.connection.read_timeout) == (5, 10)


def test_different_users_get_different_connections(
    auth_server: EtcdServer, auth_password: str
) -> None:
    """Facades of two etcd users never share a connection, and each is authenticated as its own."""
    alice = rdzv.EtcdBackend(
        auth_server.endpoint,
        "job",
        key_prefix="/allowed/shared-loop",
        username="alice",
        password=auth_password,
        read_timeout=10,
    )
    try:
        bob = rdzv.EtcdBackend(
            auth_server.endpoint,
            "job",
            key_prefix="/allowed/shared-loop",
            username="bob",
            password=auth_password,
            read_timeout=10,
        )
        try:
            assert alice.connection is not bob.connection
            assert present(alice.set_state(b"alice's"))[2]
            with pytest.raises(rdzv.RendezvousAuthError):
                bob.get_state()  # bob has no role: his own token is used, not alice's
        finally:
            bob.close()
    finally:
        alice.close()


def test_a_wrong_password_does_not_reuse_the_right_one(
    auth_server: EtcdServer, auth_password: str
) -> None:
    """A facade with the right user but a wrong password fails; the open one still works."""
    options: dict[str, object] = {
        "key_prefix": "/allowed/shared-loop",
        "username": "alice",
        "read_timeout": 10,
    }
    with rdzv.EtcdBackend(auth_server.endpoint, "job", password=auth_password, **options) as good:  # type: ignore[arg-type]
        with pytest.raises(rdzv.RendezvousAuthError):
            rdzv.EtcdBackend(auth_server.endpoint, "job", password="wrong", **options)  # type: ignore[arg-type]
        assert _users(good.connection) == 1
        good.get_state()


def test_a_rendezvous_and_a_backend_share_a_connection(
    open_facade: OpenFacade, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """rdzv.Rendezvous and rdzv.EtcdBackend of the same options use one connection."""
    backend = open_facade()
    node = rdzv.Rendezvous(
        etcd_endpoints,
        "round",
        min_nodes=1,
        max_nodes=1,
        key_prefix=f"{etcd_key_prefix}/rounds",
        read_timeout=10,
    )
    try:
        assert node.join().rank == 0
        assert _users(backend.connection) == 2
    finally:
        node.leave()
    assert _users(backend.connection) == 1


# ----------------------------------------------------------------------------------- closing


def test_closing_one_facade_leaves_the_other_working(open_facade: OpenFacade) -> None:
    """After one of two sharing facades closes, the other still reads and writes."""
    first, second = open_facade("one"), open_facade("two")
    first.close()
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        first.get_state()
    assert present(second.set_state(b"still here"))[2]
    assert _users(second.connection) == 1


def test_closing_every_facade_stops_the_thread_and_closes_the_channel(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Once the last facade closes, its connection is gone and no thread it started is left."""
    assert shared_connections() == [], "a facade of an earlier test was left open"
    before = set(threading.enumerate())
    facades = [
        rdzv.EtcdBackend(etcd_endpoints, f"job-{index}", key_prefix=etcd_key_prefix)
        for index in range(3)
    ]
    for facade in facades:
        facade.get_state()
    assert [thread.name for thread in set(threading.enumerate()) - before].count(LOOP_THREAD) == 1
    for facade in facades:
        facade.close()
    assert shared_connections() == []
    assert new_threads_end(before)  # the loop thread, and gRPC's poller (no channel is left)


def test_closing_a_facade_ends_only_its_own_calls_in_progress(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A store.get waiting through a closed pair fails; the same wait through another goes on."""
    params = torch_params(etcd_endpoints, etcd_key_prefix)
    closing, staying = create_backend(params), create_backend(params)
    try:
        assert closing[0].facade.connection is staying[0].facade.connection
        outcomes: dict[str, object] = {}

        def wait(name: str, store: rdzv.torch.EtcdStore) -> None:
            store.set_timeout(datetime.timedelta(seconds=30))
            try:
                outcomes[name] = store.get("late")
            except Exception as error:  # the assertions below say which
                outcomes[name] = error

        waiters = [
            threading.Thread(target=wait, args=("closing", closing[1])),
            threading.Thread(target=wait, args=("staying", staying[1])),
        ]
        for waiter in waiters:
            waiter.start()
        time.sleep(0.5)
        closing[0].facade.close()
        waiters[0].join(timeout=10)
        assert not waiters[0].is_alive()
        assert "closed while the call was in progress" in str(outcomes["closing"])
        staying[1].set("late", b"value")
        waiters[1].join(timeout=10)
        assert outcomes["staying"] == b"value"
    finally:
        closing[0].facade.close()
        staying[0].facade.close()


def test_a_watch_survives_another_facade_closing(open_facade: OpenFacade) -> None:
    """A facade's watch on the shared connection keeps going when another facade closes."""
    watcher, other = open_facade(), open_facade()
    _, token, _ = present(watcher.set_state(b"zero"))
    changes = watcher.watch(token)
    try:
        other.close()
        writer = threading.Timer(0.2, watcher.set_state, (b"one", token))
        writer.start()
        state, _ = next(changes)
        writer.join()
    finally:
        changes.close()  # type: ignore[attr-defined]  # a generator, typed as an Iterator
    assert state == b"one"


def test_a_closed_facade_ends_its_open_watch(open_facade: OpenFacade) -> None:
    """Closing a facade while a thread waits in its watch ends that wait with RendezvousError."""
    watcher, _ = open_facade(), open_facade()
    _, token, _ = present(watcher.set_state(b"zero"))
    failures: list[BaseException] = []

    def wait() -> None:
        try:
            next(iter(watcher.watch(token)))
        except rdzv.RendezvousError as error:
            failures.append(error)

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.5)
    watcher.close()
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert len(failures) == 1


def test_many_threads_create_use_and_close_facades_at_once(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Sixteen threads each open, use and close a facade, all at once, without an error."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            for round_ in range(3):
                with rdzv.EtcdBackend(
                    etcd_endpoints, f"job-{index}", key_prefix=etcd_key_prefix, read_timeout=10
                ) as facade:
                    facade.set_state(b"%d" % round_)
                    assert facade.get_state() is not None
        except BaseException as error:  # reported below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(index,)) for index in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert errors == []
    assert not any(worker.is_alive() for worker in workers)


def test_torch_pairs_with_the_same_parameters_share_one_connection(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Two create_backend pairs share a connection; a store outlives the other pair's close."""
    params = torch_params(etcd_endpoints, etcd_key_prefix)
    first_backend, first_store = create_backend(params)
    second_backend, second_store = create_backend(params)
    try:
        assert first_backend.facade.connection is second_backend.facade.connection
        first_backend.facade.close()
        clone = second_store.clone()
        clone.set("key", "value")
        assert second_store.get("key") == b"value"
        with pytest.raises(torch_api.RendezvousError, match="closed"):
            first_store.set("key", "value")
    finally:
        first_backend.facade.close()
        second_backend.facade.close()


def test_torch_pairs_with_different_read_timeouts_do_not_share(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """create_backend pairs whose read_timeout differ get a connection each."""
    first, _ = create_backend(torch_params(etcd_endpoints, etcd_key_prefix))
    try:
        params = torch_params(etcd_endpoints, etcd_key_prefix)
        params.config["read_timeout"] = "0.5"
        second, _ = create_backend(params)
        try:
            assert first.facade.connection is not second.facade.connection
        finally:
            second.facade.close()
    finally:
        first.facade.close()


# -------------------------------------------------------------------------------------- fork


# The child opens two facades and writes once: seconds. A child stuck in gRPC (seen once in CI,
# its loop thread inside grpc.aio's Channel.__init__) fails the test instead of hanging CI.
_CHILD_TIMEOUT = 120.0


def _in_forked_child(endpoints: str, key_prefix: str, parent: rdzv.EtcdBackend) -> str:
    """In a child of os.fork(): "ok" if the parent's facade refuses and new ones share and work."""
    try:
        parent.get_state()
        return "the parent's facade worked in the child"
    except rdzv.RendezvousError as error:
        if "forked process" not in str(error):
            return f"the parent's facade failed otherwise: {error}"
    if shared_connections() != [] or _loop_threads():
        return "the child inherited the parent's connections or loop thread"
    first = rdzv.EtcdBackend(endpoints, "child", key_prefix=key_prefix, read_timeout=10)
    again = rdzv.EtcdBackend(endpoints, "child", key_prefix=key_prefix, read_timeout=10)
    with first, again:
        if first.connection is not again.connection:
            return "the child's facades do not share"
        if not present(first.set_state(b"from the child"))[2]:
            return "the child's write was refused"
    return "ok"


def test_os_fork_child_makes_its_own_shared_facades_and_the_parent_goes_on(
    open_facade: OpenFacade, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """After os.fork() with two sharing facades open, the child starts afresh; the parent works."""
    first, second = open_facade("one"), open_facade("two")
    first.set_state(b"before the fork")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        outcome = "the child raised"
        try:
            outcome = _in_forked_child(etcd_endpoints, etcd_key_prefix, first)
        except BaseException as error:
            outcome = f"the child raised {error!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answered = select.select([reader], [], [], _CHILD_TIMEOUT)[0]
        if not answered:
            os.kill(pid, signal.SIGKILL)
        outcome = reader.read().decode() if answered else "the child hung"
    os.waitpid(pid, 0)
    assert outcome == "ok"
    assert present(second.set_state(b"after the fork"))[2]
    assert present(first.get_state())[0] == b"before the fork"
    with rdzv.EtcdBackend(
        etcd_endpoints, "child", key_prefix=etcd_key_prefix, read_timeout=10
    ) as reader_facade:
        assert present(reader_facade.get_state())[0] == b"from the child"


def _child_process(endpoints: str, key_prefix: str, results: multiprocessing.Queue[object]) -> None:
    """In a multiprocessing 'fork' child: open two facades, report whether they share and work."""
    first = rdzv.EtcdBackend(endpoints, "mp", key_prefix=key_prefix, read_timeout=10)
    again = rdzv.EtcdBackend(endpoints, "mp", key_prefix=key_prefix, read_timeout=10)
    with first, again:
        results.put((first.connection is again.connection, present(first.set_state(b"mp"))[2]))


def test_multiprocessing_fork_child_shares_its_own_connection(
    open_facade: OpenFacade, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A multiprocessing 'fork' child's facades share a connection of the child's own."""
    parent = open_facade("mp")
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(target=_child_process, args=(etcd_endpoints, etcd_key_prefix, results))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results.get(timeout=5) == (True, True)
    assert present(parent.get_state())[0] == b"mp"


def test_closing_the_last_two_connections_at_once_closes_both(
    open_facade: OpenFacade,
) -> None:
    """Two threads closing the last facades of two connections: both channels get closed."""
    for attempt in range(20):
        facades = [open_facade(f"a{attempt}"), open_facade(f"b{attempt}", read_timeout=20)]
        connections = [facade.connection for facade in facades]
        closers = [threading.Thread(target=facade.close) for facade in facades]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(timeout=30)
        assert [c._links._closed for c in connections] == [True, True], attempt
