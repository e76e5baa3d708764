"""The channels of a `Connection`: one endpoint at a time, failover, authentication, suspension.

A `Link` is a gRPC channel to one endpoint with its stubs. `Links` owns the current one, moves
to the next endpoint when the attempt driver says the current one failed, holds the etcd auth
token, bounds the requests in flight, and closes or suspends the channel. A channel that it
closed is marked `retired` first, so that a call which finds it closed (gRPC then raises
`asyncio.CancelledError` or `grpc.aio.UsageError`) knows that the cause was rdzv's own doing,
not a cancellation of the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Final

import anyio
import grpc
import grpc.aio
from aetcd import rpc

from rdzv import _fork
from rdzv._errors import (
    RendezvousAuthError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTLSError,
)
from rdzv._etcd import _calls
from rdzv._etcd._classify import fields
from rdzv._etcd._endpoints import Endpoint
from rdzv._etcd._tls import handshake_failure, plain_client_met_tls, speaks_tls

logger = logging.getLogger("rdzv.etcd")

# With several endpoints, one attempt gets a third of the read timeout, so that a member that
# accepts connections but never answers (a paused process) leaves time to try the others.
_ATTEMPT_SHARE: Final = 3
_MIN_ATTEMPT_TIMEOUT: Final = 1.0
# gRPC delivers the last completions of a closed channel a moment later, through a
# process-wide queue; if the loop closes (or the process forks) first, they land on a dead loop
# and break the next user of gRPC. Measured: 0.1 s is enough; without it, 10 closes of 10
# leaked one.
DRAIN_SECONDS: Final = 0.1

_CHANNEL_OPTIONS: Final = (
    # Keepalive pings find a dead or frozen peer under a long-lived watch stream. etcd refuses
    # pings more often than every 5 s (--grpc-keepalive-min-time) and without an active stream.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # grpcio 1.85 waits for a ping's answer for grpc.http2.ping_timeout_ms (60 s by default),
    # not for keepalive_timeout_ms; without this a frozen member holds a watch for 70 s.
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's default reconnect backoff grows to two minutes; a restarted member should be used
    # again within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Every Connection owns its TCP connection instead of sharing one from gRPC's global pool.
    ("grpc.use_local_subchannel_pool", 1),
)

_AUTH_REFUSED: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class ForeignCluster(Exception):
    """An endpoint answered for another etcd cluster than the one this connection uses."""


@dataclasses.dataclass(eq=False)
class Link:
    """A gRPC channel to one endpoint, with its stubs."""

    endpoint: Endpoint
    channel: grpc.aio.Channel
    kv: Any
    lease: Any
    watch: Any
    maintenance: Any
    auth: Any
    retired: bool = False
    answered: bool = False
    """Whether etcd has answered a call on this channel."""


class Links:
    """The channel to the current endpoint, and everything that changes it."""

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        read_timeout: float,
        connect_timeout: float,
        max_in_flight: int,
    ) -> None:
        self.endpoints = endpoints
        self._credentials = credentials
        self.username = username
        self._password = password
        self._read_timeout = read_timeout
        # Until an endpoint first answers, a call gives up after this (see `reached`).
        self.connect_timeout = min(connect_timeout, read_timeout)
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._link: Link | None = None
        self._index = 0
        self._channels = 0  # how many channels were opened
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        # Held by each request in flight (an asyncio.Semaphore: a context manager of its own,
        # cheaper on the hot path than a generator-based one).
        self.in_flight = asyncio.Semaphore(max_in_flight)
        # What is known of TLS misconfiguration, to fail fast on it (see `diagnose`).
        self._answered = False
        self._cluster_id: int | None = None
        self._probed: set[Endpoint] = set()
        # The endpoints whose failure was logged as a warning before any endpoint answered.
        self._warned: set[Endpoint] = set()
        self._misconfigured: dict[Endpoint, RendezvousTLSError] = {}

    # ------------------------------------------------------------------------------ the link

    async def acquire(self, deadline: float) -> Link:
        """The current link, opened if needed; waits (until `deadline`) while suspended."""
        if not self._resumed.is_set():
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await self._resumed.wait()
            if not self._resumed.is_set():
                raise RendezvousConnectionError(
                    "The etcd connection stayed suspended (for a fork) past the read timeout."
                )
        self.check_open()
        if self._link is None:
            _fork.check_grpc_usable()
            endpoint = self.endpoints[self._index]
            target = str(endpoint)
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    target, self._credentials, options=_CHANNEL_OPTIONS
                )
            self._link = Link(
                endpoint=endpoint,
                channel=channel,
                kv=rpc.KVStub(channel),
                lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel),
                maintenance=rpc.MaintenanceStub(channel),
                auth=rpc.AuthStub(channel),
            )
            self._channels += 1
            logger.debug(
                "Opening a channel to etcd at %s",
                endpoint,
                extra={"rdzv_endpoint": target},
            )
        return self._link

    @property
    def current_endpoint(self) -> Endpoint:
        """The endpoint that calls go to now (or will, once a channel is opened)."""
        return self.endpoints[self._index]

    def check_open(self) -> None:
        """Raise `RendezvousError` if the connection was closed."""
        if self._closed:
            raise RendezvousError("This etcd connection is closed.")

    def fail_over(self, link: Link, why: str) -> None:
        """Move to the next endpoint after `link` failed (unless another call already moved).

        `why` says what failed, for the log.
        """
        if self._link is not link or len(self.endpoints) == 1:
            # With one endpoint, gRPC's own reconnection is all we can do.
            return
        self._link = None
        self._index = (self._index + 1) % len(self.endpoints)
        following = self.endpoints[self._index]
        # Until an endpoint answers, each one's failure is a warning once: the attempts cycle
        # through them every few hundred milliseconds, and the connection's error names them all.
        repeated = not self._answered and link.endpoint in self._warned
        self._warned.add(link.endpoint)
        logger.log(
            logging.DEBUG if repeated else logging.WARNING,
            "etcd at %s failed (%s); failing over to %s",
            link.endpoint,
            why,
            following,
            extra={
                "rdzv_endpoint": str(link.endpoint),
                "rdzv_next_endpoint": str(following),
                "rdzv_details": why,
            },
        )
        # Calls still running on the old channel get an attempt's time to finish.
        self._retire(link, grace=self.attempt_timeout(self._read_timeout))

    def _retire(self, link: Link, *, grace: float | None) -> None:
        link.retired = True
        task = asyncio.get_running_loop().create_task(link.channel.close(grace=grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_channels(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._retire(link, grace=None)
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.sleep(DRAIN_SECONDS)

    async def suspend(self) -> None:
        """Close every channel and hold new calls until `resume()`.

        gRPC cannot survive a fork() while its threads are busy: the synchronous facade calls
        this before a fork, so that the child starts with no live channel and no call in
        flight. Calls in progress end on the closed channel and are retried (or, for a write,
        resolved) once the connection resumes, within their own deadline.
        """
        self._resumed.clear()
        await self._close_channels()

    def resume(self) -> None:
        """Let calls held by `suspend()` go on; they open a new channel."""
        self._resumed.set()

    async def aclose(self) -> None:
        """Close the channel for good; calls in progress and later fail with RendezvousError."""
        self._closed = True
        self._resumed.set()
        await self._close_channels()

    # --------------------------------------------------------------------------- attempts

    @property
    def reached(self) -> bool:
        """Whether any endpoint has answered since the connection was made.

        Until one has, calls give up after `connect_timeout` rather than `read_timeout`: an
        endpoint that was never reached is more likely mistyped or down than restarting (the
        Go client's DialTimeout).
        """
        return self._answered

    def attempt_timeout(self, remaining: float) -> float:
        """How long one attempt may take when `remaining` seconds are left."""
        if len(self.endpoints) == 1:
            return remaining
        if self._answered:
            share = max(_MIN_ATTEMPT_TIMEOUT, self._read_timeout / _ATTEMPT_SHARE)
        else:
            # Before any answer, every endpoint gets its turn within the connect timeout.
            share = max(_MIN_ATTEMPT_TIMEOUT, self.connect_timeout / len(self.endpoints))
        return min(remaining, share)

    def answered(self, link: Link) -> None:
        """Note that etcd answered on `link`: TLS works, so failures from now on are not TLS's."""
        if not link.answered:
            link.answered = True
            self._answered = True
            # The first channel's first answer is `Connection.open`'s to report (with etcd's
            # version); a later channel's follows a failover or a reconnection.
            logger.log(
                logging.DEBUG if self._channels == 1 else logging.INFO,
                "Connected to etcd at %s",
                link.endpoint,
                extra={"rdzv_endpoint": str(link.endpoint)},
            )

    def verify(self, link: Link, header: Any) -> None:
        """Raise `ForeignCluster` if an answer's header comes from another etcd cluster.

        The first answer pins the cluster's id. An endpoint may later lead to another cluster:
        its port taken over by another etcd after the member died, a DNS name moved, a cluster
        restored from a snapshot (which makes a new cluster, whose data may be older). Its
        answers are never taken for the cluster's.
        """
        cluster_id = int(header.cluster_id)
        if self._cluster_id is None:
            self._cluster_id = cluster_id or None
        elif cluster_id and cluster_id != self._cluster_id:
            raise ForeignCluster(
                f"etcd at {link.endpoint} belongs to cluster {cluster_id:x}, not to cluster "
                f"{self._cluster_id:x} that this connection uses."
            )

    def metadata(self, *, require_leader: bool = False) -> tuple[tuple[str, str], ...]:
        """The call metadata: the auth token, and for watches "only with a leader"."""
        metadata: tuple[tuple[str, str], ...] = ()
        if self._token is not None:
            metadata += (("token", self._token),)
        if require_leader:
            # A member cut off from the leader cancels the watch instead of going silent.
            metadata += (("hasleader", "true"),)
        return metadata

    # ---------------------------------------------------------------------- authentication

    async def authenticate(self, link: Link, timeout: float) -> str | None:
        """Get an auth token if the connection has credentials and no token; return the token."""
        if self.username is None:
            return None
        async with self._auth_lock:
            # Another call may have authenticated while this one waited for the lock.
            if self._token is not None:
                return self._token
            request = rpc.AuthenticateRequest(name=self.username, password=self._password)
            try:
                response = await _calls.unary(link.auth.Authenticate(request, timeout=timeout))
            except grpc.aio.AioRpcError as error:
                if error.code() in _AUTH_REFUSED:
                    raise RendezvousAuthError(
                        f"etcd at {link.endpoint} did not authenticate user "
                        f"{self.username!r}: {error.details()}",
                        **fields(error, link.endpoint),
                    ) from error
                raise
            self.verify(link, response.header)
            self._token = str(response.token)
            logger.debug(
                "Authenticated as etcd user %r at %s",
                self.username,
                link.endpoint,
                extra={"rdzv_endpoint": str(link.endpoint), "rdzv_user": self.username},
            )
            return self._token

    def forget_token(self, token: str | None) -> None:
        """Drop `token` after etcd rejected it, unless another call already replaced it."""
        if token is not None and self._token == token:
            self._token = None

    # --------------------------------------------------------------------------------- TLS

    async def diagnose(self, link: Link, error: grpc.aio.AioRpcError, deadline: float) -> None:
        """Raise `RendezvousTLSError` if TLS cannot work with any endpoint.

        A plain-text client meeting a TLS server only sees the socket close; for that case the
        endpoint is asked once, before anything has worked, whether it speaks TLS.
        """
        diagnosis: RendezvousTLSError | None = None
        if self._credentials is not None:
            diagnosis = handshake_failure(error, link.endpoint)
        elif not self._answered and link.endpoint not in self._probed:
            self._probed.add(link.endpoint)
            if await speaks_tls(link.endpoint, deadline - time.monotonic()):
                diagnosis = plain_client_met_tls(link.endpoint)
        if diagnosis is None:
            return
        self._misconfigured[link.endpoint] = diagnosis
        if len(self._misconfigured) == len(set(self.endpoints)):
            raise diagnosis from error
