"""The connection to etcd: channels, failover, authentication, and every call etcd answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import grpc
import grpc.aio
from aetcd import rpc

from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousConnectionError,
    RendezvousLeaseNotFoundError,
    RendezvousWatchCompactedError,
)
from rdzv._etcd import _calls
from rdzv._etcd._attempts import Refused, despite_cancellation, drive, task_cancelling
from rdzv._etcd._classify import (
    LEASE_EXISTS,
    Kind,
    classify,
    fields,
    is_auth_refusal,
    synthetic,
    translate,
)
from rdzv._etcd._endpoints import Endpoint
from rdzv._etcd._keepalive import KeepAlive, LeaseKeeper
from rdzv._etcd._links import Link, Links
from rdzv._etcd._options import ConnectionKeywords, ConnectionOptions, as_options
from rdzv._etcd._tls import channel_credentials
from rdzv._etcd._values import (
    Compare,
    Get,
    KeyValue,
    Nested,
    Operation,
    Put,
    TxnResult,
    WatchEvent,
    fill_range,
    key_value,
    prefix_end,
    txn_request,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

_FINISH_TIMEOUT: Final = 1.0
_CLOSE_TIMEOUT: Final = 5.0

logger = logging.getLogger("rdzv.etcd")
lease_logger = logging.getLogger("rdzv.lease")


def _new_lease_id() -> int:
    """A lease id for a grant: random, so that two clients' picks meet once in 2**62 grants."""
    return secrets.randbits(63) or 1  # 0 asks etcd to pick


def _shown_key(key: bytes) -> str:
    """An etcd key for a log record: its text, with undecodable bytes escaped."""
    return key.decode("utf-8", "backslashreplace")


async def _finish(call: Any) -> None:
    """Cancel a streaming call and wait until gRPC is done with it.

    gRPC completes a cancelled call's pending operations later, through a process-wide queue;
    if this loop has closed by then, they land on a closed loop and fail whatever loop runs
    next. So the call's end is awaited here, briefly.
    """
    call.cancel()
    await despite_cancellation(call.code(), _FINISH_TIMEOUT)


def _reads_only(operations: Sequence[Operation]) -> bool:
    """Whether a transaction branch only reads (so sending it twice changes nothing)."""
    return all(
        isinstance(op, Get)
        or (isinstance(op, Nested) and _reads_only(op.success) and _reads_only(op.failure))
        for op in operations
    )


@dataclasses.dataclass
class _WatchStream:
    """An open watch: its call, the link it runs on, and the events of its first answer."""

    call: Any
    link: Link
    first: tuple[WatchEvent, ...]


def _events(response: Any) -> tuple[WatchEvent, ...]:
    return tuple(
        WatchEvent(kv=key_value(event.kv), deleted=event.type == rpc.Event.DELETE)
        for event in response.events
    )


def _compacted(key: bytes, start_revision: int, response: Any) -> RendezvousWatchCompactedError:
    logger.warning(
        "Cannot watch %r from revision %d: etcd has compacted history up to revision %d",
        _shown_key(key),
        start_revision,
        response.compact_revision,
        extra={
            "rdzv_key": _shown_key(key),
            "rdzv_revision": start_revision,
            "rdzv_compact_revision": int(response.compact_revision),
        },
    )
    return RendezvousWatchCompactedError(
        f"Cannot watch {key!r} from revision {start_revision}: etcd has compacted history up to "
        f"revision {response.compact_revision}. Read the current state and watch from its token.",
        compact_revision=int(response.compact_revision),
    )


async def open_watch(
    links: Links,
    link: Link,
    timeout: float,
    *,
    key: bytes,
    range_end: bytes = b"",
    start_revision: int = 0,
) -> _WatchStream:
    """Create a watch on `link` and wait for etcd to confirm it (the caller ends its call)."""
    call = link.watch.Watch(metadata=links.metadata(require_leader=True))
    try:
        create = rpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision)
        await _calls.write(call, rpc.WatchRequest(create_request=create))
        try:
            with anyio.fail_after(timeout):  # not wait_for: see _keepalive._open_stream
                response = await _calls.read(call)
        except TimeoutError:
            raise synthetic(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to a watch") from None
        if response is grpc.aio.EOF:
            raise synthetic(grpc.StatusCode.UNAVAILABLE, "the watch stream ended")
        links.verify(link, response.header)
        if response.compact_revision:
            raise _compacted(key, start_revision, response)
        if response.canceled:
            reason = str(response.cancel_reason)
            raise Refused(reason, auth=is_auth_refusal(reason))
    except BaseException:
        await _finish(call)
        raise
    return _WatchStream(call=call, link=link, first=_events(response))


class Connection:
    """A connection to an etcd cluster, shared by any number of backends and stores.

    It holds one gRPC channel, to one endpoint at a time; when that endpoint stops answering, it
    moves to the next one. Create it with `rdzv.connect` and use it as an async context manager.
    Every call is bounded by `read_timeout`, inside which transient failures (a leader election,
    a restarting member) are retried; until some endpoint has answered once, by the shorter
    `connect_timeout`.

    Its etcd calls (`range`, `get`, `put`, `delete`, `txn`, `watch`, the lease calls) are
    etcd's own, typed with `rdzv.KeyValue`, `rdzv.Compare`, `rdzv.Put`, `rdzv.Get`,
    `rdzv.Delete`, `rdzv.Nested`, `rdzv.TxnResult` and `rdzv.WatchEvent`: rdzv's objects use
    them, and so may code that keeps keys of its own beside a job's.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | ConnectionOptions,
        **options: Unpack[ConnectionKeywords],
    ) -> None:
        self._options = options_ = as_options(endpoints, **options)
        self._endpoints, self._protocol = options_.endpoints, options_.protocol
        self._read_timeout = options_.read_timeout
        self._connect_timeout = options_.connect_timeout
        self._credentials = channel_credentials(
            options_.protocol, options_.ca_cert, options_.ssl_cert, options_.ssl_cert_key
        )
        self._username = options_.username
        self._revision = 0
        self._links = Links(
            self._endpoints,
            credentials=self._credentials,
            username=options_.username,
            password=options_.password,
            read_timeout=self._read_timeout,
            connect_timeout=self._connect_timeout,
            max_in_flight=options_.max_in_flight,
        )
        self._keepalive = KeepAlive(self._links, read_timeout=self._read_timeout, finish=_finish)

    def __repr__(self) -> str:
        endpoints = ",".join(map(str, self._endpoints))
        user = f", username={self._username!r}" if self._username else ""
        return f"<rdzv.Connection {self._protocol}://{endpoints}{user}>"

    @property
    def options(self) -> ConnectionOptions:
        """The options this connection was made with, resolved."""
        return self._options

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints, in the order they are tried."""
        return self._endpoints

    @property
    def read_timeout(self) -> float:
        """The bound, in seconds, on every call, retries included."""
        return self._read_timeout

    @property
    def connect_timeout(self) -> float:
        """The bound, in seconds, on every call made before any endpoint has answered once."""
        return self._connect_timeout

    async def __aenter__(self) -> Connection:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Check that etcd answers (and accepts the credentials).

        On a connection that no endpoint has answered yet, within `connect_timeout` (or
        `read_timeout`, if shorter); the error names every endpoint and why it did not answer.
        """
        status = await self.status()
        endpoint = self._links.current_endpoint
        logger.info(
            "Connected to etcd %s at %s (endpoints: %s)",
            status.version,
            endpoint,
            ",".join(map(str, self._endpoints)),
            extra={
                "rdzv_endpoint": str(endpoint),
                "rdzv_version": str(status.version),
                "rdzv_endpoints": tuple(map(str, self._endpoints)),
            },
        )

    async def aclose(self) -> None:
        """Close the channel; calls in progress fail with `RendezvousError`. Harmless twice.

        A cancellation (a timeout or task group around `async with connect(...)`) does not cut
        the close short: see `despite_cancellation`.
        """
        await despite_cancellation(self._close(), _CLOSE_TIMEOUT)

    async def _close(self) -> None:
        await self._keepalive.aclose()
        await self._links.aclose()

    @property
    def revision(self) -> int:
        """The newest etcd revision that an answer to this connection has shown (0: none yet).

        A request sent after reading it is applied at a later revision: a write whose answer
        was lost is looked for in the history after it.
        """
        return self._revision

    def _saw(self, revision: int) -> None:
        self._revision = max(self._revision, int(revision))

    async def _unary(
        self, stub: str, method: str, request: Any, *, what: str, deadline: float | None
    ) -> Any:
        """Run an idempotent call, retrying transient failures until the deadline."""

        async def send(link: Link, timeout: float) -> Any:
            call = getattr(getattr(link, stub), method)
            response = await _calls.unary(
                call(request, timeout=timeout, metadata=self._links.metadata())
            )
            self._links.verify(link, response.header)
            self._saw(response.header.revision)
            return response

        return await drive(
            self._links,
            send,
            what=what,
            deadline=read_deadline(self) if deadline is None else deadline,
        )

    # ---------------------------------------------------------------------------- operations

    async def status(self, *, deadline: float | None = None) -> Any:
        """Ask the current member for its status (a cheap check that etcd answers)."""
        return await self._unary(
            "maintenance", "Status", rpc.StatusRequest(), what="report status", deadline=deadline
        )

    async def range(
        self, key: bytes, *, prefix: bool = False, revision: int = 0, deadline: float | None = None
    ) -> tuple[tuple[KeyValue, ...], int]:
        """Read `key` (or a prefix), linearizably; return the keys and etcd's revision.

        With `revision`, read the keys as they were at that revision.
        """
        request = fill_range(rpc.RangeRequest(), key, prefix=prefix, revision=revision)
        response = await self._unary(
            "kv", "Range", request, what=f"read {key!r}", deadline=deadline
        )
        return tuple(key_value(kv) for kv in response.kvs), response.header.revision

    async def get(
        self, key: bytes, *, revision: int = 0, deadline: float | None = None
    ) -> KeyValue | None:
        """Read one key, or `None` if it does not exist."""
        kvs, _ = await self.range(key, revision=revision, deadline=deadline)
        return kvs[0] if kvs else None

    async def delete(
        self, key: bytes, *, prefix: bool = False, deadline: float | None = None
    ) -> int:
        """Delete `key` (or a prefix); return how many keys were deleted."""
        request = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        response = await self._unary(
            "kv", "DeleteRange", request, what=f"delete {key!r}", deadline=deadline
        )
        return int(response.deleted)

    async def put(
        self, key: bytes, value: bytes, *, lease: int = 0, deadline: float | None = None
    ) -> int:
        """Write `value` at `key` unconditionally; return the write's revision.

        Retried like a read: writing the same value twice leaves the same value. Raises
        `RendezvousLeaseNotFoundError` if `lease` has expired (nothing was written).
        """
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        response = await self._unary("kv", "Put", request, what=f"write {key!r}", deadline=deadline)
        return int(response.header.revision)

    async def grant_lease(self, ttl: int, *, deadline: float | None = None) -> int:
        """Grant a lease of `ttl` seconds and return its id.

        rdzv picks the id (63 random bits), so that a grant whose answer was lost is sent again
        with it: etcd then answers that the lease exists, and that is the grant that landed. A
        grant etcd picked the id of would grant a second lease instead, and the first, which
        nobody keeps alive, would cost etcd an expiry later: under overload, when etcd times
        out many grants, thousands of them.
        """
        lease_id = _new_lease_id()
        attempts = 0

        async def send(link: Link, timeout: float) -> int:
            nonlocal attempts, lease_id
            attempts += 1
            while True:
                request = rpc.LeaseGrantRequest(TTL=ttl, ID=lease_id)
                try:
                    response = await _calls.unary(
                        link.lease.LeaseGrant(
                            request, timeout=timeout, metadata=self._links.metadata()
                        )
                    )
                except grpc.aio.AioRpcError as error:
                    if error.details() != LEASE_EXISTS:
                        raise
                    if attempts > 1:
                        return lease_id  # an earlier attempt of this grant landed
                    lease_id = _new_lease_id()  # another lease has this id: pick another
                    continue
                self._links.verify(link, response.header)
                self._saw(response.header.revision)
                return int(response.ID)

        granted = await drive(
            self._links,
            send,
            what="grant a lease",
            deadline=read_deadline(self) if deadline is None else deadline,
        )
        if lease_logger.isEnabledFor(logging.DEBUG):
            lease_logger.debug(
                "Granted lease %x of %d s",
                granted,
                ttl,
                extra={"rdzv_lease": granted, "rdzv_ttl": ttl},
            )
        return granted

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds left before lease `lease_id` expires; -1 if etcd no longer has it."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        response = await self._unary(
            "lease", "LeaseTimeToLive", request, what=f"read lease {lease_id:x}", deadline=None
        )
        return int(response.TTL)

    async def revoke_lease(self, lease_id: int, *, deadline: float | None = None) -> None:
        """Revoke the lease (its keys are deleted); harmless if etcd no longer has it."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        self._keepalive.revoking.add(lease_id)
        try:
            # Not found: it expired, or was revoked (perhaps by an attempt whose answer was lost).
            with contextlib.suppress(RendezvousLeaseNotFoundError):
                await self._unary(
                    "lease",
                    "LeaseRevoke",
                    request,
                    what=f"revoke lease {lease_id:x}",
                    deadline=deadline,
                )
            self._keepalive.revoked(lease_id)
        finally:
            self._keepalive.revoking.discard(lease_id)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
        *,
        what: str = "run a transaction",
        deadline: float | None = None,
    ) -> TxnResult:
        """Run one transaction: if every `compare` holds, `success`, else `failure`.

        A transaction that writes is never sent twice: once it may have reached etcd and no
        answer came, `RendezvousOutcomeUnknownError` says that it may or may not have been
        applied, and the caller resolves that by reading. One that only reads is retried like
        a read. Raises `RendezvousLeaseNotFoundError` if a `Put`
        names an expired lease, and `RendezvousStateTooLargeError` if etcd refuses the size
        (in both cases nothing was written).
        """
        request = txn_request(compare, success, failure)
        keys = [op.key for op in success if isinstance(op, Put)]

        async def send(link: Link, timeout: float) -> Any:
            response = await _calls.unary(
                link.kv.Txn(request, timeout=timeout, metadata=self._links.metadata())
            )
            self._links.verify(link, response.header)
            self._saw(response.header.revision)
            return response

        response = await drive(
            self._links,
            send,
            what=what,
            deadline=read_deadline(self) if deadline is None else deadline,
            may_resend=_reads_only(success) and _reads_only(failure),
            key=keys[0].decode(errors="replace") if keys else None,
        )
        ranges = tuple(
            tuple(key_value(kv) for kv in op.response_range.kvs)
            if op.WhichOneof("response") == "response_range"
            else ()
            for op in response.responses
        )
        counts = tuple(
            int(op.response_range.count) if op.WhichOneof("response") == "response_range" else 0
            for op in response.responses
        )
        nested = tuple(
            op.WhichOneof("response") == "response_txn" and bool(op.response_txn.succeeded)
            for op in response.responses
        )
        return TxnResult(
            bool(response.succeeded), int(response.header.revision), ranges, counts, nested
        )

    async def watch(
        self, key: bytes, *, start_revision: int, prefix: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        """Yield every change of `key` (or a prefix) from `start_revision` on, forever.

        `start_revision=0` means "from now". When the stream breaks, the watch resumes after
        the last event it yielded, on this or another member; if it cannot for a whole read
        timeout, it raises `RendezvousConnectionError`. If etcd has compacted the revisions it
        needs, it raises `RendezvousWatchCompactedError`; if the user may not read the key,
        `RendezvousAuthError`.
        """
        next_revision = start_revision
        range_end = prefix_end(key) if prefix else b""
        # The endpoint of the stream that broke, once one has (not its link: see `Links.suspend`).
        broken: Endpoint | None = None
        while True:
            open_stream = functools.partial(
                open_watch,
                self._links,
                key=key,
                range_end=range_end,
                start_revision=next_revision,
            )
            stream = await drive(
                self._links, open_stream, what=f"watch {key!r}", deadline=read_deadline(self)
            )
            if broken is not None:
                logger.info(
                    "The watch of %r resumed at %s from revision %d (its stream to %s broke)",
                    _shown_key(key),
                    stream.link.endpoint,
                    next_revision,
                    broken,
                    extra={
                        "rdzv_key": _shown_key(key),
                        "rdzv_endpoint": str(stream.link.endpoint),
                        "rdzv_revision": next_revision,
                    },
                )
            broken = stream.link.endpoint
            try:
                for event in stream.first:
                    next_revision = event.kv.mod_revision + 1
                    yield event
                async for event in self._follow(stream, key, next_revision):
                    next_revision = event.kv.mod_revision + 1
                    yield event
            finally:
                await _finish(stream.call)
                del stream  # its channel may be retired: let it go (see Links.suspend)

    async def _follow(
        self, stream: _WatchStream, key: bytes, next_revision: int
    ) -> AsyncGenerator[WatchEvent, None]:
        """The events of an open watch until its stream breaks (then the caller reopens it)."""
        while True:
            try:
                response = await _calls.read(stream.call)
            except grpc.aio.AioRpcError as error:
                if classify(error) is Kind.FINAL:
                    raise translate(
                        error,
                        what=f"watch {key!r}",
                        endpoint=stream.link.endpoint,
                        username=self._username,
                    ) from error
                if classify(error) is Kind.TRANSIENT:
                    known = fields(error, stream.link.endpoint)
                    self._links.fail_over(
                        stream.link, f"a watch broke: {known['code']}: {known['details']}"
                    )
                return
            except asyncio.CancelledError:
                if not stream.link.retired or task_cancelling():
                    raise  # a cancellation of the task itself must never be swallowed
                return
            if response is grpc.aio.EOF or (response.canceled and not response.compact_revision):
                return
            if response.compact_revision:
                raise _compacted(key, next_revision, response)
            for event in _events(response):
                next_revision = event.kv.mod_revision + 1
                yield event


def connect(
    endpoints: str | Sequence[str] | ConnectionOptions, **options: Unpack[ConnectionKeywords]
) -> Connection:
    """Make a `Connection` to etcd; use it as `async with rdzv.connect(...) as connection:`.

    `endpoints` is a `ConnectionOptions`, or its first argument with the others as keywords
    (`protocol`, `read_timeout`, `connect_timeout`, `max_in_flight`, `ca_cert`, `ssl_cert`,
    `ssl_cert_key`, `username`, `password`): see `ConnectionOptions` for each.

    Bad arguments raise `ValueError` here, before anything is sent. Entering the connection
    checks that etcd answers, and raises `RendezvousConnectionError` within `connect_timeout`
    if it does not (`RendezvousAuthError` if it rejects the credentials).
    """
    return Connection(endpoints, **options)


# ---------------------------------------------------------------------- rdzv's own plumbing
# Functions of a connection that rdzv's own objects call, and users have no use for: they are
# not methods, so that the public `Connection` shows only what a user may call.


def read_deadline(connection: Connection) -> float:
    """The monotonic time by which a call on `connection` starting now must finish."""
    return time.monotonic() + connection.read_timeout


async def suspend(connection: Connection) -> None:
    """Close the channel and hold new calls until `resume(connection)` (before a fork).

    Calls in progress end on the closed channel and are retried, or for a write resolved, once
    the connection resumes, within their own read timeout. Kept leases are refreshed again
    after `resume`.
    """
    await connection._keepalive.suspend()
    await connection._links.suspend()


def resume(connection: Connection) -> None:
    """Let calls held by `suspend(connection)` go on; they open a new channel."""
    connection._links.resume()
    connection._keepalive.resume()


def keep_alive(
    connection: Connection, lease_id: int, ttl: int, *, granted_at: float | None = None
) -> LeaseKeeper:
    """Keep lease `lease_id` (granted with `ttl` s) alive in the background until released.

    Every lease of the connection is refreshed on one shared LeaseKeepAlive stream, every
    `ttl / 3` seconds. The first refresh is at once, or, given `granted_at` (the
    `time.monotonic()` time the grant was asked for), `ttl / 3` seconds after it: a lease just
    granted needs none sooner. The keeper reports when the lease expired, or must be presumed
    expired (see `LeaseKeeper`). Raises `ValueError` for an id or ttl that is not a positive int.
    """
    return connection._keepalive.keep(lease_id, ttl, refreshing=True, since=granted_at)


def follow_lease(
    connection: Connection, lease_id: int, ttl: int, *, granted_at: float | None = None
) -> LeaseKeeper:
    """Follow lease `lease_id` (granted with `ttl` seconds) without refreshing it.

    The keeper learns etcd's answers to `refresh_lease(connection, lease_id)`: it says how long
    the lease surely lives (`LeaseKeeper.alive_until`), and when it expired. `granted_at` is the
    `time.monotonic()` time the lease was asked for (by default, now).
    """
    return connection._keepalive.keep(lease_id, ttl, refreshing=False, since=granted_at)


async def refresh_lease(connection: Connection, lease_id: int) -> None:
    """Send one keep-alive for `lease_id` now on the shared stream, without awaiting the answer.

    It is written by the connection's keep-alive task as soon as this coroutine yields (a
    keep-alive sent alongside a write is on the wire with it). Raises `RendezvousError` if the
    connection is closed.
    """
    connection._keepalive.refresh(lease_id)


async def first_change_after(
    connection: Connection, key: bytes, revision: int, *, deadline: float | None = None
) -> WatchEvent:
    """The first change of `key` after `revision`; the caller knows that there is one.

    Raises `RendezvousConnectionError` if it does not come by `deadline`.
    """
    changes = connection.watch(key, start_revision=revision + 1)
    started = time.monotonic()
    remaining = (read_deadline(connection) if deadline is None else deadline) - started
    try:
        with anyio.fail_after(max(0.0, remaining)):
            async for event in changes:
                return event
    except TimeoutError:
        pass
    finally:
        await changes.aclose()
    waited = time.monotonic() - started
    raise RendezvousConnectionError(
        f"{CONNECTION_FAILED_MESSAGE}: the change of {key!r} after revision {revision} did "
        f"not arrive within {waited:.1f} s.",
        endpoints=tuple(map(str, connection.endpoints)),
        waited=waited,
    )
