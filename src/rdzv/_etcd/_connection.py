"""The connection to etcd: channels, failover, authentication, and every call etcd answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import grpc
import grpc.aio
from aetcd import rpc

from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousAuthError,
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousLeaseNotFoundError,
    RendezvousOutcomeUnknownError,
    RendezvousStateTooLargeError,
    RendezvousTLSError,
    RendezvousWatchCompactedError,
)
from rdzv._etcd._classify import NO_SPACE as _ETCD_NO_SPACE
from rdzv._etcd._classify import is_too_large as _is_too_large
from rdzv._etcd._endpoints import Endpoint, parse_endpoints
from rdzv._etcd._tls import channel_credentials, speaks_tls
from rdzv._etcd._values import (
    Compare,
    KeyValue,
    Operation,
    Put,
    TxnResult,
    WatchEvent,
    fill_range,
    key_value,
    prefix_end,
    txn_request,
)
from rdzv._validation import validate_read_timeout

_ETCD_AUTH_REQUIRED: Final = frozenset(
    {"etcdserver: user name is empty", "etcdserver: invalid auth token"}
)
OutcomeUnknownError = RendezvousOutcomeUnknownError
RevisionCompactedError = RendezvousCompactedError
LeaseNotFoundError = RendezvousLeaseNotFoundError

_INITIAL_BACKOFF: Final = 0.025
_MAX_BACKOFF: Final = 0.5
# With several endpoints, one attempt gets a third of the read timeout, so that a member that
# accepts connections but never answers (a paused process) leaves time to try the others.
_ATTEMPT_SHARE: Final = 3
_MIN_ATTEMPT_TIMEOUT: Final = 1.0
_FINISH_TIMEOUT: Final = 1.0
_DRAIN_SECONDS: Final = 0.1

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

# Codes after which the same request may succeed on a retry, here or on another member: the
# transport failed, the attempt ran out of time, or etcd is between leaders.
_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


async def _finish(call: Any) -> None:
    """Cancel a streaming call and wait until gRPC is done with it.

    gRPC completes a cancelled call's pending operations later, through a process-wide queue;
    if this loop has closed by then, they land on a closed loop and fail whatever loop runs
    next. So the call's end is awaited here, briefly.
    """
    call.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(call.code()), _FINISH_TIMEOUT)


@dataclasses.dataclass(eq=False)
class _Link:
    """A gRPC channel to one endpoint, with its stubs."""

    endpoint: Endpoint
    channel: grpc.aio.Channel
    kv: Any
    lease: Any
    watch: Any
    maintenance: Any
    auth: Any


class Connection:
    """A connection to an etcd cluster, shared by any number of backends and stores.

    It holds one gRPC channel, to one endpoint at a time; when that endpoint stops answering, it
    moves to the next one. Create it with `rdzv.connect` and use it as an async context manager.
    Every call is bounded by `read_timeout`, inside which transient failures (a leader election,
    a restarting member) are retried.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        protocol: str = "http",
        read_timeout: float = 60,
        ca_cert: str | Path | None = None,
        ssl_cert: str | Path | None = None,
        ssl_cert_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._read_timeout = validate_read_timeout(read_timeout)
        if not isinstance(protocol, str) or protocol.lower() not in ("http", "https"):
            raise ValueError("The protocol must be HTTP or HTTPS.")
        self._protocol = protocol.lower()
        self._credentials = channel_credentials(self._protocol, ca_cert, ssl_cert, ssl_cert_key)
        if (username is None) != (password is None):
            raise ValueError("etcd authentication needs both a username and a password.")
        if username is not None and not username:
            raise ValueError("The etcd username must not be empty.")
        self._username = username
        self._password = password
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._link: _Link | None = None
        self._endpoint_index = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        # What is known of TLS misconfiguration, to fail fast on it (see _misconfiguration).
        self._answered = False
        self._sniffed: set[Endpoint] = set()
        self._misconfigured: dict[Endpoint, RendezvousTLSError] = {}

    def __repr__(self) -> str:
        endpoints = ",".join(map(str, self._endpoints))
        user = f", username={self._username!r}" if self._username else ""
        return f"<rdzv.Connection {self._protocol}://{endpoints}{user}>"

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints, in the order they are tried."""
        return self._endpoints

    @property
    def read_timeout(self) -> float:
        """The bound, in seconds, on every call, retries included."""
        return self._read_timeout

    async def __aenter__(self) -> Connection:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Check that etcd answers (and accepts the credentials) within the read timeout."""
        await self.status()

    async def aclose(self) -> None:
        """Close the channel; calls in progress fail. Closing twice is harmless."""
        self._closed = True
        self._resumed.set()
        link, self._link = self._link, None
        if link is not None:
            await link.channel.close(grace=None)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        # gRPC delivers the last completions of a closed channel a moment later, through a
        # process-wide queue; if this loop closes first, they land on a closed loop and fail the
        # next loop that runs gRPC. A short wait lets them arrive here (measured: 0.1 s is
        # enough; without it, 10 closes out of 10 leaked one).
        await asyncio.sleep(_DRAIN_SECONDS)

    async def suspend(self) -> None:
        """Close the channel and hold new calls until `resume()`.

        gRPC cannot survive a fork() while its threads are busy: the synchronous facade calls
        this before a fork, so the child starts with no live channel. Calls in progress are
        retried once the connection resumes.
        """
        self._resumed.clear()
        link, self._link = self._link, None
        if link is not None:
            await link.channel.close(grace=None)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def resume(self) -> None:
        """Let calls held by `suspend()` go on; they open a new channel."""
        self._resumed.set()

    # ---------------------------------------------------------------------------- plumbing

    def deadline(self) -> float:
        """The monotonic time by which a call starting now must finish."""
        return time.monotonic() + self._read_timeout

    async def _acquire_link(self) -> _Link:
        if not self._resumed.is_set():
            await self._resumed.wait()
        if self._closed:
            raise RendezvousError("This etcd connection is closed.")
        if self._link is None:
            endpoint = self._endpoints[self._endpoint_index]
            target = str(endpoint)
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    target, self._credentials, options=_CHANNEL_OPTIONS
                )
            self._link = _Link(
                endpoint=endpoint,
                channel=channel,
                kv=rpc.KVStub(channel),
                lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel),
                maintenance=rpc.MaintenanceStub(channel),
                auth=rpc.AuthStub(channel),
            )
        return self._link

    def _fail_over(self, link: _Link) -> None:
        """Move to the next endpoint after `link` failed (unless another call already moved)."""
        if self._link is not link or len(self._endpoints) == 1:
            # With one endpoint, gRPC's own reconnection is all we can do.
            return
        self._link = None
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        # Calls still running on the old channel get an attempt's time to finish.
        task = asyncio.get_running_loop().create_task(
            link.channel.close(grace=self._attempt_timeout(self._read_timeout))
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _after_transient_failure(self, link: _Link, error: grpc.aio.AioRpcError) -> None:
        """Fail over after a transient-looking failure, or raise if TLS cannot work at all."""
        diagnosis = await self._misconfiguration(link, error)
        if diagnosis is not None:
            self._misconfigured[link.endpoint] = diagnosis
            if len(self._misconfigured) == len(self._endpoints):
                raise diagnosis from error
        self._fail_over(link)

    async def _misconfiguration(
        self, link: _Link, error: grpc.aio.AioRpcError
    ) -> RendezvousTLSError | None:
        """A TLS misconfiguration behind a failure that gRPC reports as UNAVAILABLE.

        gRPC gives TLS failures no status code of their own, so its fixed descriptions ("Tls
        handshake failed", "Handshake read failed", and "TSI_..." errors of its transport
        security layer, such as a client certificate rejected after a TLS 1.3 handshake) are
        what tell them from a dead server.
        A plain-text client meeting a TLS server only sees the socket close; for that case the
        endpoint is asked once, before anything has worked, whether it speaks TLS.
        """
        if self._credentials is not None:
            details = (error.details() or "").lower()
            if "handshake" not in details and "tsi_" not in details:
                return None
            return RendezvousTLSError(
                f"The TLS handshake with etcd at {link.endpoint} failed: check ca_cert, ssl_cert "
                f"and ssl_cert_key, and that etcd serves TLS there. gRPC: {error.details()}"
            )
        if self._answered or link.endpoint in self._sniffed:
            return None
        self._sniffed.add(link.endpoint)
        if not await speaks_tls(link.endpoint, 2):
            return None
        return RendezvousTLSError(
            f"etcd at {link.endpoint} serves TLS, but this connection uses plain text: "
            "connect with protocol='https'."
        )

    def _attempt_timeout(self, remaining: float) -> float:
        if len(self._endpoints) == 1:
            return remaining
        share = max(_MIN_ATTEMPT_TIMEOUT, self._read_timeout / _ATTEMPT_SHARE)
        return min(remaining, share)

    def _metadata(self, *, require_leader: bool = False) -> tuple[tuple[str, str], ...]:
        metadata: tuple[tuple[str, str], ...] = ()
        if self._token is not None:
            metadata += (("token", self._token),)
        if require_leader:
            # A member cut off from the leader cancels the watch instead of going silent.
            metadata += (("hasleader", "true"),)
        return metadata

    def _needs_token(self) -> bool:
        return self._username is not None and self._token is None

    async def _authenticate(self, link: _Link, timeout: float) -> None:
        if not self._needs_token():
            return
        async with self._auth_lock:
            # Another call may have authenticated while this one waited for the lock.
            if not self._needs_token():
                return
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                response = await link.auth.Authenticate(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    raise RendezvousAuthError(
                        f"etcd did not authenticate user {self._username!r}: {error.details()}"
                    ) from error
                raise
            self._token = response.token

    async def _backoff(self, delay: float, deadline: float) -> float:
        jittered = delay * random.uniform(0.5, 1.0)
        await asyncio.sleep(min(jittered, max(0.0, deadline - time.monotonic())))
        return min(delay * 2, _MAX_BACKOFF)

    def _translate(self, error: grpc.aio.AioRpcError, what: str) -> RendezvousError:
        code = error.code()
        if code in _TRANSIENT_CODES:
            return RendezvousConnectionError(CONNECTION_FAILED_MESSAGE)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return RendezvousAuthError(
                f"etcd refused to let user {self._username!r} {what}: {error.details()}"
            )
        if error.details() in _ETCD_AUTH_REQUIRED:
            return RendezvousAuthError(
                f"etcd requires authentication to {what}: connect with a username and password "
                f"({error.details()})."
            )
        if error.details() == _ETCD_NO_SPACE:
            return RendezvousError(
                f"etcd is out of space and refuses to {what}: compact and defragment it, then "
                "disarm its NOSPACE alarm."
            )
        if code is grpc.StatusCode.NOT_FOUND:
            # The only thing our calls name that etcd can fail to find is a lease.
            return LeaseNotFoundError(f"etcd cannot {what}: {error.details()}")
        if code is grpc.StatusCode.OUT_OF_RANGE:
            return RevisionCompactedError(f"etcd cannot {what}: {error.details()}")
        return RendezvousError(f"etcd refused to {what}: {code.name}: {error.details()}")

    async def _unary(self, stub: str, method: str, request: Any, *, what: str) -> Any:
        """Run an idempotent call, retrying transient failures until the read timeout."""
        deadline = self.deadline()
        delay = _INITIAL_BACKOFF
        reauthenticated = False
        last_error: BaseException | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            link = await self._acquire_link()
            timeout = self._attempt_timeout(remaining)
            try:
                await self._authenticate(link, timeout)
                call = getattr(getattr(link, stub), method)
                response = await call(request, timeout=timeout, metadata=self._metadata())
                self._answered = True
                return response
            except grpc.aio.AioRpcError as error:
                last_error = error
                if error.code() in _TRANSIENT_CODES:
                    await self._after_transient_failure(link, error)
                    delay = await self._backoff(delay, deadline)
                elif error.code() is grpc.StatusCode.UNAUTHENTICATED and not reauthenticated:
                    # The auth token expired: authenticate again, once.
                    self._token = None
                    reauthenticated = True
                else:
                    raise self._translate(error, what) from error
        raise RendezvousConnectionError(CONNECTION_FAILED_MESSAGE) from last_error

    async def _wait_ready(self, link: _Link, timeout: float) -> bool:
        """Connect `link` if needed; false if it could not connect within `timeout`."""
        if link.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(link.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------------------- operations

    async def status(self) -> Any:
        """Ask the current member for its status (a cheap check that etcd answers)."""
        return await self._unary("maintenance", "Status", rpc.StatusRequest(), what="report status")

    async def range(
        self, key: bytes, *, prefix: bool = False, revision: int = 0
    ) -> tuple[tuple[KeyValue, ...], int]:
        """Read `key` (or a prefix), linearizably; return the keys and etcd's revision.

        With `revision`, read the keys as they were at that revision.
        """
        request = fill_range(rpc.RangeRequest(), key, prefix=prefix, revision=revision)
        response = await self._unary("kv", "Range", request, what=f"read {key!r}")
        return tuple(key_value(kv) for kv in response.kvs), response.header.revision

    async def get(self, key: bytes, *, revision: int = 0) -> KeyValue | None:
        """Read one key, or `None` if it does not exist."""
        kvs, _ = await self.range(key, revision=revision)
        return kvs[0] if kvs else None

    async def count(self, key: bytes, *, prefix: bool = False) -> int:
        """Count the keys at `key` (or under a prefix), linearizably, without reading them."""
        request = rpc.RangeRequest(
            key=key, range_end=prefix_end(key) if prefix else b"", count_only=True
        )
        response = await self._unary("kv", "Range", request, what=f"count {key!r}")
        return int(response.count)

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete `key` (or a prefix); return how many keys were deleted."""
        request = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        response = await self._unary("kv", "DeleteRange", request, what=f"delete {key!r}")
        return int(response.deleted)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write `value` at `key` unconditionally; return the write's revision.

        Retried like a read: writing the same value twice leaves the same value.
        """
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        try:
            response = await self._unary("kv", "Put", request, what=f"write {key!r}")
        except RendezvousError as error:
            cause = error.__cause__
            if (
                isinstance(cause, grpc.aio.AioRpcError)
                and cause.code() is grpc.StatusCode.NOT_FOUND
            ):
                raise LeaseNotFoundError(f"etcd has no such lease: {cause.details()}") from cause
            raise
        return int(response.header.revision)

    async def grant_lease(self, ttl: int) -> int:
        """Grant a lease of `ttl` seconds and return its id."""
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=0)
        response = await self._unary("lease", "LeaseGrant", request, what="grant a lease")
        return int(response.ID)

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds left before lease `lease_id` expires; -1 if etcd no longer has it."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        response = await self._unary(
            "lease", "LeaseTimeToLive", request, what=f"read lease {lease_id:x}"
        )
        return int(response.TTL)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
        *,
        what: str = "run a transaction",
    ) -> TxnResult:
        """Run one transaction: if every `compare` holds, `success`, else `failure`.

        A transaction is not retried once it may have reached etcd: then `OutcomeUnknownError`
        says that it may or may not have been applied, and the caller resolves it by reading.
        Raises `LeaseNotFoundError` if a `Put` names an expired lease (nothing was written).
        """
        request = txn_request(compare, success, failure)
        written = sum(len(op.value) for op in (*success, *failure) if isinstance(op, Put))
        deadline = self.deadline()
        delay = _INITIAL_BACKOFF
        reauthenticated = False
        last_error: BaseException | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            link = await self._acquire_link()
            timeout = self._attempt_timeout(remaining)
            try:
                await self._authenticate(link, timeout)
                if not await self._wait_ready(link, timeout):
                    # Nothing was sent: safe to try again, elsewhere.
                    self._fail_over(link)
                    delay = await self._backoff(delay, deadline)
                    continue
                response = await link.kv.Txn(request, timeout=timeout, metadata=self._metadata())
            except grpc.aio.AioRpcError as error:
                last_error = error
                code = error.code()
                if code in _TRANSIENT_CODES:
                    await self._after_transient_failure(link, error)
                    raise OutcomeUnknownError(CONNECTION_FAILED_MESSAGE, key=repr(what)) from error
                if code is grpc.StatusCode.UNAUTHENTICATED and not reauthenticated:
                    self._token = None
                    reauthenticated = True
                    continue
                if _is_too_large(error):
                    raise RendezvousStateTooLargeError(
                        f"etcd refused to store {written} bytes: {error.details()}. Nothing was "
                        "written; raise etcd's --max-request-bytes or store less."
                    ) from error
                raise self._translate(error, what) from error
            self._answered = True
            ranges = tuple(
                tuple(key_value(kv) for kv in op.response_range.kvs)
                if op.WhichOneof("response") == "response_range"
                else ()
                for op in response.responses
            )
            return TxnResult(bool(response.succeeded), int(response.header.revision), ranges)
        raise RendezvousConnectionError(CONNECTION_FAILED_MESSAGE) from last_error

    async def watch(
        self, key: bytes, *, start_revision: int, prefix: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        """Yield every change of `key` (or a prefix) from `start_revision` on, forever.

        `start_revision=0` means "from now". When the stream breaks, the watch resumes after
        the last event it yielded, on this or another member; if it cannot for a whole read
        timeout, it raises `RendezvousConnectionError`. If etcd has compacted the revisions it
        needs, it raises `RendezvousWatchCompactedError`.
        """
        next_revision = start_revision
        range_end = prefix_end(key) if prefix else b""
        delay = _INITIAL_BACKOFF
        failing_since: float | None = None
        last_error: BaseException | None = None
        reauthenticated = False
        while True:
            link = await self._acquire_link()
            call = None
            try:
                await self._authenticate(link, self._attempt_timeout(self._read_timeout))
                call = link.watch.Watch(metadata=self._metadata(require_leader=True))
                create = rpc.WatchCreateRequest(
                    key=key, range_end=range_end, start_revision=next_revision
                )
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    if response.compact_revision:
                        raise RendezvousWatchCompactedError(
                            f"Cannot watch {key!r} from revision {next_revision}: etcd has "
                            f"compacted history up to revision {response.compact_revision}. "
                            "Read the current state and watch from its token.",
                            compact_revision=int(response.compact_revision),
                        )
                    if response.canceled:
                        break
                    if response.created:
                        failing_since, delay, reauthenticated = None, _INITIAL_BACKOFF, False
                        self._answered = True
                    for event in response.events:
                        kv = key_value(event.kv)
                        next_revision = kv.mod_revision + 1
                        yield WatchEvent(kv=kv, deleted=event.type == rpc.Event.DELETE)
            except grpc.aio.AioRpcError as error:
                last_error = error
                if error.code() is grpc.StatusCode.UNAUTHENTICATED and not reauthenticated:
                    self._token = None
                    reauthenticated = True
                elif error.code() in _TRANSIENT_CODES or error.code() is grpc.StatusCode.INTERNAL:
                    # A member dying while the stream opens surfaces as INTERNAL ("Internal
                    # error from Core"); resuming is bounded by the read timeout anyway.
                    await self._after_transient_failure(link, error)
                else:
                    raise self._translate(error, f"watch {key!r}") from error
            finally:
                if call is not None:
                    await _finish(call)
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > self._read_timeout:
                raise RendezvousConnectionError(CONNECTION_FAILED_MESSAGE) from last_error
            delay = await self._backoff(delay, failing_since + self._read_timeout)

    async def first_change_after(self, key: bytes, revision: int) -> WatchEvent:
        """The first change of `key` after `revision`; the caller knows that there is one."""
        changes = self.watch(key, start_revision=revision + 1)
        try:
            with anyio.fail_after(self._read_timeout):
                async for event in changes:
                    return event
        except TimeoutError:
            pass
        finally:
            await changes.aclose()
        raise RendezvousConnectionError(CONNECTION_FAILED_MESSAGE)


def connect(
    endpoints: str | Sequence[str],
    *,
    protocol: str = "http",
    read_timeout: float = 60,
    ca_cert: str | Path | None = None,
    ssl_cert: str | Path | None = None,
    ssl_cert_key: str | Path | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Connection:
    """Make a `Connection` to etcd; use it as `async with rdzv.connect(...) as connection:`.

    Args:
        endpoints: `"host:port"`, or several separated by commas, tried in order: the connection
            moves to the next when one stops answering. The port defaults to 2379; IPv6
            addresses go in brackets.
        protocol: `"http"` or `"https"` (TLS), in any case.
        read_timeout: seconds that any one call may take, retries included.
        ca_cert: with https, the CA certificate that signed the server's (PEM file); the
            system's trusted CAs if omitted.
        ssl_cert: with https, a client certificate (PEM file), for servers that require one.
        ssl_cert_key: the client certificate's private key (PEM file).
        username: an etcd user, when etcd has authentication enabled.
        password: that user's password.

    Bad arguments raise `ValueError` here, before anything is sent. Entering the connection
    checks that etcd answers, and raises `RendezvousConnectionError` within `read_timeout` if
    it does not (`RendezvousAuthError` if it rejects the credentials).
    """
    return Connection(
        endpoints,
        protocol=protocol,
        read_timeout=read_timeout,
        ca_cert=ca_cert,
        ssl_cert=ssl_cert,
        ssl_cert_key=ssl_cert_key,
        username=username,
        password=password,
    )
