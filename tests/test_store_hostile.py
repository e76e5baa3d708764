"""AsyncEtcdStore's queues under hostile conditions: expired backlogs, slow links, foreign counters.

A queue's items expire with the store's lease, and its counters are plain etcd keys that any
program may write. Each test builds such a queue in etcd, under its own key prefix, with a raw
client where rdzv would not write it, and checks that the store's queue calls stay bounded in
time and in requests, keep the queue's order, and name a foreign value instead of crashing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import anyio
import pytest

import rdzv
from rdzv._store import AsyncEtcdStore
from rdzv.testing import FaultProxy
from support import LoseAnswers

pytestmark = pytest.mark.anyio

# The read timeout of the connection through the proxy.
READ_TIMEOUT = 2.0
# The timeout of the pops whose time is measured, and the slack on it, for busy machines:
# these tests check that a pop does not hang, not how fast it is.
POP_TIMEOUT = 0.5
SLACK = 1.5
# How many expired items a backlog has.
BACKLOG = 3000


@pytest.fixture
async def slow_store(proxy: FaultProxy, store_prefix: str) -> AsyncIterator[AsyncEtcdStore]:
    """The same store on a connection through the proxy, whose every byte is 20 ms late."""
    async with rdzv.connect(proxy.endpoint, read_timeout=READ_TIMEOUT) as connection:
        store = AsyncEtcdStore(connection, prefix=store_prefix)
        await store.queue_len("warm-up")  # the channel is open before the link slows down
        proxy.delay(0.02)
        yield store


class CountTransactions:
    """Wraps `Connection.txn` of a real connection and counts the transactions sent.

    Install it with `monkeypatch.setattr(connection, "txn", CountTransactions(connection))`.
    (Kept here rather than in support.py, which this change does not touch.)
    """

    def __init__(self, connection: rdzv.Connection) -> None:
        self._txn = connection.txn
        self.count = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Count the transaction, then run it."""
        self.count += 1
        return await self._txn(*args, **kwargs)


async def _add_expired(
    raw_etcd: aetcd.Client, store: AsyncEtcdStore, name: str, count: int
) -> None:
    """Make the queue `name` as if `count` more items were pushed and have expired since.

    The tail counter moves on by `count`, and no item is written: an expired item's key is
    gone, deleted with its lease.
    """
    key = store._queue_key(name)
    found = await raw_etcd.get(key)
    head, tail = (0, 0) if found is None else map(int, found.value.split())
    await raw_etcd.put(key, f"{head} {tail + count}".encode())


async def _drain(store: AsyncEtcdStore, name: str) -> list[bytes]:
    """Pop the queue `name` with a zero timeout until it is found empty."""
    popped: list[bytes] = []
    with contextlib.suppress(rdzv.StoreTimeoutError):
        while True:
            popped.append(await store.queue_pop(name, timeout=0))
    return popped


# ------------------------------------------------------------------------- expired items


async def test_pop_past_an_expired_backlog_on_a_slow_link_ends_within_its_timeout(
    slow_store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """A pop of a queue of 100 expired items, over a 20 ms link, ends within its timeout."""
    await _add_expired(raw_etcd, slow_store, "q", 100)
    started = time.monotonic()
    with pytest.raises(rdzv.StoreTimeoutError, match="'q'"):
        await slow_store.queue_pop("q", timeout=POP_TIMEOUT)
    assert time.monotonic() - started < POP_TIMEOUT + SLACK


async def test_pop_past_an_expired_backlog_takes_few_transactions(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    raw_etcd: aetcd.Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pop behind 3,000 expired items returns the live one in far fewer transactions."""
    await _add_expired(raw_etcd, store, "q", BACKLOG)
    await store.queue_push("q", b"live")
    transactions = CountTransactions(connection)
    monkeypatch.setattr(connection, "txn", transactions)
    started = time.monotonic()
    assert await store.queue_pop("q", timeout=POP_TIMEOUT) == b"live"
    assert time.monotonic() - started < POP_TIMEOUT + SLACK
    assert transactions.count <= BACKLOG // 50


async def test_pops_return_the_items_between_expired_ones_in_push_order(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """Live items among runs of expired ones come out in push order, then the queue is empty."""
    for index, expired in enumerate([200, 0, 150, 1, 300]):
        await _add_expired(raw_etcd, store, "q", expired)
        await store.queue_push("q", f"live-{index}".encode())
    await _add_expired(raw_etcd, store, "q", 400)
    assert await _drain(store, "q") == [f"live-{index}".encode() for index in range(5)]
    assert await store.queue_len("q") == 0


async def test_concurrent_pops_across_expired_items_get_each_live_item_once(
    store: AsyncEtcdStore, etcd_endpoints: str, store_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Poppers on two connections, racing past expired items, get every live item exactly once."""
    items = [f"item-{index}".encode() for index in range(20)]
    for index, item in enumerate(items):
        await _add_expired(raw_etcd, store, "q", (index * 37) % 150)
        await store.queue_push("q", item)
    popped: list[list[bytes]] = []
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as second:
        other = AsyncEtcdStore(second, prefix=store_prefix)

        async def drain(popper: AsyncEtcdStore) -> None:
            popped.append(await _drain(popper, "q"))

        async with anyio.create_task_group() as poppers:
            for popper in (store, other) * 3:
                poppers.start_soon(drain, popper)
    assert sorted(item for each in popped for item in each) == sorted(items)
    assert all(each == sorted(each, key=items.index) for each in popped)


@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_pop_past_expired_items_whose_answer_is_lost_returns_the_item_once(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    raw_etcd: aetcd.Client,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """A pop past expired items that landed, never landed, or landed late pops one item once."""
    await _add_expired(raw_etcd, store, "q", 100)
    await store.queue_push("q", b"a")
    await store.queue_push("q", b"b")
    # The pop of the expired head, then one read past the other 99; the pop of "a" is lost.
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing, skip=2))
    assert await store.queue_pop("q", timeout=POP_TIMEOUT) == b"a"
    monkeypatch.undo()
    assert await _drain(store, "q") == [b"b"]
    assert await store.queue_len("q") == 0


# ---------------------------------------------------------------------- foreign counters

FOREIGN_COUNTERS = [
    pytest.param(b"garbage", id="text"),
    pytest.param(b"5", id="one-number"),
    pytest.param(b"1 2 3", id="three-numbers"),
    pytest.param(b"3 1", id="head-after-tail"),
    pytest.param(b"-1 2", id="negative"),
    pytest.param(b"01 2", id="leading-zero"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe 1", id="not-utf8"),
    pytest.param(b"1 " + b"9" * 5000, id="huge-number"),
]


@pytest.mark.parametrize("value", FOREIGN_COUNTERS)
async def test_queue_len_of_foreign_counters_is_a_state_error(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client, value: bytes
) -> None:
    """queue_len of counters that rdzv did not write raises RendezvousStateError naming them."""
    key = store._queue_key("q")
    await raw_etcd.put(key, value)
    with pytest.raises(rdzv.RendezvousStateError) as raised:
        await store.queue_len("q")
    message = str(raised.value)
    assert repr(key) in message
    assert repr(value[:40]) in message
    assert len(message) < 400


async def test_queue_pop_of_foreign_counters_is_a_state_error(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """queue_pop of counters that rdzv did not write raises RendezvousStateError."""
    await raw_etcd.put(store._queue_key("q"), b"not counters")
    with pytest.raises(rdzv.RendezvousStateError, match="not counters"):
        await store.queue_pop("q", timeout=0)


async def test_queue_pop_of_counters_with_head_after_tail_is_a_state_error(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """queue_pop of counters "3 1" raises RendezvousStateError rather than waiting or popping."""
    await raw_etcd.put(store._queue_key("q"), b"3 1")
    with pytest.raises(rdzv.RendezvousStateError, match="'3 1'"):
        await store.queue_pop("q", timeout=0)


async def test_blocking_pop_that_sees_foreign_counters_appear_is_a_state_error(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """A pop waiting on an empty queue raises RendezvousStateError when foreign counters appear."""

    async def write_later() -> None:
        await anyio.sleep(0.2)
        await raw_etcd.put(store._queue_key("q"), b"x y")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(write_later)
            with pytest.raises(rdzv.RendezvousStateError, match="'x y'"):
                await store.queue_pop("q", timeout=5)


async def test_queue_push_onto_foreign_counters_is_a_state_error(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """queue_push onto foreign counters raises RendezvousStateError and writes nothing."""
    key = store._queue_key("q")
    await raw_etcd.put(key, b"7")
    with pytest.raises(rdzv.RendezvousStateError, match="'7'"):
        await store.queue_push("q", b"item")
    found = await raw_etcd.get(key)
    assert found is not None
    assert found.value == b"7"


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda store: store.check(["q"]), id="check"),
        pytest.param(lambda store: store.wait(["q"], timeout=0), id="wait"),
    ],
)
async def test_check_and_wait_on_foreign_counters_are_a_state_error(
    store: AsyncEtcdStore,
    raw_etcd: aetcd.Client,
    call: Callable[[AsyncEtcdStore], Awaitable[object]],
) -> None:
    """check and wait, which see a name's queue, raise RendezvousStateError for foreign counters."""
    await raw_etcd.put(store._queue_key("q"), b"1 2 3")
    with pytest.raises(rdzv.RendezvousStateError, match="'1 2 3'"):
        await call(store)
