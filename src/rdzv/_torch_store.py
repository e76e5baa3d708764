"""`rdzv.torch.EtcdStore`: torch's c10d `Store` over `rdzv.AsyncEtcdStore`.

Both torchrun handlers hand it out (the `etcd-v3-rounds` handler one for each round), so it lives
below both; `rdzv.torch` is its public home.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import torch.distributed as dist

# torch.distributed re-exports Store only when distributed support is built in, which type
# checkers cannot see; this is where it is defined.
from torch._C._distributed_c10d import Store

from rdzv._portal import Portal
from rdzv._store import AsyncEtcdStore
from rdzv._torch_common import as_torch_errors

__all__ = ["EtcdStore"]


def _as_bytes(value: str | bytes) -> bytes:
    # C++ callers pass bytes; Python callers often pass str.
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(Store):
    """A c10d `Store` whose keys live in etcd v3 under a prefix (default `/torch/elastic/store/`).

    Blocking calls (`get`, `wait`, `multi_get`, `queue_pop`) wait with etcd's watch and give up
    after the store's `timeout` (a zero timeout waits forever, as in c10d), raising
    `DistStoreError`. It has torch's extended API (`append`, `multi_get`, `multi_set`, which a
    `PrefixStore` passes on as they are), queues, `list_keys` and `clone`; the table of every
    `torch.distributed.Store` method is in the documentation's "Store methods" page.
    """

    def __init__(
        self,
        loop: Portal,
        store: AsyncEtcdStore,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        super().__init__()  # the pybind11 trampoline needs it
        self._loop = loop
        self._store = store
        # The clones of this store and of its clones, kept alive with it (see `clone`).
        self._clones: list[EtcdStore] = []
        if timeout is not None:
            self.set_timeout(timeout)

    def __repr__(self) -> str:
        return f"<rdzv.torch.EtcdStore prefix={self._store.prefix!r}>"

    def _seconds(self, timeout: datetime.timedelta | None = None) -> float:
        # Read the timeout on every call: C++ (PrefixStore) changes it without calling Python.
        if timeout is None:
            timeout = self.timeout  # type: ignore[attr-defined]  # missing from torch's stub
        seconds = timeout.total_seconds()
        return math.inf if seconds == 0 else seconds

    def set(self, key: str, value: str | bytes) -> None:
        """Write `value` at `key`."""
        with as_torch_errors():
            self._loop.call(self._store.set, key, _as_bytes(value))

    def get(self, key: str) -> bytes:
        """Return the value at `key`, waiting up to the store's timeout for it to appear."""
        with as_torch_errors():
            return self._loop.call(self._store.get, key, timeout=self._seconds())

    def add(self, key: str, value: int) -> int:
        """Add `value` to the integer at `key` (0 if absent), atomically; return the sum."""
        with as_torch_errors():
            return self._loop.call(self._store.add, key, value)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """Set `key` to `desired_value` if it holds `expected_value`; return its value then.

        An empty `expected_value` also matches an absent key (c10d's "set if absent").
        """
        with as_torch_errors():
            return self._loop.call(
                self._store.compare_set, key, _as_bytes(expected_value), _as_bytes(desired_value)
            )

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        """Wait until every key exists, up to `timeout` (default: the store's timeout)."""
        with as_torch_errors():
            self._loop.call(self._store.wait, keys, timeout=self._seconds(timeout))

    def check(self, keys: list[str]) -> bool:
        """Whether every key exists now."""
        with as_torch_errors():
            return self._loop.call(self._store.check, keys)

    def delete_key(self, key: str) -> bool:
        """Delete `key`; whether it existed."""
        with as_torch_errors():
            return self._loop.call(self._store.delete_key, key)

    def num_keys(self) -> int:
        """The number of keys in the store."""
        with as_torch_errors():
            return self._loop.call(self._store.num_keys)

    def list_keys(self) -> list[str]:
        """The names of the keys in the store, in etcd's key order (queues are not keys)."""
        with as_torch_errors():
            return self._loop.call(self._store.list_keys)

    # c10d's C++ side looks these two up by their C++ names.
    deleteKey = delete_key
    getNumKeys = num_keys

    def has_extended_api(self) -> bool:
        """True: `append`, `multi_get` and `multi_set` are the store's own, one transaction each.

        So a `PrefixStore` over this store calls them rather than falling back on `get`, `set`
        and `compare_set` one key at a time.
        """
        return True

    def clone(self) -> EtcdStore:
        """A new store object on the same keys, with the same timeout, for another thread.

        The clone shares this store's event-loop thread and etcd connection: that thread
        already runs the calls of any number of threads at once, each as a task of its own, and
        a store object holds nothing else but its timeout (which each clone sets on its own).
        A connection of its own would cost every clone a thread, a gRPC channel, a login and a
        lease, which nothing would release: torch clones stores (for each new process group)
        and never closes them. So a clone is usable where this store is, and only there: not
        once the connection is closed (`close()` of the facade that owns it), nor in a process
        forked from this one (create a new store there).

        torch's C++ code calls `clone` too, and keeps only the C++ half of the Python object it
        gets; so each clone is kept alive as long as the store it was cloned from.
        """
        twin = EtcdStore(self._loop, self._store, self.timeout)  # type: ignore[attr-defined]  # missing from torch's stub
        twin._clones = self._clones
        self._clones.append(twin)
        return twin

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """The values of `keys`, in one transaction, waiting for missing keys."""
        with as_torch_errors():
            return self._loop.call(self._store.multi_get, keys, timeout=self._seconds())

    def multi_set(self, keys: list[str], values: Sequence[str | bytes]) -> None:
        """Write every key, in one transaction."""
        with as_torch_errors():
            self._loop.call(self._store.multi_set, keys, [_as_bytes(v) for v in values])

    def append(self, key: str, value: str | bytes) -> None:
        """Append `value` to the bytes at `key` (creating it)."""
        with as_torch_errors():
            self._loop.call(self._store.append, key, _as_bytes(value))

    def queue_push(self, key: str, value: bytes | str) -> None:
        """Add `value` at the end of the queue `key`; queues are apart from keys."""
        with as_torch_errors():
            self._loop.call(self._store.queue_push, key, _as_bytes(value))

    def queue_pop(self, key: str, block: bool = True) -> bytes:
        """Remove and return the oldest item of the queue `key`.

        With `block`, wait up to the store's timeout for one (`DistStoreError` after it);
        without, raise `QueueEmptyError` at once if the queue is empty. Each item goes to one
        popper only, in any number of processes.
        """
        if block:
            with as_torch_errors():
                return self._loop.call(self._store.queue_pop, key, timeout=self._seconds())
        with as_torch_errors(timeout=dist.QueueEmptyError):
            return self._loop.call(self._store.queue_pop, key, timeout=0)

    def queue_len(self, key: str) -> int:
        """The number of items in the queue `key` (0 if there is none)."""
        with as_torch_errors():
            return self._loop.call(self._store.queue_len, key)


# Tracebacks and reprs show the public path, as when it was defined in `rdzv.torch`.
EtcdStore.__module__ = "rdzv.torch"
