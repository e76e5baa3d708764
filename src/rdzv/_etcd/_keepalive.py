"""Lease keep-alives: one LeaseKeepAlive stream per connection, for every lease it keeps.

etcd refreshes a lease when it receives a `LeaseKeepAliveRequest` on a LeaseKeepAlive stream,
and answers each one, in order, with the lease's TTL (0 when it no longer has the lease). A
`Connection` holds at most one such stream, whatever the number of its leases, and two tasks:

- the *sender* owns the stream: it opens it lazily, through the attempt driver (so with
  failover, the auth token and the retired-channel handling of every other call), and reopens
  it when it breaks. It sleeps until the earliest due time in a heap of keepers (one entry per
  lease, refreshed every `ttl / 3` seconds), then writes, in one batch, a request for every
  lease due within the next few milliseconds, and for every lease that `refresh` asked for.
- the *reader* reads the answers and hands each to the keepers of its lease id, found in a
  dict; which request an answer belongs to (and so when it was sent) comes from a queue of the
  requests in flight, since etcd answers them in order.

So 10,000 leases cost one stream, two tasks and a heap, not a task each. Both tasks end, and
the stream is cancelled and waited for, on `aclose()` and `suspend()`; after `resume()` the
sender comes back if anything is left to keep alive, and otherwise on the next demand. With
nothing to keep alive for `_IDLE_SECONDS`, the sender closes the stream and ends.

A `LeaseKeeper` knows a lower bound of its lease's expiry in this process's monotonic clock:
the time a request that etcd answered with a positive TTL was *sent*, plus that TTL (etcd
refreshed the lease when it received it, later). Once that time passes without a newer good
answer, or once etcd answers a TTL of 0, the keeper presumes the lease gone, for good.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import grpc
import grpc.aio
from aetcd import rpc

from rdzv._errors import RendezvousError
from rdzv._etcd import _calls
from rdzv._etcd._attempts import INITIAL_BACKOFF, backoff, drive, task_cancelling
from rdzv._etcd._classify import Kind, classify, fields, synthetic
from rdzv._etcd._links import Link, Links

logger = logging.getLogger("rdzv.lease")

REFRESHES_PER_TTL: Final = 3
"""A kept lease is refreshed every `ttl / REFRESHES_PER_TTL` seconds."""

# Leases due within this many seconds of the earliest go out in the same batch: refreshing one
# a little early is harmless, and saves a wake-up per lease when thousands fall due together.
_BATCH_WINDOW: Final = 0.05
# With nothing to keep alive (no keeper, no refresh asked for) for this long, the stream closes
# and the sender ends; the next demand opens them again.
_IDLE_SECONDS: Final = 30.0
# A stream that breaks sooner than this after it opened is reopened after a growing delay, up
# to the longest; one that lived longer is reopened at once.
_STABLE_SECONDS: Final = 1.0
_MAX_REOPEN_DELAY: Final = 1.0
# How long stopping waits for a cancelled task to end (its gRPC call is then waited for too).
_STOP_TIMEOUT: Final = 1.0


_TIME_RAN_OUT: Final = "no keep-alive that etcd answered in time to extend it"
_REVOKED: Final = "revoked"


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"The {name} must be a positive int, not {value!r}.")
    return value


class LeaseKeeper:
    """One lease kept alive on its connection's keep-alive stream; see `Connection.keep_alive`.

    `expired` turns true, for good, when etcd answers a keep-alive for the lease with a TTL of
    0 (it no longer has the lease), or when `ttl` seconds have passed since a keep-alive that
    etcd answered was sent with no newer answer (the lease must then be presumed gone).
    `release()` stops the refreshes without revoking the lease, which then expires `ttl`
    seconds after the last one.
    """

    __slots__ = (
        "_alive_until",
        "_answer",
        "_due",
        "_event",
        "_expired",
        "_next_refresh",
        "_owner",
        "_refreshing",
        "_released",
        "lease_id",
        "ttl",
    )

    def __init__(
        self,
        owner: KeepAlive,
        lease_id: int,
        ttl: int,
        *,
        refreshing: bool,
        since: float,
        known: bool = False,
    ) -> None:
        self.lease_id = lease_id
        """The etcd lease id."""
        self.ttl = ttl
        """The lease's TTL in seconds, as it was granted."""
        self._owner = owner
        self._refreshing = refreshing
        # Presumed granted (or refreshed) at `since`: refreshed next a third of its TTL later
        # when that is known (granted then), at once when it is a guess (now).
        self._alive_until = since + ttl
        self._next_refresh = since + ttl / REFRESHES_PER_TTL if known else since
        self._due = 0.0  # the due time of this keeper's one live entry in the heap
        self._expired = False
        self._released = False
        self._event: asyncio.Event | None = None
        self._answer: asyncio.Future[None] | None = None  # see `wait_answer`

    def __repr__(self) -> str:
        state = "expired" if self.expired else "released" if self._released else "kept"
        return f"<rdzv LeaseKeeper {self.lease_id:x} ttl={self.ttl} {state}>"

    @property
    def expired(self) -> bool:
        """Whether the lease is gone, or must be presumed gone (then it stays true)."""
        if not self._expired and time.monotonic() >= self._alive_until:
            self._expire(_TIME_RAN_OUT)
        return self._expired

    @property
    def alive_until(self) -> float:
        """The `time.monotonic()` time until which etcd surely keeps the lease, as far as known.

        The send time of the latest keep-alive that etcd answered with a positive TTL, plus
        that TTL (at most `ttl`); at first, the time the keeper was made plus `ttl`.
        """
        return self._alive_until

    async def wait_expired(self) -> None:
        """Return when `expired` becomes true: on etcd's answer, or when time runs out.

        It never asks etcd: each wait lasts until the lease's known expiry at most.
        """
        while not self.expired:
            if self._event is None:
                self._event = asyncio.Event()
            with anyio.move_on_after(self._alive_until - time.monotonic()):
                await self._event.wait()

    async def wait_answer(self, timeout: float) -> None:
        """Return when etcd next answers a keep-alive for the lease, or after `timeout` seconds.

        At once if the lease is (presumed) gone. An answer shows that the connection's
        keep-alive stream is open and read: what `AsyncEtcdBackend.prepare` waits for.
        """
        if self.expired:
            return
        loop = asyncio.get_running_loop()
        if self._answer is None or self._answer.done():
            self._answer = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _resolve, self._answer)
        try:
            await asyncio.shield(self._answer)
        finally:
            timer.cancel()

    def release(self) -> None:
        """Stop refreshing the lease (it is not revoked). Harmless twice."""
        if not self._released:
            self._released = True
            self._owner.forget(self)

    @property
    def _done(self) -> bool:
        return self._expired or self._released

    def _expire(self, why: str) -> None:
        if self._expired:
            return
        # A lease kept alive is not meant to expire: that is news. A followed lease expires
        # when its writer stops writing, and a revoked one was meant to go.
        level = (
            logging.WARNING
            if self._refreshing
            and not self._released
            and why != _REVOKED
            and self.lease_id not in self._owner.revoking
            else logging.DEBUG
        )
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "Lease %x (TTL %d s, %s) expired: %s",
                self.lease_id,
                self.ttl,
                "kept alive" if self._refreshing else "followed",
                why,
                extra={"rdzv_lease": self.lease_id, "rdzv_ttl": self.ttl, "rdzv_details": why},
            )
        self._expired = True
        if self._event is not None:
            self._event.set()
        if self._answer is not None:
            _resolve(self._answer)
        self._owner.forget(self)

    def _answered(self, ttl: int, sent_at: float | None, now: float) -> None:
        """etcd answered a keep-alive for the lease, sent at `sent_at`, with `ttl`."""
        if self._answer is not None:
            _resolve(self._answer)
        if self._expired:
            return
        if ttl <= 0:
            self._expire("etcd no longer has it")
        elif now >= self._alive_until:
            self._expire(_TIME_RAN_OUT)
        elif sent_at is not None:
            self._alive_until = max(self._alive_until, sent_at + min(ttl, self.ttl))

    def _next_due(self) -> float:
        if self._refreshing:
            return min(self._next_refresh, self._alive_until)
        return self._alive_until


@dataclasses.dataclass(eq=False)
class _Stream:
    """An open LeaseKeepAlive call, the link it runs on, and its requests in flight."""

    call: Any
    link: Link
    token: str | None
    opened_at: float
    # (lease id, time sent) of each request not answered yet, in the order sent.
    in_flight: collections.deque[tuple[int, float]] = dataclasses.field(
        default_factory=collections.deque
    )
    reader: asyncio.Task[None] | None = None
    broken: bool = False


class KeepAlive:
    """The keep-alive stream of one connection, its two tasks, and the leases it keeps."""

    def __init__(
        self,
        links: Links,
        *,
        read_timeout: float,
        finish: Callable[[Any], Awaitable[None]],
    ) -> None:
        self._links = links
        self._read_timeout = read_timeout
        # Cancels a gRPC call and waits until gRPC is done with it (`_connection._finish`).
        self._finish = finish
        self._keepers: dict[int, list[LeaseKeeper]] = {}
        # Leases whose revoke is on its way: a keep-alive answered after etcd applied it says
        # the lease is gone before the revoke's own answer does, and that is no news.
        self.revoking: set[int] = set()
        self._heap: list[tuple[float, int, LeaseKeeper]] = []
        self._order = itertools.count()  # ties in the heap never compare keepers
        self._urgent: dict[int, None] = {}  # lease ids to refresh at once, in order
        # What the sender waits on when it sleeps: resolved by `_wake` or by its timer.
        self._waiter: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._stream: _Stream | None = None
        self._suspended = False
        self._closed = False

    # -------------------------------------------------------------------------- demands

    def keep(
        self, lease_id: int, ttl: int, *, refreshing: bool, since: float | None = None
    ) -> LeaseKeeper:
        """A keeper of `lease_id`: refreshed every `ttl / 3` s if `refreshing`, else followed.

        `since`: when the lease was granted (by default, presumed now and refreshed at once).
        """
        self._links.check_open()
        lease_id = _positive_int(lease_id, "lease id")
        ttl = _positive_int(ttl, "lease TTL")
        keeper = LeaseKeeper(
            self,
            lease_id,
            ttl,
            refreshing=refreshing,
            since=time.monotonic() if since is None else since,
            known=since is not None,
        )
        self._keepers.setdefault(lease_id, []).append(keeper)
        self._schedule(keeper)
        self._wake()
        self._start()
        return keeper

    def refresh(self, lease_id: int) -> None:
        """Have the sender send a keep-alive for `lease_id` now; its answer is not awaited."""
        self._links.check_open()
        self._urgent[lease_id] = None
        self._wake()
        self._start()

    def revoked(self, lease_id: int) -> None:
        """The lease was revoked: its keepers are expired."""
        for keeper in list(self._keepers.get(lease_id, ())):
            keeper._expire(_REVOKED)

    def forget(self, keeper: LeaseKeeper) -> None:
        """Stop routing answers to `keeper` (its heap entry is dropped when it comes up)."""
        keepers = self._keepers.get(keeper.lease_id)
        if keepers is not None and keeper in keepers:
            keepers.remove(keeper)
            if not keepers:
                del self._keepers[keeper.lease_id]

    def _schedule(self, keeper: LeaseKeeper) -> None:
        keeper._due = keeper._next_due()
        heapq.heappush(self._heap, (keeper._due, next(self._order), keeper))

    # ------------------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        if self._sender is None and not self._suspended and not self._closed:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="rdzv-lease-keepalive-sender"
            )

    async def suspend(self) -> None:
        """End both tasks and the stream until `resume()` (before a fork)."""
        self._suspended = True
        await self._stop()

    def resume(self) -> None:
        """After `suspend()`: start the sender again if leases are kept or refreshes asked."""
        self._suspended = False
        if self._heap or self._urgent:
            # Without a running loop (resumed from another thread), the next demand starts it.
            with contextlib.suppress(RuntimeError):
                self._start()

    async def aclose(self) -> None:
        """End both tasks and the stream for good."""
        self._closed = True
        await self._stop()

    async def _stop(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.wait([sender], timeout=_STOP_TIMEOUT)
        await self._drop_stream()

    async def _drop_stream(self) -> None:
        """Discard the current stream (it stays current until it is gone: see `_stop`)."""
        stream = self._stream
        if stream is not None:
            await self._discard(stream)
            if self._stream is stream:
                self._stream = None

    async def _discard(self, stream: _Stream) -> None:
        """End `stream`'s reader and call; its unanswered requests are sent again later.

        Harmless twice: `_stop` discards the current stream even if the sender, which it
        cancelled, was discarding it.
        """
        if stream.reader is not None:
            stream.reader.cancel()
            await asyncio.wait([stream.reader], timeout=_STOP_TIMEOUT)
        await self._finish(stream.call)
        for lease_id, _ in stream.in_flight:
            self._urgent[lease_id] = None
        stream.in_flight.clear()

    # ---------------------------------------------------------------------------- sender

    async def _send_loop(self) -> None:
        """The sender task: refresh what is due, sleep until the next due time, repeat."""
        delay = INITIAL_BACKOFF
        idle_since = time.monotonic()
        try:
            # Also not once suspended: a sender left running keeps the closed channel busy, and
            # a fork then finds gRPC busy (see `suspend`).
            while not self._closed and not self._suspended:
                broken = self._stream
                if broken is not None and broken.broken:
                    # Its unanswered requests are asked for again, on the next stream.
                    await self._drop_stream()
                    delay = await self._pause_after(broken, delay)
                    continue
                now = time.monotonic()
                batch = self._due(now)
                if batch:
                    idle_since = now
                    delay = await self._send(batch, delay)
                    continue
                if self._heap:
                    timeout = self._heap[0][0] - now
                elif now - idle_since < _IDLE_SECONDS:
                    timeout = idle_since + _IDLE_SECONDS - now
                else:
                    # Nothing left to keep alive: close the stream and end, unless a demand came
                    # while it closed (no other sender starts while this one runs).
                    if self._stream is not None:
                        await self._drop_stream()
                        continue
                    return
                await self._sleep(timeout)
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None

    async def _sleep(self, timeout: float) -> None:
        """Sleep until `_wake()` or for `timeout` seconds, whichever comes first.

        A future and a timer: cheaper than an event under a cancel scope, which matters when
        every write of a backend wakes the sender.
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        """Wake the sender if it sleeps (if it does not, it looks for work before it sleeps)."""
        waiter = self._waiter
        if waiter is not None:
            _resolve(waiter)

    def _due(self, now: float) -> list[int]:
        """Take the lease ids to send now: those asked for, then those due; expire the dead."""
        batch, self._urgent = self._urgent, {}
        horizon = now + _BATCH_WINDOW
        later: list[LeaseKeeper] = []
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            due, _, keeper = heapq.heappop(heap)
            if due != keeper._due or keeper._done:
                continue  # an entry superseded by a later one, or of a finished keeper
            if now >= keeper._alive_until:
                keeper._expire(_TIME_RAN_OUT)
                continue
            if keeper._refreshing and keeper._next_refresh <= horizon:
                batch[keeper.lease_id] = None
                keeper._next_refresh = now + keeper.ttl / REFRESHES_PER_TTL
            later.append(keeper)
        for keeper in later:
            self._schedule(keeper)
        return list(batch)

    async def _send(self, batch: list[int], delay: float) -> float:
        """Write `batch` on the stream, opened if needed; return the next reopening delay.

        What cannot be written (the stream broke, or could not be opened) is asked for again,
        to go out on the next stream.
        """
        stream = self._stream
        if stream is None:
            try:
                stream = await self._open()
            except RendezvousError as error:
                self._requeue(batch)
                if self._links_closed():
                    self._closed = True  # the sender ends
                    return delay
                # The keepers' leases run out meanwhile, and report so; try again later.
                logger.info(
                    "Cannot open the lease keep-alive stream (%s); trying again",
                    error,
                    extra={"rdzv_endpoint": error.endpoint, "rdzv_code": error.code},
                )
                return await backoff(delay, cap=_MAX_REOPEN_DELAY)
        sent_at = time.monotonic()
        for index, lease_id in enumerate(batch):
            # Recorded before the write: its answer may be read before the write returns.
            stream.in_flight.append((lease_id, sent_at))
            try:
                await _calls.write(stream.call, rpc.LeaseKeepAliveRequest(ID=lease_id))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                stream.broken = True
            except asyncio.CancelledError:
                if not stream.link.retired or self._sender is not asyncio.current_task():
                    raise
                stream.broken = True  # rdzv closed the channel under the write
            if stream.broken:
                self._requeue(batch[index:])
                break
        return delay

    async def _pause_after(self, broken: _Stream, delay: float) -> float:
        """After `broken` broke: pause if it lived briefly; return the next pause."""
        if time.monotonic() - broken.opened_at >= _STABLE_SECONDS:
            return INITIAL_BACKOFF
        return await backoff(delay, cap=_MAX_REOPEN_DELAY)

    def _requeue(self, lease_ids: list[int]) -> None:
        for lease_id in lease_ids:
            self._urgent[lease_id] = None

    def _links_closed(self) -> bool:
        try:
            self._links.check_open()
        except RendezvousError:
            return True
        return False

    async def _open(self) -> _Stream:
        stream = await drive(
            self._links,
            self._open_stream,
            what="keep leases alive",
            deadline=time.monotonic() + self._read_timeout,
        )
        stream.reader = asyncio.get_running_loop().create_task(
            self._read_loop(stream), name="rdzv-lease-keepalive-reader"
        )
        self._stream = stream
        return stream

    async def _open_stream(self, link: Link, timeout: float) -> _Stream:
        """Open a LeaseKeepAlive call on `link` and see etcd answer on it.

        The first request names lease 0, which etcd never grants: the answer (TTL 0) shows
        that the stream works, with this token, on this cluster, and refreshes nothing.
        """
        metadata = self._links.metadata(require_leader=True)
        token = dict(metadata).get("token")
        call = link.lease.LeaseKeepAlive(metadata=metadata)
        try:
            try:
                await _calls.write(call, rpc.LeaseKeepAliveRequest(ID=0))
                # Not asyncio.wait_for: on Python 3.11 it can swallow the task's cancellation
                # when the read completes at the same moment, and the sender outlives `_stop`.
                with anyio.fail_after(timeout):
                    response = await _calls.read(call)
            except TimeoutError:
                raise synthetic(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to a lease keep-alive"
                ) from None
            except asyncio.InvalidStateError:
                raise synthetic(
                    grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream ended"
                ) from None
            if response is grpc.aio.EOF:
                raise synthetic(grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream ended")
            self._links.verify(link, response.header)
        except BaseException:
            await self._finish(call)
            raise
        return _Stream(call=call, link=link, token=token, opened_at=time.monotonic())

    # ---------------------------------------------------------------------------- reader

    async def _read_loop(self, stream: _Stream) -> None:
        """The reader task of `stream`: hand each answer to its keepers, until the stream ends."""
        try:
            while True:
                response = await _calls.read(stream.call)
                if response is grpc.aio.EOF:
                    break
                self._answered(stream, int(response.ID), int(response.TTL))
        except grpc.aio.AioRpcError as error:
            kind = classify(error)
            known = fields(error, stream.link.endpoint)
            why = f"{known['code']}: {known['details']}"
            logger.debug(
                "The lease keep-alive stream to %s broke (%s); it will be opened again",
                stream.link.endpoint,
                why,
                extra={
                    "rdzv_endpoint": known["endpoint"],
                    "rdzv_code": known["code"],
                    "rdzv_details": known["details"],
                },
            )
            if kind is Kind.TRANSIENT:
                self._links.fail_over(stream.link, f"the lease keep-alive stream broke: {why}")
            elif kind is Kind.AUTH_EXPIRED:
                self._links.forget_token(stream.token)
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            pass
        except asyncio.CancelledError:
            if not stream.link.retired or task_cancelling():
                raise
            # gRPC ended the call because rdzv closed its channel (a failover, a suspension).
        stream.broken = True
        self._wake()

    def _answered(self, stream: _Stream, lease_id: int, ttl: int) -> None:
        now = time.monotonic()
        sent_at: float | None = None
        in_flight = stream.in_flight
        while in_flight:
            sent_id, sent = in_flight.popleft()
            if sent_id == lease_id:
                sent_at = sent
                break
        keepers = self._keepers.get(lease_id)
        if keepers:
            for keeper in list(keepers):
                keeper._answered(ttl, sent_at, now)
