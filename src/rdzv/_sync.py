"""The synchronous facade: the async core, run on one long-lived event-loop thread.

There is no second implementation here. `LoopThread` starts one asyncio event loop in a daemon
thread (anyio's blocking portal), opens the `Connection` inside it (a grpc.aio channel belongs
to the loop that made it), and runs the async core's coroutines there for any number of calling
threads at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from rdzv import _fork
from rdzv._backend import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL,
    AsyncEtcdBackend,
    SetStateResult,
    StateResult,
    Token,
)
from rdzv._errors import RendezvousError
from rdzv._etcd import Connection
from rdzv._rendezvous import DEFAULT_LEASE_TTL, DEFAULT_ROUNDS_PREFIX, AsyncRendezvous, Membership

T = TypeVar("T")

_THREAD_NAME = "rdzv-event-loop"

_open_loops: weakref.WeakSet[LoopThread] = weakref.WeakSet()


@atexit.register
def _close_open_loops() -> None:
    """Close the channels that facades left open, so the interpreter exits quietly."""
    for loop in list(_open_loops):
        loop.close()


def _suspend_open_loops() -> bool:
    """Before fork(): no gRPC channel may be live, or the child cannot use gRPC at all."""
    loops = list(_open_loops)
    for loop in loops:
        loop.suspend()
    return bool(loops)


def _resume_open_loops() -> None:
    for loop in list(_open_loops):
        loop.resume()


_fork.on_fork(before=_suspend_open_loops, after_in_parent=_resume_open_loops)


async def _next(changes: AsyncGenerator[T, None]) -> T:
    return await changes.__anext__()


class LoopThread:
    """An event-loop thread that owns one open `Connection`."""

    def __init__(self, connection: Connection) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._exit = contextlib.ExitStack()
        self._portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal("asyncio", name=_THREAD_NAME)
        )
        # Calls go straight to the portal's asyncio loop: asyncio.run_coroutine_threadsafe costs
        # half of what BlockingPortal.call does (it starts a task in anyio's task group), and
        # the thread hop is the whole of the facade's overhead.
        self._loop: asyncio.AbstractEventLoop = self._portal.call(asyncio.get_running_loop)
        self.connection = connection
        try:
            self._portal.call(connection.open)
        except BaseException:
            self.close()
            raise
        _open_loops.add(self)

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run `function(*args, **kwargs)` on the event loop and wait for its result."""
        self._check_usable()
        return asyncio.run_coroutine_threadsafe(function(*args, **kwargs), self._loop).result()

    def iterate(self, changes: AsyncGenerator[T, None]) -> Iterator[T]:
        """Iterate over an async generator of the loop from this thread."""
        try:
            while True:
                try:
                    item = self.call(_next, changes)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._closed and self._pid == os.getpid():
                self._portal.call(changes.aclose)

    def suspend(self) -> None:
        """Close the channel until `resume()` (see `Connection.suspend`)."""
        if self._usable_here():
            self._portal.call(self.connection.suspend)

    def resume(self) -> None:
        """Reopen the connection after `suspend()`."""
        if self._usable_here():
            self._portal.call(self.connection.resume)

    def _usable_here(self) -> bool:
        # A fork from the loop's own thread cannot wait for the loop; nor can a closed loop.
        return (
            not self._closed
            and self._pid == os.getpid()
            and threading.current_thread().name != _THREAD_NAME
        )

    def _check_usable(self) -> None:
        if self._pid != os.getpid():
            # The loop thread did not survive fork(); only the parent can use it.
            raise RendezvousError(
                f"This rdzv object was created in process {self._pid}, and its event-loop thread "
                "does not exist in this forked process: create a new one here."
            )
        if self._closed:
            raise RendezvousError("This rdzv object is closed.")

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def close(self) -> None:
        """Close the connection and stop the thread; harmless to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_loops.discard(self)
        if self._pid != os.getpid():
            return
        try:
            self._portal.call(self.connection.aclose)
        finally:
            self._exit.close()


class EtcdBackend:
    """A blocking facade over `AsyncEtcdBackend`, for synchronous code such as torchrun.

    It runs the async core on one event-loop thread, created with the facade and holding its
    connection until `close()`. Any number of threads may call it at once. Errors are the async
    core's: `RendezvousConnectionError`, `RendezvousStateError` and the rest of the tree.

    A process forked after the facade was created must create a facade of its own; the parent's
    raises `RendezvousError` there.
    """

    def __init__(
        self,
        endpoints: str,
        run_id: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl: int = DEFAULT_TTL,
        protocol: str | None = None,
        read_timeout: float = 60,
        ca_cert: str | Path | None = None,
        ssl_cert: str | Path | None = None,
        ssl_cert_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        state_key: bytes | None = None,
    ) -> None:
        connection = Connection(
            endpoints,
            protocol=protocol,
            read_timeout=read_timeout,
            ca_cert=ca_cert,
            ssl_cert=ssl_cert,
            ssl_cert_key=ssl_cert_key,
            username=username,
            password=password,
        )
        # Validate the run id, prefix and ttl before a thread or a socket exists.
        backend = AsyncEtcdBackend(
            connection, run_id, key_prefix=key_prefix, ttl=ttl, state_key=state_key
        )
        self._loop = LoopThread(connection)
        self._backend = backend

    @classmethod
    def _on(cls, loop: LoopThread, backend: AsyncEtcdBackend) -> EtcdBackend:
        """A facade sharing `loop` (and its connection) with other facades."""
        facade = cls.__new__(cls)
        facade._loop, facade._backend = loop, backend
        return facade

    def __repr__(self) -> str:
        return f"<rdzv.EtcdBackend key={self.key!r} on {self._loop.connection!r}>"

    @property
    def connection(self) -> Connection:
        """The connection this facade uses (shared with its store, under `rdzv.torch`)."""
        return self._loop.connection

    @property
    def name(self) -> str:
        """The backend's name, as torchrun's `--rdzv-backend` knows it: `"etcd-v3"`."""
        return self._backend.name

    @property
    def key(self) -> str:
        """The etcd key that holds the state."""
        return self._backend.key

    @property
    def ttl(self) -> int:
        """Seconds without a write after which the state may expire."""
        return self._backend.ttl

    def get_state(self) -> StateResult | None:
        """Return the state and its token, or `None`; see `AsyncEtcdBackend.get_state`."""
        return self._loop.call(self._backend.get_state)

    def set_state(self, state: bytes, token: object = None) -> SetStateResult | None:
        """Compare-and-swap the state; see `AsyncEtcdBackend.set_state`."""
        return self._loop.call(self._backend.set_state, state, token)

    def watch(self, token: object = None) -> Iterator[tuple[bytes | None, Token]]:
        """Iterate over every change after `token`; see `AsyncEtcdBackend.watch`.

        The iterator blocks its thread while it waits for the next change.
        """
        return self._loop.iterate(self._backend.watch(token))

    def close(self) -> None:
        """Close the connection and stop the event-loop thread; closing twice is harmless."""
        self._loop.close()

    def __enter__(self) -> EtcdBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Rendezvous:
    """A blocking facade over `AsyncRendezvous`, for synchronous code.

    Like `EtcdBackend`, it runs the async core on one event-loop thread that holds its
    connection until `leave()`; every method is one call into the core. Errors are the
    core's: `RendezvousTimeoutError`, `RendezvousClosedError`, `RendezvousConnectionError`.
    """

    def __init__(
        self,
        endpoints: str,
        run_id: str,
        *,
        min_nodes: int,
        max_nodes: int,
        last_call_timeout: float = 30,
        join_timeout: float = 600,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        key_prefix: str = DEFAULT_ROUNDS_PREFIX,
        protocol: str | None = None,
        read_timeout: float = 60,
        ca_cert: str | Path | None = None,
        ssl_cert: str | Path | None = None,
        ssl_cert_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        connection = Connection(
            endpoints,
            protocol=protocol,
            read_timeout=read_timeout,
            ca_cert=ca_cert,
            ssl_cert=ssl_cert,
            ssl_cert_key=ssl_cert_key,
            username=username,
            password=password,
        )
        # Validate everything before a thread or a socket exists.
        self._rendezvous = AsyncRendezvous(
            connection,
            run_id,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            last_call_timeout=last_call_timeout,
            join_timeout=join_timeout,
            lease_ttl=lease_ttl,
            key_prefix=key_prefix,
        )
        self._loop = LoopThread(connection)

    def __repr__(self) -> str:
        return repr(self._rendezvous).replace("AsyncRendezvous", "Rendezvous", 1)

    @property
    def run_id(self) -> str:
        """The rendezvous's run id."""
        return self._rendezvous.run_id

    @property
    def max_node_info(self) -> int:
        """The most bytes of node info `join` accepts."""
        return self._rendezvous.max_node_info

    def join(self, node_info: bytes = b"") -> Membership:
        """Join the next round; see `AsyncRendezvous.join`."""
        return self._loop.call(self._rendezvous.join, node_info)

    def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round; see `AsyncRendezvous.num_nodes_waiting`."""
        return self._loop.call(self._rendezvous.num_nodes_waiting)

    def wait_for_departure(self, membership: Membership, *, timeout: float | None = None) -> bool:
        """Wait until a member of the round is gone; see `AsyncRendezvous.wait_for_departure`."""
        return self._loop.call(self._rendezvous.wait_for_departure, membership, timeout=timeout)

    def close(self) -> None:
        """Close the rendezvous for everybody; see `AsyncRendezvous.close`."""
        self._loop.call(self._rendezvous.close)

    def is_closed(self) -> bool:
        """Whether the rendezvous is closed."""
        return self._loop.call(self._rendezvous.is_closed)

    def leave(self) -> None:
        """Leave the round, then close the connection and stop the thread. Harmless twice."""
        if not self._loop.closed:
            try:
                self._loop.call(self._rendezvous.leave)
            finally:
                self._loop.close()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()
