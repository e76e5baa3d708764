"""The synchronous facades: the async core, called through the process's one event-loop thread.

Each method is one call into the async core through a `Portal` (`rdzv._portal`): the facades
have no logic of their own. Facades made with the same connection options share one connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from rdzv._backend import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL,
    AsyncEtcdBackend,
    SetStateResult,
    StateResult,
    Token,
)
from rdzv._errors import RendezvousError
from rdzv._etcd import Connection, ConnectionKeywords, ConnectionOptions, as_options
from rdzv._portal import Portal, open_shared
from rdzv._rendezvous import (
    DEFAULT_LEASE_TTL,
    DEFAULT_ROUNDS_PREFIX,
    AsyncRendezvous,
    Member,
    Membership,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EtcdBackend", "Rendezvous"]


def _prepare(portal: Portal, backend: AsyncEtcdBackend) -> None:
    """Have `backend` ready for its first write (`AsyncEtcdBackend.prepare`) as it is created.

    The lease and the keep-alive stream are then taken here, where the creation already talks
    to etcd, and not inside the first compare-and-swap. If etcd does not grant the lease, the
    first write takes it, as it would have. The portal is closed if the wait is interrupted.
    """
    try:
        portal.call(backend._prepare_or_defer)
    except BaseException:
        portal.close()
        raise


class EtcdBackend:
    """A blocking facade over `AsyncEtcdBackend`, for synchronous code such as torchrun.

    It runs the async core on the process's event-loop thread, on a connection that it shares
    with the other facades of the process made with the same connection parameters, until
    `close()`. Any number of threads may call it at once. Errors are the async
    core's: `RendezvousConnectionError`, `RendezvousStateError` and the rest of the tree.

    `endpoints` and the connection keywords (`read_timeout`, `protocol`, TLS files, credentials,
    ...) are `rdzv.connect`'s: one `ConnectionOptions`, or its arguments. The other arguments are
    `AsyncEtcdBackend`'s.

    A process forked after the facade was created must create a facade of its own; the parent's
    raises `RendezvousError` there.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | ConnectionOptions,
        run_id: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl: int = DEFAULT_TTL,
        state_key: bytes | None = None,
        **options: Unpack[ConnectionKeywords],
    ) -> None:
        self._loop, self._backend = open_shared(
            as_options(endpoints, **options),
            lambda connection: AsyncEtcdBackend(
                connection, run_id, key_prefix=key_prefix, ttl=ttl, state_key=state_key
            ),
        )
        _prepare(self._loop, self._backend)

    @classmethod
    def _on(cls, loop: Portal, backend: AsyncEtcdBackend) -> EtcdBackend:
        """A facade sharing `loop` (and its connection) with other facades."""
        facade = cls.__new__(cls)
        facade._loop, facade._backend = loop, backend
        return facade

    def __repr__(self) -> str:
        return f"<rdzv.EtcdBackend key={self.key!r} on {self._loop.connection!r}>"

    @property
    def connection(self) -> Connection:
        """The connection this facade uses, shared with the facades of the same parameters."""
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
        """Release the connection; the last facade on it closes it. Closing twice is harmless.

        Calls in progress end with `RendezvousError`; with the last facade of the process, the
        event-loop thread stops. The lease that the creation took is revoked if no write used it.
        """
        try:
            if not self._loop.closed:
                with contextlib.suppress(RendezvousError):  # closed meanwhile, or forked
                    self._loop.call(self._backend._release)
        finally:
            self._loop.close()

    def __enter__(self) -> EtcdBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Rendezvous:
    """A blocking facade over `AsyncRendezvous`, for synchronous code.

    Like `EtcdBackend`, it runs the async core on the process's event-loop thread, on a
    connection shared with the facades of the same connection parameters, until `leave()`;
    every method is one call into the core. Errors are the core's: `RendezvousTimeoutError`,
    `RendezvousClosedError`, `RendezvousConnectionError`.

    `endpoints` and the connection keywords are `rdzv.connect`'s (one `ConnectionOptions`, or
    its arguments); the other arguments are `AsyncRendezvous`'s.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | ConnectionOptions,
        run_id: str,
        *,
        min_nodes: int,
        max_nodes: int,
        last_call_timeout: float = 30,
        join_timeout: float = 600,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        key_prefix: str = DEFAULT_ROUNDS_PREFIX,
        **options: Unpack[ConnectionKeywords],
    ) -> None:
        self._loop, self._rendezvous = open_shared(
            as_options(endpoints, **options),
            lambda connection: AsyncRendezvous(
                connection,
                run_id,
                min_nodes=min_nodes,
                max_nodes=max_nodes,
                last_call_timeout=last_call_timeout,
                join_timeout=join_timeout,
                lease_ttl=lease_ttl,
                key_prefix=key_prefix,
            ),
        )

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

    def read_members(self, membership: Membership) -> tuple[Member, ...]:
        """The round's members in rank order; see `AsyncRendezvous.read_members`."""
        return self._loop.call(self._rendezvous.read_members, membership)

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
        """Leave the round, then release the connection as `EtcdBackend.close`. Harmless twice."""
        if not self._loop.closed:
            try:
                self._loop.call(self._rendezvous.leave)
            finally:
                self._loop.close()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()
