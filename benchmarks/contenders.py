"""The contenders, each behind PyTorch's `RendezvousBackend` contract.

A contender opens backends: `get_state() -> (state, token) | None` and
`set_state(state, token) -> (state, token, written) | None`. Each backend it opens has a
connection of its own, as each node of a job has, except `rdzv sync`'s: since the facades of a
process share one event-loop thread and one connection per connection options (e37f927), the
facades that one benchmark process opens share them.

- `raw aetcd`: aetcd sending the same range read and the same transaction as rdzv, with none of
  rdzv's work around them (no envelope, no checks, no retries): the floor for any client built
  on aetcd.
- `rdzv async`: `rdzv.AsyncEtcdBackend`.
- `rdzv sync`: `rdzv.EtcdBackend`, the synchronous facade (on the process's event-loop thread).
- `etcd-v2`: PyTorch's `EtcdRendezvousBackend` over python-etcd and etcd's v2 API, set up as
  torch's own `create_backend` does.
- `c10d`: PyTorch's `C10dRendezvousBackend` over a TCPStore: in memory and not durable, so a
  reference point rather than a peer.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar, Final, Protocol

import aetcd

import rdzv
from servers import Servers

RAW = "raw aetcd"
ASYNC = "rdzv async"
SYNC = "rdzv sync"
V2 = "etcd-v2"
C10D = "c10d"
ALL: Final = (RAW, ASYNC, SYNC, V2, C10D)

Token = Any
State = tuple[bytes, Token]
SetResult = tuple[bytes, Token, bool]

# The rdzv default; the TTL only matters for how long etcd keeps the state.
TTL: Final = 7200
READ_TIMEOUT: Final = 60


class AsyncBackend(Protocol):
    async def get_state(self) -> State | None: ...

    async def set_state(self, state: bytes, token: Token | None = None) -> SetResult | None: ...


class SyncBackend(Protocol):
    def get_state(self) -> State | None: ...

    def set_state(self, state: bytes, token: Token | None = None) -> SetResult | None: ...


class AsyncContender(abc.ABC):
    """A contender whose backends are coroutines: many of them share one event loop."""

    name: ClassVar[str]

    def __init__(self, servers: Servers, namespace: str) -> None:
        self.servers = servers
        # Every run of the benchmark, and every suite in it, writes under keys of its own.
        self.namespace = namespace

    @abc.abstractmethod
    def open(self, run_id: str) -> contextlib.AbstractAsyncContextManager[AsyncBackend]:
        """A backend with a connection of its own, for the state of `run_id`."""


class SyncContender(abc.ABC):
    """A contender whose backends block their calling thread."""

    name: ClassVar[str]

    def __init__(self, servers: Servers, namespace: str) -> None:
        self.servers = servers
        self.namespace = namespace

    @abc.abstractmethod
    def open(self, run_id: str) -> contextlib.AbstractContextManager[SyncBackend]:
        """A backend with a connection of its own, for the state of `run_id`."""


Contender = AsyncContender | SyncContender


class RawAetcdBackend:
    """The same range read and transaction as rdzv's, straight through aetcd."""

    def __init__(self, client: aetcd.Client, key: bytes, lease: int) -> None:
        self._client, self._key, self._lease = client, key, lease

    async def get_state(self) -> State | None:
        got = await self._client.get(self._key)
        return None if got is None else (got.value, got.mod_revision)

    async def set_state(self, state: bytes, token: Token | None = None) -> SetResult | None:
        tx = self._client.transactions
        # aetcd's comparisons mutate and return `tx.mod(...)`; only ever compare it once.
        compare = tx.create(self._key) == 0 if token is None else tx.mod(self._key) == token
        succeeded, responses = await self._client.transaction(
            compare=[compare],
            success=[tx.put(self._key, state, self._lease)],
            failure=[tx.get(self._key)],
        )
        if succeeded:
            return state, responses[0].response_put.header.revision, True
        if not responses[0]:
            return None
        value, current = responses[0][0]
        return value, current.mod_revision, False


class RawAetcd(AsyncContender):
    name = RAW

    @contextlib.asynccontextmanager
    async def open(self, run_id: str) -> AsyncIterator[AsyncBackend]:
        host, port = self.servers.etcd_host_port
        async with aetcd.Client(host=host, port=port, timeout=READ_TIMEOUT) as client:
            # rdzv writes on a lease too (one grant per TTL); grant it before measuring.
            lease = await client.lease(ttl=2 * TTL)
            key = f"{self.namespace}/raw/{run_id}".encode()
            yield RawAetcdBackend(client, key, lease.id)


class RdzvAsync(AsyncContender):
    name = ASYNC

    @contextlib.asynccontextmanager
    async def open(self, run_id: str) -> AsyncIterator[AsyncBackend]:
        async with rdzv.connect(
            self.servers.etcd_endpoint, read_timeout=READ_TIMEOUT
        ) as connection:
            yield rdzv.AsyncEtcdBackend(
                connection, run_id, key_prefix=f"{self.namespace}/async", ttl=TTL
            )


class RdzvSync(SyncContender):
    name = SYNC

    @contextlib.contextmanager
    def open(self, run_id: str) -> Iterator[SyncBackend]:
        with rdzv.EtcdBackend(
            self.servers.etcd_endpoint,
            run_id,
            key_prefix=f"{self.namespace}/sync",
            ttl=TTL,
            read_timeout=READ_TIMEOUT,
        ) as facade:
            yield facade


class EtcdV2(SyncContender):
    name = V2

    @contextlib.contextmanager
    def open(self, run_id: str) -> Iterator[SyncBackend]:
        import etcd  # python-etcd
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import (
            EtcdRendezvousBackend,
        )

        host, port = self.servers.etcd_host_port
        # As torch's etcd_rendezvous_backend._create_etcd_client makes it.
        client = etcd.Client(
            host, port, read_timeout=READ_TIMEOUT, protocol="http", allow_reconnect=True
        )
        try:
            yield EtcdRendezvousBackend(client, run_id, key_prefix=f"{self.namespace}/v2", ttl=TTL)
        finally:
            client.http.clear()


class C10d(SyncContender):
    name = C10D

    @contextlib.contextmanager
    def open(self, run_id: str) -> Iterator[SyncBackend]:
        # torch.distributed re-exports it only when built with distributed support, which type
        # checkers cannot see; this is where it is defined.
        from torch._C._distributed_c10d import TCPStore
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
            C10dRendezvousBackend,
        )

        store = TCPStore(
            self.servers.c10d.host,
            self.servers.c10d.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=READ_TIMEOUT),
        )
        # The store has no namespaces: the run id carries ours.
        yield C10dRendezvousBackend(store, f"{self.namespace}.{run_id}")
        del store


_CLASSES: Final[dict[str, type[AsyncContender] | type[SyncContender]]] = {
    RAW: RawAetcd,
    ASYNC: RdzvAsync,
    SYNC: RdzvSync,
    V2: EtcdV2,
    C10D: C10d,
}


def contenders(servers: Servers, namespace: str, names: Sequence[str] = ALL) -> list[Contender]:
    """The contenders called `names`, writing under `namespace`."""
    return [_CLASSES[name](servers, namespace) for name in names]


class Blocking:
    """A sync backend seen as an async one, for suites that drive every contender alike.

    The call still blocks the calling thread (the event loop's), exactly as it blocks a
    synchronous caller; wrapping it in a coroutine costs well under a microsecond.
    """

    def __init__(self, backend: SyncBackend) -> None:
        self._backend = backend

    async def get_state(self) -> State | None:
        return self._backend.get_state()

    async def set_state(self, state: bytes, token: Token | None = None) -> SetResult | None:
        return self._backend.set_state(state, token)


async def open_backend(
    stack: contextlib.AsyncExitStack, contender: Contender, run_id: str
) -> AsyncBackend:
    """Open a backend of `contender` on `stack`, as an `AsyncBackend` whatever its kind."""
    if isinstance(contender, AsyncContender):
        return await stack.enter_async_context(contender.open(run_id))
    return Blocking(stack.enter_context(contender.open(run_id)))
