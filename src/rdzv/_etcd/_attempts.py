"""The attempt driver: the only place that knows how to retry a request to etcd.

`drive(links, send, ...)` runs `send(link, timeout)` until it answers, within one deadline for
the whole public call (or, until any endpoint has answered, within the connect timeout): it
authenticates (again, once, when etcd rejects the token), waits with jittered exponential
backoff, fails over to the next endpoint after a transient failure, recognises TLS
misconfiguration, bounds the requests in flight, and never uses a channel that was closed under
a waiting call. When etcd says it is overloaded, a call waits longer, in a window that doubles
(full jitter), so that resends slow down rather than multiply. Each kind of call keeps only
what is its own: a request that may be sent twice (`may_resend=True`: reads, idempotent writes,
opening a watch) is retried; a transaction is retried only while it cannot have left, and
otherwise ends with `RendezvousOutcomeUnknownError` for its caller to resolve.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import anyio
import grpc
import grpc.aio

from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousAuthError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousOutcomeUnknownError,
)
from rdzv._etcd._classify import Fields, Kind, classify, fields, overloaded, translate
from rdzv._etcd._endpoints import Endpoint
from rdzv._etcd._links import ForeignCluster, Link, Links

T = TypeVar("T")

logger = logging.getLogger("rdzv.etcd")

INITIAL_BACKOFF: Final = 0.025
MAX_BACKOFF: Final = 0.5
# After etcd said it is overloaded ("too many requests": its applied index lags by 5,000 entries
# or more; "request timed out": a proposal waited over 5 s), it needs seconds to catch up, and a
# resend within milliseconds is refused again. The n-th wait is uniform(0, min(cap, base *
# 2**(n-1))): full jitter spreads the resends of thousands of refused clients over the window
# instead of sending them back together. No budget paces a connection's resends on top of
# that: one that did (gRPC's retry throttling, refilled with time, the resend waiting for its
# turn) made 1,250 participants sharing a connection wait minutes for their turns, and 10,000
# of them in 8 processes did not complete a round in 180 s (28.6 s without it); a participant
# alone on its connection, as under torchrun, never met it. The cap may exceed a lease's TTL:
# the lease a write of rdzv's uses is kept alive while it waits, or replaced if the write finds
# it gone (a join's, the rolling lease). Measured with 10,000 connections each granting a lease
# and putting a key at once (one etcd, 2 shared cores, load 10-23, two interleaved runs each):
# 2 s doubling to 16 s took 4.16-4.22 etcd messages per connection (18,247-18,516 refusals),
# half of the keys in 13.7-14.3 s and all in 27.2-28.9 s; 1 s doubling to 4 s took 6.22-8.46
# messages (35,137-50,289 refusals), half in 23.3-34.3 s and all in 25.6-37.4 s; rdzv's usual
# backoff (25 ms to 0.5 s) was worse still (etcd answered 81-295% as many errors as
# successes).
OVERLOAD_BACKOFF: Final = 2.0
MAX_OVERLOAD_BACKOFF: Final = 16.0


def overload_backoff(overloads: int) -> float:
    """The wait before resending after the `overloads`-th overload (1, 2, ...) of a call."""
    window = min(MAX_OVERLOAD_BACKOFF, OVERLOAD_BACKOFF * 2 ** min(overloads - 1, 16))
    return random.uniform(0.0, window)


class Refused(Exception):
    """etcd refused a request inside its answer rather than with a gRPC status.

    A watch that etcd will not create comes back as a cancelled watch with a reason; `send`
    raises this for it. `auth` says that the reason is a permission failure, which an expired
    token also causes.
    """

    def __init__(self, details: str, *, auth: bool) -> None:
        super().__init__(details)
        self.details = details
        self.auth = auth


def lost_answer(what: str, key: str | None, cause: Fields) -> RendezvousOutcomeUnknownError:
    """The error for a write whose request left and whose answer did not come back."""
    logger.info(
        "etcd at %s did not answer a request to %s (%s: %s): it may or may not have been "
        "applied, and the caller will find out",
        cause["endpoint"],
        what,
        cause["code"],
        cause["details"],
        extra={
            "rdzv_endpoint": cause["endpoint"],
            "rdzv_key": key,
            "rdzv_code": cause["code"],
            "rdzv_details": cause["details"],
        },
    )
    return RendezvousOutcomeUnknownError(
        f"etcd at {cause['endpoint']} did not answer a request to {what}: it may or may not "
        "have been applied.",
        key=key,
        **cause,
    )


async def drive(
    links: Links,
    send: Callable[[Link, float], Awaitable[T]],
    *,
    what: str,
    deadline: float,
    may_resend: bool = True,
    key: str | None = None,
) -> T:
    """Run `send(link, attempt_timeout)` until it succeeds or `deadline` passes.

    While no endpoint has answered yet (`Links.reached`), the call gives up sooner, after the
    connect timeout. `what` completes "etcd refused to ..." in error messages; `key` names the
    key of a write in `RendezvousOutcomeUnknownError`.
    """
    attempts = _Attempts(links, what=what, deadline=deadline, may_resend=may_resend, key=key)
    link: Link | None = None
    while attempts.limit() > time.monotonic():
        # Holding a retired link while waiting (a suspended connection) would keep its channel,
        # and gRPC's poller thread, alive across a fork.
        link = None
        link = await links.acquire(attempts.limit())
        try:
            result = await attempts.send(link, send)
        except _Again as again:
            if again.pause:
                await attempts.back_off()
            continue
        except asyncio.CancelledError:
            if not link.retired or task_cancelling():
                raise
            # gRPC ended the call because rdzv closed its channel, not because the caller was
            # cancelled.
            attempts.after_closed_channel(link)
            continue
        except (ForeignCluster, grpc.aio.UsageError, Refused, grpc.aio.AioRpcError) as error:
            if await attempts.after(link, error):
                await attempts.back_off()
            continue
        attempts.succeeded(link)
        return result
    raise attempts.exhausted() from attempts.last_error


class _Again(Exception):
    """Nothing was sent: try again, after a backoff if `pause`."""

    def __init__(self, *, pause: bool) -> None:
        super().__init__()
        self.pause = pause


class _Attempts:
    """The attempts of one call: what they learned, and what to do after each failure."""

    def __init__(
        self, links: Links, *, what: str, deadline: float, may_resend: bool, key: str | None
    ) -> None:
        self._links = links
        self._what = what
        self._deadline = deadline
        self._may_resend = may_resend
        self._key = key
        self._delay = INITIAL_BACKOFF
        self._overloads = 0  # how many times etcd said it was overloaded
        self._overloaded = False  # whether the last attempt's answer said so
        self._reauthenticated = False
        self._token: str | None = None
        self._sent = False
        self._last_error: BaseException | None = None
        self._last_fields = Fields(endpoint=None, code=None, details=None)
        self._started = time.monotonic()
        self._connect_deadline = self._started + links.connect_timeout
        # The endpoints that failed, in order, each with its last failure.
        self._tried: dict[Endpoint, str] = {}

    def limit(self) -> float:
        """When the call gives up: its deadline, or sooner while no endpoint has answered."""
        if self._links.reached:
            return self._deadline
        return min(self._deadline, self._connect_deadline)

    def _note(self, link: Link, known: Fields) -> None:
        """Remember the failure of an attempt on `link`, for the error when time runs out."""
        self._last_fields = known
        why = known["details"] if known["code"] is None else f"{known['code']}: {known['details']}"
        self._tried[link.endpoint] = str(why)

    async def send(self, link: Link, send: Callable[[Link, float], Awaitable[T]]) -> T:
        """One attempt on `link`; `_Again` if it cannot be sent there."""
        self._token, self._sent, self._overloaded = None, False, False
        async with self._links.in_flight:
            if _replaced(link):
                raise _Again(pause=False)  # replaced while this call waited for a slot
            # The wait for a slot counts against the deadline.
            timeout = self._links.attempt_timeout(self.limit() - time.monotonic())
            if timeout <= 0:
                raise _Again(pause=False)
            self._token = await self._links.authenticate(link, timeout)
            if _replaced(link):
                raise _Again(pause=False)  # replaced while this call waited to authenticate
            if not self._may_resend and not await _ready(link, timeout):
                # Nothing was sent: safe to try again, elsewhere.
                why = f"did not connect within {timeout:g} s"
                self._failed(TimeoutError(f"{link.endpoint} {why}"))
                self._note(link, Fields(endpoint=str(link.endpoint), code=None, details=why))
                self._links.fail_over(link, why)
                raise _Again(pause=True)
            self._sent = True
            # gRPC enforces `timeout`. (A guard of rdzv's own around the call, asyncio.timeout,
            # cost 4-5% of a 1 KiB get_state in the overhead benchmark, and was dropped.)
            return await send(link, timeout)

    async def after(self, link: Link, error: Exception) -> bool:
        """Raise if `error` ends the call; else whether to back off before the next attempt."""
        self._tried.setdefault(link.endpoint, "")
        if isinstance(error, ForeignCluster):
            # Whatever it did there, it did not do here: try the next endpoint.
            self._failed(error)
            self._note(link, Fields(endpoint=str(link.endpoint), code=None, details=str(error)))
            self._links.fail_over(link, str(error))
            return True
        if isinstance(error, grpc.aio.UsageError):
            # The channel was closed before the request could leave (another call failed over,
            # or the connection was suspended or closed): nothing was sent.
            self._links.check_open()
            self._failed(error)
            return False
        if isinstance(error, Refused):
            if error.auth and self._reauthenticate(link, error.details):
                return False
            raise _refused(
                error, what=self._what, link=link, username=self._links.username
            ) from error
        assert isinstance(error, grpc.aio.AioRpcError)
        return await self._after_rpc_error(link, error)

    async def _after_rpc_error(self, link: Link, error: grpc.aio.AioRpcError) -> bool:
        self._failed(error)
        self._note(link, fields(error, link.endpoint))
        kind = classify(error)
        if kind is Kind.AUTH_EXPIRED and self._reauthenticate(
            link, f"{self._last_fields['code']}: {self._last_fields['details']}"
        ):
            return False
        if kind is Kind.FINAL or kind is Kind.AUTH_EXPIRED:
            raise translate(
                error, what=self._what, endpoint=link.endpoint, username=self._links.username
            ) from error
        why = f"{self._last_fields['code']}: {self._last_fields['details']}"
        self._overloaded = overloaded(error)
        if kind is Kind.BUSY:
            self._links.answered(link)  # etcd itself refused: it was reached
        if kind is Kind.TRANSIENT:
            await self._links.diagnose(link, error, self.limit())
            self._links.fail_over(link, why)
            if self._sent and not self._may_resend:
                raise lost_answer(self._what, self._key, self._last_fields) from error
            self._reauthenticated = False
        if logger.isEnabledFor(logging.DEBUG):
            # Kind.BUSY: etcd applied nothing; back off and send again.
            logger.debug(
                "etcd at %s could not %s (%s); trying again",
                link.endpoint,
                self._what,
                why,
                extra={
                    "rdzv_endpoint": str(link.endpoint),
                    "rdzv_code": self._last_fields["code"],
                    "rdzv_details": self._last_fields["details"],
                },
            )
        return True

    def after_closed_channel(self, link: Link) -> None:
        """After gRPC ended the call on a channel that rdzv closed (failover, suspend, close)."""
        self._links.check_open()
        self._note(
            link,
            Fields(
                endpoint=str(link.endpoint), code="CANCELLED", details="rdzv closed the channel"
            ),
        )
        if self._sent and not self._may_resend:
            raise lost_answer(self._what, self._key, self._last_fields) from None

    def _reauthenticate(self, link: Link, why: str) -> bool:
        """Drop the rejected token, once per attempt; false if that was done already."""
        if self._links.username is None or self._reauthenticated:
            return False
        logger.info(
            "etcd at %s rejected the auth token of user %r (%s); authenticating again",
            link.endpoint,
            self._links.username,
            why,
            extra={"rdzv_endpoint": str(link.endpoint), "rdzv_details": why},
        )
        self._links.forget_token(self._token)
        self._reauthenticated = True
        return True

    def _failed(self, error: BaseException) -> None:
        # Kept without its traceback, whose frames hold the link.
        self._last_error = error.with_traceback(None)

    async def back_off(self) -> None:
        """Sleep a jittered, growing delay, never past the deadline; longer after an overload."""
        if not self._overloaded:
            self._delay = await backoff(self._delay, self.limit())
            return
        self._overloads += 1
        delay = overload_backoff(self._overloads)
        await asyncio.sleep(min(delay, max(0.0, self.limit() - time.monotonic())))

    def succeeded(self, link: Link) -> None:
        """The call succeeded on `link`: etcd answered."""
        self._links.answered(link)

    @property
    def last_error(self) -> BaseException | None:
        """The last failure, to chain to the call's error."""
        return self._last_error

    def exhausted(self) -> RendezvousConnectionError:
        """The error when the deadline (or, before any answer, the connect timeout) passed."""
        waited = time.monotonic() - self._started
        if not self._links.reached and self._connect_deadline < self._deadline:
            return never_reached(
                self._links.endpoints, self._tried, waited=waited, last=self._last_fields
            )
        return timed_out(tried=tuple(self._tried), waited=waited, last=self._last_fields)


def timed_out(
    *, tried: tuple[Endpoint, ...], waited: float, last: Fields
) -> RendezvousConnectionError:
    """The error of a call that ran out of time: what it tried, how long, and the last error."""
    endpoints = tuple(map(str, tried))
    if endpoints:
        message = (
            f"{CONNECTION_FAILED_MESSAGE}: no answer within {waited:.1f} s from "
            f"{' or '.join(endpoints)}."
        )
    else:
        message = f"{CONNECTION_FAILED_MESSAGE}: no request reached etcd within {waited:.1f} s."
    if last["code"] is not None:
        message += f" The last error, from {last['endpoint']}, was {last['code']}: "
        message += f"{last['details']}."
    elif last["details"] is not None:
        message += f" The last error, from {last['endpoint']}: {last['details']}."
    message += (
        " Check that etcd runs and that this host reaches it at these endpoints, or raise "
        "read_timeout."
    )
    logger.debug(
        "Giving up after %.1f s: %s",
        waited,
        message,
        extra={"rdzv_endpoints": endpoints, "rdzv_code": last["code"]},
    )
    return RendezvousConnectionError(message, endpoints=endpoints, waited=waited, **last)


def never_reached(
    endpoints: tuple[Endpoint, ...], tried: dict[Endpoint, str], *, waited: float, last: Fields
) -> RendezvousConnectionError:
    """The error of a call that gave up after the connect timeout: no endpoint ever answered.

    It names every endpoint and why it did not answer (or that there was no time to try it).
    """
    whys = {endpoint: tried.get(endpoint) or "not tried in time" for endpoint in endpoints}
    message = (
        f"{CONNECTION_FAILED_MESSAGE}: no answer within {waited:.1f} s (connect_timeout) from "
        f"{' or '.join(map(str, endpoints))}"
    )
    if len(endpoints) == 1:
        message += f": {whys[endpoints[0]]}."
    else:
        message += "." + "".join(f" {endpoint}: {why}." for endpoint, why in whys.items())
    message += (
        " Check that etcd runs and that this host reaches it at these endpoints, or raise "
        "connect_timeout."
    )
    shown = tuple(map(str, tried))
    logger.debug(
        "Giving up after %.1f s: %s",
        waited,
        message,
        extra={"rdzv_endpoints": shown, "rdzv_code": last["code"]},
    )
    return RendezvousConnectionError(message, endpoints=shown, waited=waited, **last)


async def _ready(link: Link, timeout: float) -> bool:
    """Connect `link` if needed; false if it could not connect within `timeout`."""
    if link.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
        return True
    try:
        await asyncio.wait_for(link.channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def backoff(delay: float, deadline: float = math.inf, *, cap: float = MAX_BACKOFF) -> float:
    """Sleep about `delay` seconds (half to all of it, at random), never past `deadline`.

    Returns the next delay: twice this one, up to `cap`. rdzv's one backoff: between attempts
    (`drive`), before resending a write whose answer was lost (`_settle`), and before reopening
    a keep-alive stream (`_keepalive`). The jitter keeps clients that failed together from
    coming back together.
    """
    jittered = delay * random.uniform(0.5, 1.0)
    await asyncio.sleep(min(jittered, max(0.0, deadline - time.monotonic())))
    return min(delay * 2, cap)


def _replaced(link: Link) -> bool:
    """Whether another call retired `link` (a function, so that each call reads it anew)."""
    return link.retired


def task_cancelling() -> bool:
    """Whether the current task itself is being cancelled (known on Python 3.11+ only)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


async def despite_cancellation(work: Awaitable[None], limit: float) -> None:
    """Await `work` to its end, `limit` seconds at most, even if this task is cancelled meanwhile.

    For closing gRPC channels and calls: gRPC completes the operations of the calls it cancels
    later, through one process-wide queue, and those of a loop that has closed by then fail
    whichever loop runs next (`RuntimeError: Event loop is closed`). A close cut short by a
    cancellation (a timeout or a task group ending around `async with connect(...)`) would
    leave them pending. An anyio cancel scope's cancellation waits outside the shield; a
    task's own cancellation is re-raised once `work` is done.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                task.cancel()
                logger.warning(
                    "Closing a gRPC channel or call took over %g s; no longer waiting for it", limit
                )
                break
            try:
                await asyncio.wait([task], timeout=remaining)
            except asyncio.CancelledError as error:
                cancelled = error
    if task.done() and not task.cancelled() and task.exception() is not None:
        # A close that failed has closed all the same; only its cause may interest someone.
        logger.debug("Closing a gRPC channel or call failed: %r", task.exception())
    if cancelled is not None:
        raise cancelled


def _refused(refusal: Refused, *, what: str, link: Link, username: str | None) -> RendezvousError:
    known = Fields(endpoint=str(link.endpoint), code=None, details=refusal.details)
    if refusal.auth:
        return RendezvousAuthError(
            f"etcd at {link.endpoint} refused to let user {username!r} {what}: {refusal.details}",
            **known,
        )
    return RendezvousError(f"etcd at {link.endpoint} refused to {what}: {refusal.details}", **known)
