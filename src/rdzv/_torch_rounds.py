"""torchrun's `etcd-v3-rounds` handler: torch's `RendezvousHandler` on rdzv's O(N) rendezvous.

torch's `DynamicRendezvousHandler` keeps the whole membership in one pickled state that every
node compare-and-swaps, polls it every second and writes heartbeats into it. This handler runs
`rdzv.AsyncRendezvous` instead: a node joins a round with one transaction that writes its own
key on its own lease, waits on one watched key, and is known to be alive by its lease rather
than by heartbeat writes. Everything runs on the synchronous facade's event-loop thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
from torch.distributed.elastic.rendezvous import api as torch_api

from rdzv._backend import DEFAULT_TTL
from rdzv._errors import RendezvousClosedError, RendezvousError
from rdzv._etcd import Connection
from rdzv._portal import open_shared
from rdzv._rendezvous import DEFAULT_ROUNDS_PREFIX, AsyncRendezvous, Membership
from rdzv._store import DEFAULT_STORE_PREFIX, AsyncEtcdStore
from rdzv._torch_common import (
    CONNECTION_CONF_KEYS,
    as_torch_errors,
    conf_value,
    connection_options,
    logger,
    reset_hint,
    warn_unknown_conf,
)
from rdzv._torch_store import EtcdStore
from rdzv._validation import validate_store_prefix, validate_ttl

__all__ = ["BACKEND_NAME", "RoundsRendezvousHandler", "create_rounds_handler", "round_store_prefix"]

BACKEND_NAME: Final = "etcd-v3-rounds"
"""The name torchrun knows this handler by: `--rdzv-backend=etcd-v3-rounds`."""

_WAITING_CACHE: Final = 1.0
"""Seconds a `num_nodes_waiting` answer is reused: the agent asks every monitor interval
(0.1 s by default), and a new node waits for a round far longer than this."""

_WARM_UP_TIMEOUT: Final = 10.0
"""A bound for `_warm_up`, which takes well under a millisecond once its imports are done."""


def round_store_prefix(store_prefix: str, run_id: str, number: int) -> str:
    """Where the store of round `number` of `run_id` keeps its keys.

    Zero-padded, so that the rounds of a job sort in order under `{store_prefix}{run_id}/`.
    """
    return f"{store_prefix}{run_id}/round-{number:010d}/"


def _node_info(address: str, limit: int) -> bytes:
    """What `rdzv inspect` and `read_members` show of this node: its address and pid.

    Informational only (rank 0's address reaches the workers through the round's store, and
    no node is sent the others' info); an address too long for `limit` is left out.
    """
    pid = os.getpid()
    for info in ({"addr": address, "pid": pid}, {"pid": pid}):
        encoded = json.dumps(info, separators=(",", ":")).encode()
        if len(encoded) <= limit:
            return encoded
    return b""


async def _warm_up() -> None:
    """Use once, on the loop thread, the anyio features a join uses, so that they are loaded.

    anyio imports its modules as they are first used, and its asyncio backend (with some 25
    modules, about 30 ms of CPU) when the first cancel scope is entered: without this, that
    happens inside the first join. Nothing here talks to etcd.
    """
    with anyio.CancelScope(), anyio.fail_after(_WARM_UP_TIMEOUT):
        async with anyio.create_task_group() as group:
            event = anyio.Event()
            group.start_soon(_set, event)
            with anyio.move_on_after(_WARM_UP_TIMEOUT):
                await event.wait()


async def _set(event: anyio.Event) -> None:
    event.set()


class RoundsRendezvousHandler(torch_api.RendezvousHandler):
    """torch's `RendezvousHandler` over `rdzv.AsyncRendezvous` (one key per node, no polling).

    Each `next_rendezvous()` joins the next round (leaving the round this node was in) and
    returns a store of that round alone: its keys live under a prefix of their own, so keys
    of a failed round never reach the next one, and the next round's rank 0 deletes them.
    Rank 0's `local_addr` (or host name) and a free port become `MASTER_ADDR`/`MASTER_PORT`,
    as with torch's `etcd-v2` handler; the workers' own process group does not use the
    agent's store (`use_agent_store` is False).

    `loop` runs coroutines for the calling thread (`loop.call(function, *args)`) on the
    rendezvous's connection; `release`, if given, is called once by `shutdown()` to let both go.
    `closed_hint`, if given, ends the message of the `RendezvousClosedError` of a join: what to
    do about a closed rendezvous.
    """

    def __init__(
        self,
        rendezvous: AsyncRendezvous,
        loop: Any,
        *,
        store_prefix: str = DEFAULT_STORE_PREFIX,
        store_ttl: int,
        local_addr: str | None = None,
        close_timeout: float = 30,
        release: Callable[[], None] | None = None,
        closed_hint: str = "",
    ) -> None:
        self._rendezvous = rendezvous
        self._loop = loop
        self._store_prefix = store_prefix
        self._store_ttl = store_ttl
        self._local_addr = local_addr
        self._address = local_addr  # this node's in its node info; resolved when first needed
        self._close_timeout = close_timeout
        self._release = release
        self._closed_hint = closed_hint
        self._membership: Membership | None = None
        self._waiting: tuple[float, int] | None = None  # (when asked, answer)
        self._shut_down = False

    def __repr__(self) -> str:
        return f"<rdzv.torch.RoundsRendezvousHandler run_id={self.get_run_id()!r}>"

    @property
    def connection(self) -> Connection:
        """The connection the rendezvous and the stores use."""
        return self._rendezvous.connection

    @property
    def membership(self) -> Membership | None:
        """The round this node is a member of, once `next_rendezvous()` returned."""
        return self._membership

    def get_backend(self) -> str:
        """`"etcd-v3-rounds"`."""
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        """False: workers find rank 0 through `MASTER_ADDR`/`MASTER_PORT`, not the agent's store."""
        return False

    def get_run_id(self) -> str:
        """The job's run id (`--rdzv-id`)."""
        return self._rendezvous.run_id

    def next_rendezvous(self) -> torch_api.RendezvousInfo:
        """Join the next round and return its store, this node's rank and the world size.

        Raises torch's `RendezvousClosedError`, `RendezvousTimeoutError` (after
        `join_timeout`), `RendezvousConnectionError` or `RendezvousStateError`.
        """
        with as_torch_errors():
            info = _node_info(self._node_address(), self._rendezvous.max_node_info)
            try:
                membership = self._loop.call(self._rendezvous.join, info)
            except RendezvousClosedError as error:
                if not self._closed_hint:
                    raise
                raise torch_api.RendezvousClosedError(f"{error} {self._closed_hint}") from error
            self._membership, self._waiting = membership, None
            store = self._round_store(membership.round)
            if membership.rank == 0 and membership.round > 1:
                self._loop.call(self._delete_round_store, membership.round - 1)
        logger.info(
            "joined round %d of %r as rank %d of %d",
            membership.round,
            membership.run_id,
            membership.rank,
            membership.world_size,
        )
        bootstrap = torch_api.RendezvousStoreInfo.build(
            membership.rank, store, local_addr=self._local_addr
        )
        return torch_api.RendezvousInfo(store, membership.rank, membership.world_size, bootstrap)

    def _node_address(self) -> str:
        """The address in this node's node info: `local_addr`, else its host name (once)."""
        if self._address is None:
            self._address = socket.getfqdn()
        return self._address

    def _prepare(self) -> None:
        """Do now, as the handler is created, the one-time work of the first join.

        That is: resolve this node's host name for its node info (the first lookup imports
        the idna codec), and load the anyio modules that a join uses on the loop thread
        (`_warm_up`). The first join then costs about what a later first join in the same
        process costs. No lease is granted and nothing is written: the node's lease is
        still taken by its join.
        """
        self._node_address()
        self._loop.call(_warm_up)

    def _round_store(self, number: int) -> EtcdStore:
        prefix = round_store_prefix(self._store_prefix, self.get_run_id(), number)
        store = AsyncEtcdStore(self.connection, prefix=prefix, ttl=self._store_ttl)
        return EtcdStore(self._loop, store)

    async def _delete_round_store(self, number: int) -> None:
        """Delete round `number`'s store keys; best effort (they expire after `ttl` anyway).

        The round that joined must not fail for it: torchrun would then close the rendezvous.
        """
        prefix = round_store_prefix(self._store_prefix, self.get_run_id(), number)
        try:
            await self.connection.delete(prefix.encode(), prefix=True)
        except RendezvousError as error:
            logger.warning(
                "could not delete the store keys of round %d under %r (they expire after ttl): %s",
                number,
                prefix,
                error,
            )

    def is_closed(self) -> bool:
        """Whether the rendezvous is closed (one read of one key)."""
        with as_torch_errors():
            return bool(self._loop.call(self._rendezvous.is_closed))

    def set_closed(self) -> None:
        """Close the rendezvous: every node's next (or current) `next_rendezvous()` fails."""
        with as_torch_errors():
            self._loop.call(self._rendezvous.close)

    def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round; asks etcd at most once a second."""
        now = time.monotonic()
        if self._waiting is not None and now - self._waiting[0] < _WAITING_CACHE:
            return self._waiting[1]
        with as_torch_errors():
            waiting = int(self._loop.call(self._rendezvous.num_nodes_waiting))
        self._waiting = (now, waiting)
        return waiting

    def shutdown(self) -> bool:
        """Close the rendezvous (as torch's handler does), leave it, and release the connection.

        torchrun calls this when the job ends, unless the agent was killed by a signal. Returns
        False, and logs a warning, if etcd did not let the rendezvous close.
        """
        if self._shut_down:
            return True
        self._shut_down = True
        closed = True
        try:
            with as_torch_errors():
                self._loop.call(self._close_and_leave)
        except (torch_api.RendezvousError, TimeoutError) as error:
            logger.warning("could not close the rendezvous %r: %s", self.get_run_id(), error)
            closed = False
        finally:
            if self._release is not None:
                self._release()
        return closed

    def _release_connection(self) -> None:
        """Release the connection, neither closing nor leaving the rendezvous.

        For a handler that torchrun's entry point refused before anybody used it.
        """
        if not self._shut_down:
            self._shut_down = True
            if self._release is not None:
                self._release()

    async def _close_and_leave(self) -> None:
        try:
            with anyio.fail_after(self._close_timeout):
                await self._rendezvous.close()
        finally:
            with contextlib.suppress(RendezvousError):
                await self._rendezvous.leave()


# The `--rdzv-conf` keys this handler reads, besides the connection's (`CONNECTION_CONF_KEYS`).
# The rounds are not signed (their keys are not a state a node trusts): no `state_key_file`.
_ROUNDS_CONF_KEYS: Final = frozenset(
    {
        "close_timeout",
        "join_timeout",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "key_prefix",
        "last_call_timeout",
        "store_prefix",
        "timeout",  # torchrun adds it for every backend; this handler has no use for it
        "ttl",
    }
)


def _seconds(params: torch_api.RendezvousParameters, key: str, default: float) -> float:
    """A positive number of seconds from `--rdzv-conf` (`ValueError` naming `key` if not)."""
    value = params.get(key)
    if value is None:
        return default
    try:
        seconds = float(str(value).strip())
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{key} must be a positive number of seconds, not {value!r}.")
    return seconds


def _count(params: torch_api.RendezvousParameters, key: str, default: int) -> int:
    """A positive whole number from `--rdzv-conf` (`ValueError` naming `key` if not)."""
    value = params.get(key)
    if value is None:
        return default
    text = str(value).strip()
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ValueError(f"{key} must be a positive whole number, not {value!r}.")
    return int(text)


def _lease_ttl(params: torch_api.RendezvousParameters) -> int:
    """torch's keep-alive settings as a lease: a node is gone once it missed them all."""
    interval = _seconds(params, "keep_alive_interval", 5)
    attempts = _count(params, "keep_alive_max_attempt", 3)
    return max(2, math.ceil(interval * attempts))


def create_rounds_handler(params: torch_api.RendezvousParameters) -> RoundsRendezvousHandler:
    """Create the `etcd-v3-rounds` handler from torchrun's parameters.

    `--nnodes=MIN:MAX` gives `min_nodes`/`max_nodes`; `--local-addr` the address rank 0
    publishes as `MASTER_ADDR`. `--rdzv-conf` takes the connection options of `etcd-v3`
    (endpoints, `read_timeout`, TLS, `username`, `password_file`) and:

    | option | default | meaning |
    |---|---|---|
    | `join_timeout` | 600 | seconds a `next_rendezvous()` may wait for its round |
    | `last_call_timeout` | 30 | seconds a round waits for more nodes once it has `min_nodes` |
    | `close_timeout` | 30 | seconds `shutdown()` may take to close the rendezvous |
    | `keep_alive_interval` | 5 | times `keep_alive_max_attempt` (3): the lease TTL, after |
    | | | which a dead node's key is gone (at least 2 s) |
    | `key_prefix` | `/rdzv/rounds` | where the rounds live |
    | `store_prefix` | `/torch/elastic/store/` | where the rounds' stores live |
    | `ttl` | 7200 | seconds an unwritten store key lives, at least |

    Unknown options are logged as a warning on the "rdzv.torch" logger. Raises `ValueError` for
    bad parameters and torch's `RendezvousConnectionError` if etcd does not answer.
    """
    warn_unknown_conf(params, CONNECTION_CONF_KEYS | _ROUNDS_CONF_KEYS)
    options = connection_options(params)
    store_ttl = validate_ttl(params.get_as_int("ttl", DEFAULT_TTL))
    # Checked here, not when the first round's store is made: after a join, an error ends the
    # agent, and torchrun's shutdown() then closes the rendezvous for every node.
    store_prefix = validate_store_prefix(conf_value(params, "store_prefix") or DEFAULT_STORE_PREFIX)
    key_prefix = conf_value(params, "key_prefix") or DEFAULT_ROUNDS_PREFIX
    join_timeout = _seconds(params, "join_timeout", 600)
    last_call_timeout = _seconds(params, "last_call_timeout", 30)
    close_timeout = _seconds(params, "close_timeout", 30)
    lease_ttl = _lease_ttl(params)

    def make(connection: Connection) -> AsyncRendezvous:
        return AsyncRendezvous(
            connection,
            params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            last_call_timeout=last_call_timeout,
            join_timeout=join_timeout,
            lease_ttl=lease_ttl,
            key_prefix=key_prefix,
        )

    with as_torch_errors():
        portal, rendezvous = open_shared(options, make)
    handler = RoundsRendezvousHandler(
        rendezvous,
        portal,
        store_prefix=store_prefix,
        store_ttl=store_ttl,
        local_addr=params.local_addr,
        close_timeout=close_timeout,
        release=portal.close,
        closed_hint=reset_hint(params, "--rounds-prefix"),
    )
    try:
        with as_torch_errors():
            handler._prepare()
    except BaseException:
        handler._release_connection()
        raise
    return handler
