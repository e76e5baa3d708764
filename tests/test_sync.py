"""The synchronous facade: the async core on one event-loop thread, usable from any thread."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from collections.abc import Generator, Iterator

import pytest

import rdzv
from support import closed_port, new_threads_end, present


@pytest.fixture
def facade(etcd_endpoints: str, etcd_key_prefix: str) -> Iterator[rdzv.EtcdBackend]:
    """A facade for run id "job" under this test's key prefix."""
    with rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix) as backend:
        yield backend


def test_facade_follows_the_contract(facade: rdzv.EtcdBackend) -> None:
    """Create, conflict and compare-and-swap behave as in the async core."""
    assert facade.get_state() is None
    _, token, written = present(facade.set_state(b"one"))
    assert written
    assert facade.set_state(b"two") == (b"one", token, False)
    _, new_token, written = present(facade.set_state(b"two", token))
    assert written
    assert facade.get_state() == (b"two", new_token)


def test_facade_is_named_etcd_v3(facade: rdzv.EtcdBackend) -> None:
    """The facade reports the backend name torchrun uses."""
    assert facade.name == "etcd-v3"


def test_watch_iterates_over_changes(facade: rdzv.EtcdBackend) -> None:
    """The blocking watch iterator yields a change made by another thread."""
    _, token, _ = present(facade.set_state(b"zero"))
    writer = threading.Timer(0.2, facade.set_state, (b"one", token))
    writer.start()
    changes = facade.watch(token)
    assert isinstance(changes, Generator)  # typed as an Iterator; close() ends the watch
    try:
        state, new_token = next(changes)
    finally:
        changes.close()
        writer.join()
    assert state == b"one"
    assert new_token > token


def test_many_threads_share_one_facade_without_losing_updates(facade: rdzv.EtcdBackend) -> None:
    """Eight threads incrementing a counter through one facade end at the exact total."""
    facade.set_state(b"0")
    threads, rounds = 8, 10

    def increment() -> None:
        for _ in range(rounds):
            state, token = present(facade.get_state())
            while True:
                result = facade.set_state(str(int(state) + 1).encode(), token)
                assert result is not None
                state, token, written = result
                if written:
                    break

    workers = [threading.Thread(target=increment) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert present(facade.get_state())[0] == str(threads * rounds).encode()


def test_close_leaves_no_thread_behind(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Closing the facade stops its event-loop thread and gRPC's poller thread."""
    before = set(threading.enumerate())
    backend = rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix)
    backend.get_state()
    started = {thread.name for thread in set(threading.enumerate()) - before}
    assert "rdzv-event-loop" in started
    backend.close()
    assert new_threads_end(before)


def test_close_is_idempotent_and_later_calls_fail(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A second close is harmless; calls after close raise RendezvousError."""
    backend = rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix)
    backend.close()
    backend.close()
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        backend.get_state()


@pytest.mark.slow
def test_unreachable_etcd_fails_construction_within_read_timeout(etcd_key_prefix: str) -> None:
    """Creating a facade for a dead endpoint raises RendezvousConnectionError in time."""
    endpoint = f"127.0.0.1:{closed_port()}"
    before = set(threading.enumerate())
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError):
        rdzv.EtcdBackend(endpoint, "job", key_prefix=etcd_key_prefix, read_timeout=1)
    assert time.monotonic() - started < 3
    # The traceback kept the closed channel alive; gRPC's poller stops once it is freed.
    gc.collect()
    assert new_threads_end(before)


def test_bad_run_id_fails_before_a_thread_starts(etcd_endpoints: str) -> None:
    """Invalid arguments raise ValueError without starting an event-loop thread."""
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="run id"):
        rdzv.EtcdBackend(etcd_endpoints, "")
    assert set(threading.enumerate()) <= before


def _use_parent_facade_then_own(
    parent: rdzv.EtcdBackend,
    endpoints: str,
    key_prefix: str,
    results: multiprocessing.Queue[object],
) -> None:
    """In a forked child: the parent's facade refuses; a new facade works."""
    try:
        parent.get_state()
        results.put("parent's facade worked in the child")
    except rdzv.RendezvousError as error:
        results.put(f"refused: {error}")
    with rdzv.EtcdBackend(endpoints, "job", key_prefix=key_prefix, read_timeout=10) as own:
        results.put(own.set_state(b"from the child", present(own.get_state())[1]))


def test_forked_child_can_create_and_use_its_own_facade(
    facade: rdzv.EtcdBackend, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """After fork(), the child makes a working facade and the parent's keeps working."""
    facade.set_state(b"from the parent")
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(
        target=_use_parent_facade_then_own, args=(facade, etcd_endpoints, etcd_key_prefix, results)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    refused = results.get(timeout=5)
    assert isinstance(refused, str)
    assert refused.startswith("refused: ")
    assert "forked process" in refused
    written_by_child = results.get(timeout=5)
    assert isinstance(written_by_child, tuple)
    state, token, written = written_by_child
    assert (state, written) == (b"from the child", True)
    assert facade.get_state() == (b"from the child", token)


def _write_in_child(
    endpoints: str, key_prefix: str, results: multiprocessing.Queue[object]
) -> None:
    """In a forked child: a new facade writes a new state."""
    with rdzv.EtcdBackend(endpoints, "child", key_prefix=key_prefix, read_timeout=10) as own:
        results.put(present(own.set_state(b"from the child"))[2])


def test_a_fork_right_after_a_write_leaves_grpc_usable_in_the_child(
    facade: rdzv.EtcdBackend, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Forks a moment after a write (the keep-alive stream opening) give working children."""
    context = multiprocessing.get_context("fork")
    outcomes = []
    for attempt in range(10):
        facade.set_state(b"write %d" % attempt)
        results: multiprocessing.Queue[object] = context.Queue()
        child = context.Process(
            target=_write_in_child, args=(etcd_endpoints, f"{etcd_key_prefix}/{attempt}", results)
        )
        child.start()
        child.join(timeout=60)
        outcomes.append(results.get(timeout=5) if child.exitcode == 0 else child.exitcode)
    assert outcomes == [True] * 10
