"""Every public call of the async core ends within one bound when etcd stops answering.

The calls run on a connection through a FaultProxy, which the test freezes by holding every byte
both ways: nothing reaches etcd and no answer comes back, as with a stalled etcd or a partition.
Each call must then return, or raise the error that its contract names, within about one read
timeout (or its own timeout), never a read timeout per request, nor for ever. The bounds are
loose on purpose: they catch a call without an overall deadline, not a slow machine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import pytest

import rdzv
from conftest import Participants
from rdzv.testing import FaultProxy
from support import present

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

T = TypeVar("T")

READ_TIMEOUT = 1.0
# What a call may take past its bound: scheduling on a loaded machine, closing a channel, and
# a last backoff.
SLACK = 3.0
# How long a call that does not end is given before the test gives up on it.
HUNG = 60.0
# `Connection.aclose` waits this long at most for gRPC to close its channel.
CLOSE_TIMEOUT = 5.0

Unknown = rdzv.RendezvousOutcomeUnknownError
Unreachable = rdzv.RendezvousConnectionError


@pytest.fixture
async def frozen(proxy: FaultProxy) -> AsyncIterator[rdzv.Connection]:
    """A connection through `proxy`, which the test freezes with `proxy.hold()`.

    Asked for after `participants`, it closes first: their `leave()` then ends at once.
    """
    async with rdzv.connect(proxy.endpoint, read_timeout=READ_TIMEOUT) as connection:
        try:
            yield connection
        finally:
            proxy.restore()  # so that the connection closes at once


async def timed(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    """`call`'s result or exception, and the seconds it took (cut off after `HUNG` s)."""
    result: T | BaseException = TimeoutError(f"still running after {HUNG} s")
    started = time.monotonic()
    with anyio.move_on_after(HUNG):
        try:
            result = await call
        except Exception as error:
            result = error
    return result, time.monotonic() - started


def as_expected(outcome: object, expected: object) -> bool:
    """Whether `outcome` is `expected`: an error of that class, or that very value."""
    if not isinstance(expected, type):
        return outcome is expected
    if expected is Unreachable and isinstance(outcome, Unknown):
        return False  # "may have been written" is not "unreachable"
    return isinstance(outcome, expected)


# ------------------------------------------------------------------------------------ backend

BackendCall = Callable[[rdzv.AsyncEtcdBackend, int], Awaitable[object]]

BACKEND_CALLS: list[tuple[str, BackendCall, type[BaseException]]] = [
    ("get_state", lambda backend, _: backend.get_state(), Unreachable),
    # The lease was granted by the first write: the compare-and-swap goes out, and is lost.
    ("set_state", lambda backend, token: backend.set_state(b"after", token), Unknown),
]


@pytest.mark.parametrize(
    ("call", "expected"),
    [pytest.param(call, expected, id=name) for name, call, expected in BACKEND_CALLS],
)
async def test_a_backend_call_ends_within_the_read_timeout(
    frozen: rdzv.Connection,
    proxy: FaultProxy,
    etcd_key_prefix: str,
    call: BackendCall,
    expected: type[BaseException],
) -> None:
    """Each backend call on a frozen etcd raises its error within one read timeout."""
    backend = rdzv.AsyncEtcdBackend(frozen, "job", key_prefix=etcd_key_prefix)
    _, token, _ = present(await backend.set_state(b"before"))
    proxy.hold()
    outcome, took = await timed(call(backend, token))
    assert as_expected(outcome, expected), repr(outcome)
    assert took < READ_TIMEOUT + SLACK, f"took {took:.1f} s, then {outcome!r}"


# -------------------------------------------------------------------------------------- store

StoreCall = Callable[[rdzv.AsyncEtcdStore], Awaitable[object]]

STORE_CALLS: list[tuple[str, StoreCall, type[BaseException]]] = [
    # Unconditional puts may land twice: retried like reads, they end unreachable.
    ("set", lambda store: store.set("key", b"new"), Unreachable),
    # Transactions that write: a lost answer is resolved, or sent again, until the deadline.
    ("add", lambda store: store.add("counter", 1), Unknown),
    ("compare_set", lambda store: store.compare_set("key", b"old", b"new"), Unknown),
    ("delete_key", lambda store: store.delete_key("key"), Unknown),
    # Waits read first: the read timeout bounds them, not their own, longer timeout.
    ("wait", lambda store: store.wait(["absent"], timeout=HUNG), Unreachable),
    ("queue_pop", lambda store: store.queue_pop("queue", timeout=HUNG), Unreachable),
]


@pytest.mark.parametrize(
    ("call", "expected"),
    [pytest.param(call, expected, id=name) for name, call, expected in STORE_CALLS],
)
async def test_a_store_call_ends_within_the_read_timeout(
    frozen: rdzv.Connection,
    proxy: FaultProxy,
    store_prefix: str,
    call: StoreCall,
    expected: type[BaseException],
) -> None:
    """Each store call on a frozen etcd raises its error within one read timeout."""
    store = rdzv.AsyncEtcdStore(frozen, prefix=store_prefix)
    await store.set("key", b"old")  # the store's lease is granted: the call's write goes out
    proxy.hold()
    outcome, took = await timed(call(store))
    assert as_expected(outcome, expected), repr(outcome)
    assert took < READ_TIMEOUT + SLACK, f"took {took:.1f} s, then {outcome!r}"


# --------------------------------------------------------------------------------- rendezvous

RendezvousCall = Callable[[rdzv.AsyncRendezvous, rdzv.Membership], Awaitable[object]]

RENDEZVOUS_CALLS: list[tuple[str, RendezvousCall, object, float]] = [
    # A lost join is sent again until one deadline, not the join timeout; then the node
    # withdraws (it deletes its keys) within another.
    ("join", lambda node, _: node.join(b"again"), Unknown, 2 * READ_TIMEOUT),
    ("leave", lambda node, _: node.leave(), None, READ_TIMEOUT),
    # Closing twice is harmless: sent again until one deadline, then unresolved.
    ("close", lambda node, _: node.close(), Unknown, READ_TIMEOUT),
    (
        "wait_for_departure",
        lambda node, membership: node.wait_for_departure(membership, timeout=READ_TIMEOUT),
        False,
        READ_TIMEOUT,
    ),
]


@pytest.mark.parametrize(
    ("call", "expected", "bound"),
    [pytest.param(*row[1:], id=row[0]) for row in RENDEZVOUS_CALLS],
)
async def test_a_rendezvous_call_ends_within_its_bound(
    participants: Participants,
    frozen: rdzv.Connection,
    proxy: FaultProxy,
    call: RendezvousCall,
    expected: object,
    bound: float,
) -> None:
    """Each call of a member (that coordinates its round) on a frozen etcd ends in time."""
    node = participants(connection=frozen, join_timeout=600, lease_ttl=10)
    membership = await node.join(b"node")  # a round of its own
    proxy.hold()
    outcome, took = await timed(call(node, membership))
    assert as_expected(outcome, expected), repr(outcome)
    assert took < bound + SLACK, f"took {took:.1f} s, then {outcome!r}"


# --------------------------------------------------------------------------------- connection


async def test_aclose_returns_within_the_close_timeout(
    frozen: rdzv.Connection, proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """Connection.aclose with a keep-alive stream open to a frozen etcd returns in time."""
    await rdzv.AsyncEtcdBackend(frozen, "job", key_prefix=etcd_key_prefix).prepare()
    proxy.hold()
    outcome, took = await timed(frozen.aclose())
    assert outcome is None, repr(outcome)
    assert took < CLOSE_TIMEOUT + SLACK, f"aclose took {took:.1f} s"
