"""`AsyncEtcdStore`: the async core of a c10d `Store` over etcd v3, with TCPStore's semantics.

A `torch.distributed.Store` subclass (`rdzv.torch.EtcdStore`) runs it on the facade's
event-loop thread; this module does not import torch. Keys are `str`, values `bytes`, timeouts
float seconds.

Each operation costs one etcd round trip in the common case: reads of several keys are one
transaction of `Get`s, `multi_set` is one transaction of `Put`s, and `add`, `append` and
`compare_set` are compare-and-swap transactions whose `Else` branch reads the key, so that a
conflict costs no extra read. Waiting for keys uses etcd's watch, started right after the read
that found them missing, never polling.

Queues (`queue_push`, `queue_pop`, `queue_len`) live apart from the keys, as in TCPStore: a queue
is a pair of counters, `b"head tail"`, at one reserved key, and its items at keys numbered from
`head` to `tail - 1`. A push or a pop is one compare-and-swap transaction of the counters that
also puts, or reads and deletes, the item; so two poppers never get the same item, and a lost
answer is resolved with a write id, like `add`'s. Items expire with the store's lease: a pop
that finds its item gone looks for the next ones that are not, many per read, and moves the head
past all the gone ones in the transaction that pops.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, Generic, TypeVar

import anyio

from rdzv._backend import DEFAULT_TTL
from rdzv._errors import (
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousOutcomeUnknownError,
    RendezvousStateError,
    RendezvousWatchCompactedError,
    StoreTimeoutError,
)
from rdzv._etcd import (
    AGAIN,
    Again,
    Compare,
    Connection,
    Delete,
    Get,
    KeyValue,
    Operation,
    Put,
    TxnResult,
    answer_itself,
    first_change_after,
    read_deadline,
    settle,
)
from rdzv._lease import RollingLease
from rdzv._validation import validate_store_prefix, validate_ttl

DEFAULT_STORE_PREFIX: Final = "/torch/elastic/store/"

# etcd refuses a transaction of more operations than its --max-txn-ops, 128 by default.
_MAX_TXN_OPS: Final = 128

# Under `prefix + _MARKERS + k`, add and append keep the write id of the last write to `k`, in
# the same transaction, so that a write whose answer was lost is recognised by that id. The
# NUL byte keeps markers apart from the names torch uses; `num_keys` does not count them.
_MARKERS: Final = "\x00rdzv-write-id/"
# Every key rdzv keeps for itself starts with this: markers, and the queues below. Store names
# that start with it are refused, and `num_keys` and `list_keys` leave such keys out.
_RESERVED: Final = "\x00rdzv-"
# The counters of queue `q`, `b"head tail"`, are at `prefix + _QUEUES + q`; its item number `n`
# at `prefix + _QUEUE_ITEMS + q + "/" + n` (20 digits, so that a queue's items sort in order).
_QUEUES: Final = "\x00rdzv-queue/"
_QUEUE_ITEMS: Final = "\x00rdzv-queue-item/"
# A pop looks past expired items this many at a time: one transaction reads the counters and
# whether each of the next items still exists.
_PROBE_SIZE: Final = _MAX_TXN_OPS - 1
# A queue_pop that finds items may go on this long past its timeout to take one: it looks past
# expired items for half of it, and its last requests end by the end of it. So a zero timeout
# (torch's non-blocking pop) still takes an item that is there.
_POP_GRACE: Final = 1.0
_WRITE_ID_SIZE: Final = 16
T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("rdzv.store")

# What TCPStore's `add` writes (std::to_string of an int64), with an optional sign.
_INTEGER: Final = re.compile(rb"[+-]?[0-9]+")
# What rdzv writes at a queue's counters key: head and tail, canonical decimals below 10**19
# (an item's number is written with 20 digits).
_COUNTERS: Final = re.compile(rb"(0|[1-9][0-9]{0,18}) (0|[1-9][0-9]{0,18})")


def _validate_timeout(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(
            "The timeout must be a number of seconds, at least 0 (math.inf waits forever), "
            f"not {timeout!r}."
        )
    return float(timeout)


def _as_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(
            f"The store {what} must be bytes, not {type(value).__name__} (encode strings first)."
        )
    return bytes(value)


def _shown(value: bytes) -> str:
    """A stored value for an error message: escaped, and cut short after 40 bytes."""
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} bytes)"


def _parse_integer(key: str, value: bytes) -> int:
    if not _INTEGER.fullmatch(value):
        raise ValueError(
            f"Cannot add to the store key {key!r}: its value {_shown(value)} is not a decimal "
            "integer."
        )
    return int(value)


def _holds(found: KeyValue | None, expected: bytes, empty_at: int | None) -> bool:
    """Whether a compare_set's condition still holds for the key `found`.

    The condition is: the value is `expected`; or, for an empty `expected`, the key is absent
    (`empty_at` None) or still holds the empty value written at `empty_at`.
    """
    if expected:
        return found is not None and found.value == expected
    if empty_at is None:
        return found is None
    return found is not None and found.mod_revision == empty_at


def _queue_bounds(key: bytes, value: bytes | None) -> tuple[int, int]:
    """The `(head, tail)` counters of a queue, from the value of its counters key `key` (or None).

    Raises `RendezvousStateError` for a value that rdzv does not write there.
    """
    if value is None:
        return 0, 0
    counters = _COUNTERS.fullmatch(value)
    if counters is not None and int(counters[1]) <= int(counters[2]):
        return int(counters[1]), int(counters[2])
    raise RendezvousStateError(
        f'The store queue counters at key {key!r} hold {_shown(value)}, not the "head tail" '
        "that rdzv writes (two decimal numbers, head <= tail): another program wrote them. Use "
        "another store prefix, or delete the key."
    )


def _queue_length(key: bytes, value: bytes | None) -> int:
    head, tail = _queue_bounds(key, value)
    return tail - head


@dataclasses.dataclass(frozen=True)
class _QueueStep:
    """One change of a queue: its new counters, and the item pushed (`value`) or popped (None).

    A step with no `item` only moves the head past items that are gone (expired).
    `read_at` is the mod revision of the counters it was planned on (0: the queue was absent).
    """

    counters: bytes
    item: bytes | None
    value: bytes | None
    read_at: int

    def operations(self, lease: int) -> list[Operation]:
        """What the transaction does to the item, before it writes the counters."""
        if self.item is None:
            return []
        if self.value is not None:
            return [Put(self.item, self.value, lease)]
        # Read, then delete: the transaction's answer carries the item it popped.
        return [Get(self.item), Delete(self.item)]


class _Gone:
    """The numbers of a queue's items found gone (expired) below its tail: they stay gone.

    Only a push writes an item, at the tail, so an item below the tail that is gone never comes
    back while the counters key lives. Counters created anew (the old ones expired, and a push
    started the queue again from 0) number their items again: what was found is then forgotten.
    `created` is the create revision of the counters that the numbers belong to.
    """

    def __init__(self, created: int) -> None:
        self._created = created
        self._numbers: set[int] = set()

    def add(self, number: int, created: int) -> None:
        """Note that item `number`, below the tail of the counters created at `created`, is gone."""
        if created != self._created:
            self._created = created
            self._numbers.clear()
        self._numbers.add(number)

    def next_item(self, head: int, tail: int, created: int) -> int:
        """The first number from `head` not known to be gone (`tail` if none is below it)."""
        number = head
        if created == self._created:
            while number < tail and number in self._numbers:
                number += 1
        return number


@dataclasses.dataclass(frozen=True)
class _Swap(Generic[T]):
    """One planned compare-and-swap: what it achieves, and the operations that write it."""

    outcome: T
    """What the caller gets if this attempt lands (the value written, the queue step)."""
    operations: Callable[[int], list[Operation]]
    """The transaction's writes on the store's lease (the marker's is added to them)."""


class AsyncEtcdStore:
    """A c10d key-value store kept in etcd under one key prefix, with TCPStore's semantics.

    Key `k` lives at the etcd key `prefix + k` (UTF-8), and its value is stored as it is, with no
    envelope, so that etcdctl and other tools read it plainly. Every write is attached to the
    store's lease of `ttl` seconds, which each write of the store refreshes: a key expires
    `ttl` seconds after the store's last write on that lease (its own last write, or a later
    one to another key), so a finished job's keys expire `ttl` seconds after its last write.
    Any number of stores may share one `rdzv.Connection`.

    Every call is bounded by the connection's read timeout, and the calls that wait for keys
    also by their own `timeout`.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        prefix: str = DEFAULT_STORE_PREFIX,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        self._connection = connection
        self._prefix = validate_store_prefix(prefix)
        self._prefix_bytes = self._prefix.encode()
        self._markers = (self._prefix + _MARKERS).encode()
        self._reserved = (self._prefix + _RESERVED).encode()
        self._ttl = validate_ttl(ttl)
        self._lease = RollingLease(connection, self._ttl)

    def __repr__(self) -> str:
        return (
            f"<rdzv.AsyncEtcdStore prefix={self._prefix!r} ttl={self._ttl} on {self._connection!r}>"
        )

    @property
    def prefix(self) -> str:
        """The etcd key prefix of the store's keys; it ends with '/'."""
        return self._prefix

    # ------------------------------------------------------------------------------- writes

    async def set(self, key: str, value: bytes) -> None:
        """Write `value` at `key`, replacing any value it has."""
        key_bytes, data = self._key(key), _as_bytes(value, "value")
        deadline = read_deadline(self._connection)
        await self._lease.run(
            lambda lease: self._connection.put(key_bytes, data, lease=lease, deadline=deadline),
            deadline=deadline,
        )

    async def multi_set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        """Write `values[i]` at `keys[i]` for every `i`, in one transaction.

        A key given twice gets its last value. Beyond 128 distinct keys (etcd's default limit on
        the operations of one transaction), the keys are written 128 at a time: each group
        atomically, but not all of them at once.
        """
        self._names(keys)  # rejects a single str, or a key that is not a str, up front
        if isinstance(values, bytes | bytearray | memoryview | str):
            raise TypeError("multi_set needs a sequence of values, not a single value.")
        if len(values) != len(keys):
            raise ValueError(
                f"multi_set needs one value per key: got {len(keys)} keys and {len(values)} values."
            )
        # etcd refuses a transaction that names a key twice; the last value wins, as it would
        # if the keys were set one after another.
        pairs = {
            self._key(key): _as_bytes(value, "value")
            for key, value in zip(keys, values, strict=True)
        }
        items = list(pairs.items())
        deadline = read_deadline(self._connection)  # one for the whole call, however many groups
        for start in range(0, len(items), _MAX_TXN_OPS):
            await self._put_all(items[start : start + _MAX_TXN_OPS], deadline)

    async def add(self, key: str, amount: int) -> int:
        """Add `amount` to the integer at `key` (0 if absent), atomically; return the new value.

        The value is stored as decimal ASCII (`b"5"`). Raises `ValueError`, writing nothing, if
        the key holds something else.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"The amount to add must be an int, not {type(amount).__name__}.")

        def increment(current: bytes | None) -> bytes:
            base = 0 if current is None else _parse_integer(key, current)
            return str(base + amount).encode()

        return int(await self._update(key, increment))

    async def append(self, key: str, value: bytes) -> None:
        """Append `value` to the bytes at `key`, atomically; create the key if it is absent."""
        data = _as_bytes(value, "value")
        await self._update(key, lambda current: data if current is None else current + data)

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set `key` to `desired` if it holds `expected`; return `desired` if so.

        Otherwise nothing is written and the key's current value is returned. As in TCPStore,
        an absent key matches an empty `expected`; an absent key with a non-empty `expected`
        returns `expected`.
        """
        key_bytes = self._key(key)
        expected = _as_bytes(expected, "expected value")
        desired = _as_bytes(desired, "desired value")
        return await _CompareSet(self, key, key_bytes, expected, desired).run()

    async def delete_key(self, key: str) -> bool:
        """Delete `key`; return whether it existed."""
        # A delete retried after its first attempt landed unseen reports False: a rare
        # misreport, but never a wrong store.
        # The key's marker stays, until its lease expires: a write whose answer was lost is
        # looked for in the marker's history (see `_landed_since`).
        key_bytes = self._key(key)
        operations: list[Operation] = [Get(key_bytes, count_only=True), Delete(key_bytes)]
        result = await self._retrying(
            lambda deadline: self._connection.txn([], operations, deadline=deadline)
        )
        return result.counts[0] > 0

    # -------------------------------------------------------------------------------- reads

    async def get(self, key: str, *, timeout: float) -> bytes:
        """Return the value of `key`, waiting up to `timeout` seconds for the key to be set.

        Raises:
            StoreTimeoutError: the key did not exist within `timeout` seconds.
        """
        [value] = await self.multi_get([key], timeout=timeout)
        return value

    async def multi_get(self, keys: Sequence[str], *, timeout: float) -> list[bytes]:
        """Return the values of `keys`, in order, once they all exist; wait up to `timeout`.

        The values are read together: they are the keys' values at one etcd revision.

        Raises:
            StoreTimeoutError: some keys did not exist within `timeout` seconds.
        """
        names = self._names(keys)
        values = await self._wait_for(names, timeout)
        return [values[self._key(key)] for key in keys]

    async def wait(self, keys: Sequence[str], *, timeout: float) -> None:
        """Return once every key in `keys` exists; wait up to `timeout` seconds.

        As in TCPStore, a name also counts as existing while the queue of that name is not
        empty.

        Raises:
            StoreTimeoutError: some keys did not exist within `timeout` seconds; the message
                names them.
            RendezvousStateError: the counters of a queue of one of those names hold a value
                that rdzv does not write.
        """
        await self._wait_for(self._names(keys), timeout, queues=True)

    async def check(self, keys: Sequence[str]) -> bool:
        """Return whether every key in `keys` exists now, without waiting.

        As in TCPStore, a name also counts as existing while the queue of that name is not
        empty. Raises `RendezvousStateError` if the counters of such a queue hold a value that
        rdzv does not write.
        """
        names = self._names(keys)
        if not names:
            return True
        found, _ = await self._read(self._with_queues(names))
        return not self._missing(names, found, queues=True)

    async def num_keys(self) -> int:
        """Return the number of keys in the store (the etcd keys under its prefix, but rdzv's own).

        Queues are not keys: as in TCPStore, they are not counted.
        """
        counts = [Get(self._prefix_bytes, prefix=True, count_only=True)]
        counts.append(Get(self._reserved, prefix=True, count_only=True))
        result = await self._retrying(
            lambda deadline: self._connection.txn([], counts, deadline=deadline)
        )
        return result.counts[0] - result.counts[1]

    async def list_keys(self) -> list[str]:
        """Return the names of the store's keys, in etcd's key order; queues are not keys.

        It reads every key and value of the store, in one request.
        """
        kvs, _ = await self._connection.range(self._prefix_bytes, prefix=True)
        start = len(self._prefix_bytes)
        return [
            kv.key[start:].decode(errors="replace")
            for kv in kvs
            if not kv.key.startswith(self._reserved)
        ]

    # ------------------------------------------------------------------------------- queues

    async def queue_push(self, key: str, value: bytes) -> None:
        """Add `value` at the end of the queue `key`, creating the queue if it is absent.

        A queue is not a key: `get`, `set`, `add`, `delete_key`, `num_keys` and `list_keys` do
        not see it, and a key and a queue may have the same name. `check` and `wait` see a queue
        while it is not empty. Items are written on the store's lease and expire as keys do;
        `queue_pop` skips an expired item.
        """
        data = _as_bytes(value, "value")
        counters_key = self._queue_key(key)  # rejects a reserved name before anything is sent

        def push(counters: KeyValue | None) -> _QueueStep:
            head, tail = _queue_bounds(counters_key, None if counters is None else counters.value)
            return _QueueStep(
                counters=f"{head} {tail + 1}".encode(),
                item=self._queue_item(key, tail),
                value=data,
                read_at=0 if counters is None else counters.mod_revision,
            )

        # Tried first as the queue's creation: for an existing queue, the failed attempt reads
        # its counters, which costs what a read would have.
        await self._change_queue(key, push, None)

    async def queue_pop(self, key: str, *, timeout: float) -> bytes:
        """Remove and return the oldest item of the queue `key`; wait up to `timeout` seconds.

        Items come out in the order their pushes landed in etcd; expired items are skipped,
        many per request. Of any number of concurrent poppers, in any number of processes, each
        item goes to exactly one. An empty queue is waited for with etcd's watch; a zero
        `timeout` does not wait.

        The whole call ends within `timeout`, or, when it has found items, within one second
        more (each request also within the read timeout): enough to look past expired items and
        take one, so that a zero `timeout` still pops an item that is there.

        Raises:
            StoreTimeoutError: no item could be popped within the timeout: the queue stayed
                empty, or held only expired items.
            RendezvousStateError: the queue's counters hold a value that rdzv does not write.
            RendezvousOutcomeUnknownError: the pop's answer was lost, and etcd could not tell
                in time whether it landed: the item may have been taken.
        """
        seconds = _validate_timeout(timeout)
        counters_key = self._queue_key(key)
        deadline = time.monotonic() + seconds
        limit = deadline + _POP_GRACE  # every request ends by then
        while True:
            kvs, revision = await self._connection.range(
                counters_key, deadline=self._request_deadline(limit)
            )
            counters = kvs[0] if kvs else None
            if counters is not None and _queue_length(counters_key, counters.value) > 0:
                popped = await self._pop(key, counters, deadline + _POP_GRACE / 2, limit)
                if popped is not None:
                    return popped
                if time.monotonic() >= deadline:
                    raise StoreTimeoutError(
                        f"The store queue {key!r} (under {self._prefix!r}) had no unexpired "
                        f"item to pop within the timeout of {seconds:g} s."
                    )
                continue  # another popper was first, or the items had expired: look again
            found = {} if counters is None else {counters_key: counters.value}
            try:
                with anyio.move_on_after(deadline - time.monotonic()):
                    await self._watch_until(
                        [counters_key],
                        found,
                        revision,
                        lambda found: _queue_length(counters_key, found.get(counters_key)) > 0,
                    )
                    continue
            except RendezvousWatchCompactedError:
                continue  # etcd compacted away the revisions just after our read: read again
            raise StoreTimeoutError(
                f"The store queue {key!r} (under {self._prefix!r}) stayed empty for the timeout "
                f"of {seconds:g} s."
            )

    async def queue_len(self, key: str) -> int:
        """Return the number of items in the queue `key` (0 if there is no such queue).

        Items that have expired and not yet been popped past are counted.

        Raises:
            RendezvousStateError: the queue's counters hold a value that rdzv does not write.
        """
        counters_key = self._queue_key(key)
        counters = await self._connection.get(counters_key)
        return _queue_length(counters_key, None if counters is None else counters.value)

    # ---------------------------------------------------------------------------- internals

    def _key(self, key: str) -> bytes:
        if not isinstance(key, str):
            raise TypeError(f"A store key must be a str, not {type(key).__name__}.")
        if key.startswith(_RESERVED):
            raise ValueError(f"Store keys that start with {_RESERVED!r} are reserved for rdzv.")
        return (self._prefix + key).encode()

    def _queue_key(self, key: str) -> bytes:
        """Where the counters (`b"head tail"`) of the queue `key` are kept."""
        self._key(key)  # the same rules as a key's name
        return (self._prefix + _QUEUES + key).encode()

    def _queue_item(self, key: str, number: int) -> bytes:
        return f"{self._prefix}{_QUEUE_ITEMS}{key}/{number:020d}".encode()

    def _with_queues(self, names: dict[bytes, str]) -> dict[bytes, str]:
        """`names`, and the counters key of the queue of each name."""
        return names | {self._queue_key(name): name for name in names.values()}

    def _missing(
        self, names: dict[bytes, str], found: dict[bytes, bytes], *, queues: bool
    ) -> list[str]:
        """The names of `names` not in `found` (nor, with `queues`, a non-empty queue there)."""
        return [
            name
            for key, name in names.items()
            if key not in found and not (queues and self._queue_found(name, found))
        ]

    def _queue_found(self, name: str, found: dict[bytes, bytes]) -> bool:
        """Whether `found` holds counters of a non-empty queue `name`."""
        counters_key = self._queue_key(name)
        return _queue_length(counters_key, found.get(counters_key)) > 0

    def _marker(self, key: bytes) -> bytes:
        """Where the write id of the last add, append or compare_set of `key` is kept."""
        return self._markers + key[len(self._prefix_bytes) :]

    def _names(self, keys: Sequence[str]) -> dict[bytes, str]:
        """The distinct etcd keys of `keys`, in order, each with the name it was given by."""
        if isinstance(keys, str):
            raise TypeError(f"Expected a sequence of store keys, not the single str {keys!r}.")
        return {self._key(key): key for key in keys}

    async def _retrying(
        self, attempt: Callable[[float], Awaitable[TxnResult]], deadline: float | None = None
    ) -> TxnResult:
        """Run `attempt(deadline)` again while its outcome is unknown, all by one deadline.

        For transactions that may run twice: reads, and unconditional writes of the same values.
        The deadline is the read timeout from now, unless given.
        """
        limit = read_deadline(self._connection) if deadline is None else deadline

        async def lost() -> Again:
            if time.monotonic() < limit:  # else it is not sent again: the call ends unresolved
                logger.info(
                    "A store write lost its answer; sending it again (it may land twice, "
                    "harmlessly)",
                    extra={"rdzv_outcome": "sent again"},
                )
            return AGAIN

        return await settle(
            lambda: attempt(limit), answered=answer_itself, lost=lost, deadline=limit
        )

    async def _put_all(self, items: Sequence[tuple[bytes, bytes]], deadline: float) -> None:
        async def put_all(deadline: float) -> TxnResult:
            async def write(lease: int) -> TxnResult:
                puts = [Put(key, value, lease) for key, value in items]
                return await self._connection.txn([], puts, deadline=deadline)

            return await self._lease.run(write, deadline=deadline)

        # Unconditional writes of the same values: landing twice is landing once.
        await self._retrying(put_all, deadline)

    async def _write_if(
        self, condition: Compare, key: bytes, value: bytes, write_id: bytes, deadline: float
    ) -> TxnResult:
        """If `condition` holds, write `value` at `key` and `write_id` at its marker; else read."""

        async def write(lease: int) -> TxnResult:
            puts = [Put(key, value, lease), Put(self._marker(key), write_id, lease)]
            return await self._connection.txn(
                [condition], puts, [Get(key)], what=f"write {key!r}", deadline=deadline
            )

        return await self._lease.run(write, deadline=deadline)

    async def _landed_since(
        self, key: str, write_id: bytes, revision: int, deadline: float
    ) -> bool:
        """Whether a write with `write_id`, sent after `revision`, has landed at `key`.

        Every store write that conditions on a value puts its write id at the key's marker in
        the same transaction, and markers are never deleted (they expire with their lease), so
        the marker's history after `revision` up to its current version is complete: the write
        landed iff our id is in it. Raises `RendezvousOutcomeUnknownError` if etcd cannot tell
        by `deadline` (or has compacted that history).
        """
        marker = self._marker(self._key(key))

        async def search() -> bool:
            now = await self._connection.get(marker, deadline=deadline)
            if now is None or now.mod_revision <= revision:
                return False
            if now.value == write_id:
                return True
            changes = self._connection.watch(marker, start_revision=revision + 1)
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    async for event in changes:
                        if not event.deleted and event.kv.value == write_id:
                            return True
                        if event.kv.mod_revision >= now.mod_revision:
                            return False
            except TimeoutError:
                raise RendezvousConnectionError("etcd did not replay the history in time") from None
            finally:
                await changes.aclose()
            return False

        return await self._resolving(key, search())

    async def _read(self, keys: Collection[bytes]) -> tuple[dict[bytes, bytes], int]:
        """The values of those of `keys` that exist, and the etcd revision they were read at."""
        if len(keys) == 1:
            kvs, revision = await self._connection.range(next(iter(keys)))
        elif len(keys) <= _MAX_TXN_OPS:
            gets = [Get(key) for key in keys]
            result = await self._retrying(
                lambda deadline: self._connection.txn([], gets, deadline=deadline)
            )
            kvs = tuple(kv for found in result.ranges for kv in found)
            revision = result.revision
        else:
            # Too many keys for one transaction: read the whole store instead, still at one
            # revision.
            kvs, revision = await self._connection.range(self._prefix_bytes, prefix=True)
        return {kv.key: kv.value for kv in kvs if kv.key in keys}, revision

    async def _wait_for(
        self, names: dict[bytes, str], timeout: float, *, queues: bool = False
    ) -> dict[bytes, bytes]:
        """The values of the keys `names`, once they all exist at once; bounded by `timeout`.

        With `queues`, a name whose queue is not empty counts as existing (its value is then
        not in the result).
        """
        seconds = _validate_timeout(timeout)
        if not names:
            return {}
        watched = self._with_queues(names) if queues else names
        deadline = anyio.current_time() + seconds

        def complete(found: dict[bytes, bytes]) -> bool:
            return not self._missing(names, found, queues=queues)

        while True:
            found, revision = await self._read(watched)
            if complete(found):
                return found
            try:
                with anyio.CancelScope(deadline=deadline):
                    await self._watch_until(watched, found, revision, complete)
                    return found
            except RendezvousWatchCompactedError:
                # etcd compacted away the revisions just after our read: read again.
                continue
            missing = ", ".join(repr(name) for name in self._missing(names, found, queues=queues))
            raise StoreTimeoutError(
                f"The store keys {missing} (under {self._prefix!r}) did not appear within the "
                f"timeout of {seconds:g} s."
            )

    async def _watch_until(
        self,
        keys: Collection[bytes],
        found: dict[bytes, bytes],
        revision: int,
        done: Callable[[dict[bytes, bytes]], bool],
    ) -> None:
        """Apply every change of `keys` after `revision` to `found` until `done(found)`."""
        # Starting right after the read's revision, no write between the read and the watch is
        # missed. More than two keys share one stream, on the store's prefix; one or two (a key
        # and its queue) get a stream each, so that a waiter is not woken by every write to the
        # store (torch's store barrier has every rank add to one key while all wait for another).
        if len(keys) > 2:
            await self._apply_changes(self._prefix_bytes, keys, found, revision, done, prefix=True)
            return
        if len(keys) == 1:
            await self._apply_changes(next(iter(keys)), keys, found, revision, done)
            return
        errors: list[Exception] = []
        async with anyio.create_task_group() as watches:

            async def follow(key: bytes) -> None:
                try:
                    await self._apply_changes(key, keys, found, revision, done)
                except Exception as error:  # raised below, rather than as an ExceptionGroup
                    errors.append(error)
                watches.cancel_scope.cancel()

            for key in keys:
                watches.start_soon(follow, key)
        if errors:
            raise errors[0]

    async def _apply_changes(
        self,
        watched: bytes,
        keys: Collection[bytes],
        found: dict[bytes, bytes],
        revision: int,
        done: Callable[[dict[bytes, bytes]], bool],
        *,
        prefix: bool = False,
    ) -> None:
        """Apply the changes of `keys` at `watched` (or under it) to `found` until `done`."""
        changes = self._connection.watch(watched, start_revision=revision + 1, prefix=prefix)
        try:
            async for event in changes:
                key = event.kv.key
                if key not in keys:
                    continue
                if event.deleted:
                    found.pop(key, None)
                else:
                    found[key] = event.kv.value
                if done(found):
                    return
        finally:
            await changes.aclose()

    async def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Replace the value `v` at `key` (`None` if absent) by `change(v)`, atomically.

        One compare-and-swap (see `_swap`), first assuming the key is absent. Returns the
        value written.
        """
        key_bytes = self._key(key)

        def plan(current: KeyValue | None) -> _Swap[bytes]:
            value = change(None if current is None else current.value)
            return _Swap(value, lambda lease: [Put(key_bytes, value, lease)])

        landed = await self._swap(key, key_bytes, plan, None, ("write", "update the store key"))
        assert landed is not None  # `plan` always has a change to make
        return landed[0]

    async def _swap(
        self,
        name: str,
        key: bytes,
        plan: Callable[[KeyValue | None], _Swap[T] | None],
        current: KeyValue | None,
        what: tuple[str, str],
        deadline: float | None = None,
    ) -> tuple[T, TxnResult | None] | None:
        """Apply `plan(current)` by compare-and-swap on `key`; each write lands exactly once.

        `current` is the first guess of `key` (None: absent). One transaction per attempt,
        conditioned on the key being as the attempt's plan read it; a failed attempt reads the
        key in the same transaction, and the next is planned on that. Every attempt also puts
        this call's random write id at the key's marker, so that an attempt whose answer was
        lost is recognised as ours by that id alone (see `_lost_write_landed`), never applied
        twice. Returns what the plan that landed said, with the transaction's result (None if
        its answer was lost), or None once `plan` finds nothing to do. `name` is the store's
        name of the key, `what` the kind of write for logs and the verb for errors. Every
        request ends by `deadline` (by default, the read timeout from now).
        """
        swapping = _Swapping(self, name, key, plan, what, deadline)
        return await swapping.run() if swapping.replan(current) else None

    async def _lost_write_landed(
        self,
        key: bytes,
        write_id: bytes,
        lost: dict[int | None, T],
        current: KeyValue | None,
        deadline: float,
    ) -> T | None:
        """What a lost attempt wrote (`lost`'s value) if one landed, else `None`; prunes `lost`.

        `current` is the key as read after the attempts were sent. An attempt conditioned on
        mod revision R, if it landed, is the first change of the key after R (its condition
        held, so nothing came between), and it put our write id at the marker in the same
        revision. An attempt conditioned on absence, if it landed, created the key: if the
        key's current incarnation was created with our write id, it is ours. Attempts whose
        condition no longer holds can never land later and are forgotten.
        """
        marker = self._marker(key)
        for condition, value in list(lost.items()):
            if condition is None:
                if current is None:
                    continue  # not landed yet (or landed and deleted since: see docs)
                revision: int | None = current.create_revision
            elif current is not None and current.mod_revision == condition:
                continue  # not landed yet; it may still land
            else:
                change = await first_change_after(
                    self._connection, key, condition, deadline=deadline
                )
                revision = None if change.deleted else change.kv.mod_revision
            del lost[condition]
            if revision is None:
                continue
            ours = await self._connection.get(marker, revision=revision, deadline=deadline)
            if ours is not None and ours.mod_revision == revision and ours.value == write_id:
                return value
        return None

    async def _change_queue(
        self,
        key: str,
        plan: Callable[[KeyValue | None], _QueueStep | None],
        counters: KeyValue | None,
        deadline: float | None = None,
    ) -> tuple[_QueueStep, TxnResult | None] | None:
        """Apply `plan(counters)` to the queue `key` once, by compare-and-swap of its counters.

        `counters` is the first guess of the queue's counters key. Returns the step that
        landed with the transaction's result (None if the answer was lost), or None once
        `plan` finds nothing to do (see `_swap`). Every request ends by `deadline`.
        """
        counters_key = self._queue_key(key)

        def swap(current: KeyValue | None) -> _Swap[_QueueStep] | None:
            step = plan(current)
            if step is None:
                return None
            return _Swap(
                step,
                lambda lease: [*step.operations(lease), Put(counters_key, step.counters, lease)],
            )

        what = ("queue change", "change the store queue")
        return await self._swap(key, counters_key, swap, counters, what, deadline)

    async def _pop(
        self, key: str, counters: KeyValue, probe_until: float, limit: float
    ) -> bytes | None:
        """Pop the oldest item of the queue `key` that has not expired; None if none was popped.

        `counters` are the queue's counters, just read, of a non-empty queue. The head item is
        popped at once: one transaction in the common case. If it had expired, the next items
        are looked for `_PROBE_SIZE` per read (`_probe`), until `probe_until`; then one
        transaction moves the head past every item found gone and pops the first one that is
        not, by compare-and-swap of the counters like any pop. Returns None, having popped
        nothing, if the queue was found empty or holding only gone items (the head is then
        moved to the tail), or if time ran out while every item looked at had expired. Every
        request ends by `limit`, and by its read timeout.
        """
        counters_key = self._queue_key(key)
        gone = _Gone(counters.create_revision)

        def pop(current: KeyValue | None) -> _QueueStep | None:
            if current is None:
                return None
            head, tail = _queue_bounds(counters_key, current.value)
            if head >= tail:
                return None
            number = gone.next_item(head, tail, current.create_revision)
            return _QueueStep(
                counters=f"{min(number + 1, tail)} {tail}".encode(),
                item=self._queue_item(key, number) if number < tail else None,
                value=None,
                read_at=current.mod_revision,
            )

        current: KeyValue | None = counters
        while True:
            deadline = self._request_deadline(limit)
            landed = await self._change_queue(key, pop, current, deadline)
            if landed is None:
                return None  # found empty
            step, result = landed
            if step.item is None:
                return None  # every item left was gone: the head moved to the tail
            if result is not None:
                items = result.ranges[0]  # the transaction's Get of the item
                if items:
                    return items[0].value
            else:
                # The answer was lost: the item is read as it was when the pop was planned (it
                # was pushed before, and only this pop deleted it).
                get = self._connection.get(step.item, revision=step.read_at, deadline=deadline)
                item = await self._resolving(key, get)
                if item is not None:
                    return item.value
            # The item had expired: look for the next ones that have not, many per read.
            if time.monotonic() >= probe_until:
                return None
            head, _ = _queue_bounds(counters_key, step.counters)
            current = await self._probe(key, head, gone, probe_until, limit)

    async def _probe(
        self, key: str, start: int, gone: _Gone, until: float, limit: float
    ) -> KeyValue | None:
        """Read which items of the queue `key` from number `start` on are gone, into `gone`.

        Each read is one transaction: the counters, and whether each of the next `_PROBE_SIZE`
        items exists, at one revision. Reads go on until one finds an item that exists, or
        reaches the tail, or `until` has passed. Returns the counters as last read (None if
        the queue is gone). Every request ends by `limit`.
        """
        counters_key = self._queue_key(key)
        while True:
            numbers = range(start, start + _PROBE_SIZE)
            reads = [Get(counters_key)]
            reads += [Get(self._queue_item(key, number), count_only=True) for number in numbers]
            result = await self._connection.txn([], reads, deadline=self._request_deadline(limit))
            current = result.ranges[0][0] if result.ranges[0] else None
            if current is None:
                return None
            head, tail = _queue_bounds(counters_key, current.value)
            for number, count in zip(numbers, result.counts[1:], strict=True):
                if number >= tail:
                    return current  # not pushed yet
                if number < head:
                    continue  # popped since
                if count:
                    return current  # an item that has not expired
                gone.add(number, current.create_revision)
            start = max(numbers.stop, head)
            if start >= tail or time.monotonic() >= until:
                return current

    def _request_deadline(self, limit: float) -> float:
        """The deadline of a request sent now, within the read timeout and by `limit`."""
        return min(read_deadline(self._connection), limit)

    async def _resolving(self, key: str, resolution: Awaitable[T]) -> T:
        """`resolution`, or `RendezvousOutcomeUnknownError` if etcd cannot settle it in time."""
        try:
            return await resolution
        except (RendezvousCompactedError, RendezvousConnectionError) as error:
            raise self._unresolved(key) from error

    def _unresolved(self, key: str) -> RendezvousOutcomeUnknownError:
        logger.warning(
            "A write to the store key %r lost its answer, and rdzv could not find out in time "
            "whether it landed",
            key,
            extra={"rdzv_key": key, "rdzv_outcome": "unresolved"},
        )
        return RendezvousOutcomeUnknownError(
            f"A write to the store key {key!r} may or may not have landed, and rdzv could not "
            "find out within the read timeout.",
            key=self._prefix + key,
        )


def _log_lost(key: str, what: str) -> None:
    logger.info(
        "A %s of the store key %r lost its answer; finding out whether it landed",
        what,
        key,
        extra={"rdzv_key": key},
    )


def _log_resolved(key: str, what: str, outcome: str) -> None:
    logger.info(
        "The lost answer to a %s of the store key %r is resolved: %s",
        what,
        key,
        outcome,
        extra={"rdzv_key": key, "rdzv_outcome": outcome},
    )


class _MarkedWrite(abc.ABC, Generic[R]):
    """A store write that puts this call's random write id at its key's marker in every attempt.

    An attempt whose answer was lost is then recognised as this call's by that id alone, and is
    never applied twice. `run` drives the write with `settle`; each kind says what to send and
    what an answer, or a lost answer, means.
    """

    def __init__(self, store: AsyncEtcdStore, name: str, deadline: float | None) -> None:
        self._store = store
        self._connection = store._connection
        self._name = name  # the store's name of the key, for logs and errors
        self._write_id = os.urandom(_WRITE_ID_SIZE)
        self._deadline = read_deadline(self._connection) if deadline is None else deadline

    async def run(self) -> R:
        """Send the write until its outcome is known, by the deadline, and return it."""
        return await settle(
            self._send,
            answered=self._answered,
            lost=self._lost,
            unresolved=lambda _: self._store._unresolved(self._name),
            deadline=self._deadline,
        )

    @abc.abstractmethod
    async def _send(self) -> TxnResult:
        """One attempt."""

    @abc.abstractmethod
    async def _answered(self, result: TxnResult, after_lost: bool) -> R | Again:
        """What an answer means (see `settle`)."""

    @abc.abstractmethod
    async def _lost(self) -> R | Again:
        """What a lost answer means (see `settle`)."""


class _CompareSet(_MarkedWrite[bytes]):
    """One `compare_set` call: its condition, which changes, and what its lost attempts left.

    An empty `expected` matches an absent key or an empty value. etcd's value comparison never
    matches an absent key, so an empty value found instead takes a second transaction,
    conditioned on its revision (`empty_at`). An attempt whose answer was lost is looked for in
    the marker's history after the revision this connection knew before it left (see
    `AsyncEtcdStore._landed_since`).
    """

    def __init__(
        self, store: AsyncEtcdStore, name: str, key: bytes, expected: bytes, desired: bytes
    ) -> None:
        super().__init__(store, name, None)
        self._key = key
        self._expected = expected
        self._desired = desired
        self._empty_at: int | None = None
        self._floor = 0  # the connection's revision before the attempt just sent
        self._lost_after: int | None = None  # the floor of the first attempt that lost its answer

    async def _send(self) -> TxnResult:
        """One attempt: if the condition holds, write the value and our write id; else read."""
        if self._expected:
            condition = Compare.value_is(self._key, self._expected)
        elif self._empty_at is None:
            condition = Compare.absent(self._key)
        else:
            condition = Compare.mod_revision_is(self._key, self._empty_at)
        self._floor = self._connection.revision
        return await self._store._write_if(
            condition, self._key, self._desired, self._write_id, self._deadline
        )

    async def _lost(self) -> bytes | Again:
        """After a lost answer: the value if it landed, else sent again or what the key says."""
        _log_lost(self._name, "compare_set")
        if self._lost_after is None:
            self._lost_after = self._floor
        if await self._landed():
            return self._desired
        found = await self._connection.get(self._key, deadline=self._deadline)
        if _holds(found, self._expected, self._empty_at):
            _log_resolved(self._name, "compare_set", "it has not landed: sending it again")
            return AGAIN  # not landed (yet): the same write, sent again
        _log_resolved(self._name, "compare_set", "it did not land: the key changed")
        return self._refused(found)

    async def _answered(self, result: TxnResult, after_lost: bool) -> bytes | Again:
        """After an answer: the value written, or what the key that refused it says."""
        if result.succeeded:
            return self._desired
        # An earlier attempt that lost its answer may have landed, and be why this one failed.
        if after_lost and await self._landed():
            return self._desired
        return self._refused(result.ranges[0][0] if result.ranges[0] else None)

    async def _landed(self) -> bool:
        """Whether an attempt whose answer was lost has landed (and logged so)."""
        assert self._lost_after is not None
        landed = await self._store._landed_since(
            self._name, self._write_id, self._lost_after, self._deadline
        )
        if landed:
            _log_resolved(self._name, "compare_set", "it landed")
        return landed

    def _refused(self, found: KeyValue | None) -> bytes | Again:
        """What the key `found`, which refused the condition, answers; or AGAIN on a new one."""
        if found is None:
            if self._expected:
                return self._expected
            self._empty_at = None
            return AGAIN
        if self._expected or found.value:
            return found.value
        self._empty_at = found.mod_revision  # empty: try again, conditioned on its revision
        return AGAIN


class _Swapping(_MarkedWrite[tuple[T, TxnResult | None] | None]):
    """One `AsyncEtcdStore._swap` call: the plan of its next attempt, and its lost attempts."""

    def __init__(
        self,
        store: AsyncEtcdStore,
        name: str,
        key: bytes,
        plan: Callable[[KeyValue | None], _Swap[T] | None],
        what: tuple[str, str],
        deadline: float | None,
    ) -> None:
        super().__init__(store, name, deadline)
        self._key, self._plan = key, plan
        self._kind, self._verb = what
        self._marker = store._marker(key)
        # The conditions of attempts whose answers were lost, each with what its plan said.
        self._lost_plans: dict[int | None, T] = {}
        self._current: KeyValue | None  # the key as the next attempt's plan read it
        self._swap: _Swap[T]  # that plan

    def replan(self, current: KeyValue | None) -> bool:
        """Plan the next attempt on the key as `current`; false if there is nothing to do."""
        swap = self._plan(current)
        if swap is None:
            return False
        self._current, self._swap = current, swap
        return True

    async def _send(self) -> TxnResult:
        """One attempt: the plan's writes and our write id, if the key is as the plan read it."""
        swap, key = self._swap, self._key
        expected = None if self._current is None else self._current.mod_revision
        condition = (
            Compare.absent(key) if expected is None else Compare.mod_revision_is(key, expected)
        )

        async def write(lease: int) -> TxnResult:
            operations = [*swap.operations(lease), Put(self._marker, self._write_id, lease)]
            return await self._connection.txn(
                [condition],
                operations,
                [Get(key)],
                what=f"{self._verb} {self._name!r}",
                deadline=self._deadline,
            )

        return await self._store._lease.run(write, deadline=self._deadline)

    async def _lost(self) -> tuple[T, TxnResult | None] | Again | None:
        """After a lost answer: look for the write, never send it again blindly (see `_next`)."""
        _log_lost(self._name, self._kind)
        expected = None if self._current is None else self._current.mod_revision
        self._lost_plans[expected] = self._swap.outcome
        return await self._next(await self._connection.get(self._key, deadline=self._deadline))

    async def _answered(
        self, result: TxnResult, after_lost: bool
    ) -> tuple[T, TxnResult | None] | Again | None:
        """After an answer: what the plan said if it landed, else the next attempt (`_next`)."""
        if result.succeeded:
            return self._swap.outcome, result
        return await self._next(result.ranges[0][0] if result.ranges[0] else None)

    async def _next(self, found: KeyValue | None) -> tuple[T, TxnResult | None] | Again | None:
        """What a lost attempt wrote if one landed; else AGAIN on a new plan, or None."""
        if self._lost_plans:
            # A lost attempt may have landed, even only since it was last looked for, and be
            # why this one failed.
            landed = await self._store._lost_write_landed(
                self._key, self._write_id, self._lost_plans, found, self._deadline
            )
            if landed is not None:
                _log_resolved(self._name, self._kind, "it landed")
                return landed, None
        # Every lost attempt was planned on a key that allowed it, so none can be pending once
        # `plan` finds nothing to do: `_lost_write_landed` forgot them.
        return AGAIN if self.replan(found) else None
