"""The attempt driver: the only place that knows how to retry a request to etcd.

`drive(links, send, ...)` runs `send(link, timeout)` until it answers, within one deadline for
the whole public call: it authenticates (again, once, when etcd rejects the token), waits
with jittered exponential backoff, fails over to the next endpoint after a transient failure,
recognises TLS misconfiguration, bounds the requests in flight, and never uses a channel that
was closed under a waiting call. Each kind of call keeps only what is its own: a request that
may be sent twice (`may_resend=True`: reads, idempotent writes, opening a watch) is retried; a
transaction is retried only while it cannot have left, and otherwise ends with
`RendezvousOutcomeUnknownError` for its caller to resolve.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import grpc
import grpc.aio

from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousAuthError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousOutcomeUnknownError,
)
from rdzv._etcd._classify import Fields, Kind, classify, fields, translate
from rdzv._etcd._links import ForeignCluster, Link, Links

T = TypeVar("T")

INITIAL_BACKOFF: Final = 0.025
MAX_BACKOFF: Final = 0.5


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

    `what` completes "etcd refused to ..." in error messages; `key` names the key of a write
    in `RendezvousOutcomeUnknownError`.
    """
    delay = INITIAL_BACKOFF
    reauthenticated = False
    last_error: BaseException | None = None
    last_fields = Fields(endpoint=None, code=None, details=None)
    link: Link | None = None
    while deadline > time.monotonic():
        # Holding a retired link while waiting (a suspended connection) would keep its channel,
        # and gRPC's poller thread, alive across a fork.
        link = None
        link = await links.acquire(deadline)
        token: str | None = None
        sent = False
        try:
            async with links.in_flight():
                if _replaced(link):
                    continue  # replaced while this call waited for a slot: never send on it
                # The wait for a slot counts against the deadline.
                timeout = links.attempt_timeout(deadline - time.monotonic())
                if timeout <= 0:
                    break
                token = await links.authenticate(link, timeout)
                if _replaced(link):
                    continue  # replaced while this call waited to authenticate
                if not may_resend and not await _ready(link, timeout):
                    # Nothing was sent: safe to try again, elsewhere.
                    last_error = TimeoutError(f"{link.endpoint} did not connect in {timeout:g} s")
                    last_fields = Fields(endpoint=str(link.endpoint), code=None, details=None)
                    links.fail_over(link)
                    delay = await _backoff(delay, deadline)
                    continue
                sent = True
                result = await send(link, timeout)
            links.answered()
            return result
        except ForeignCluster as error:
            # Whatever it did there, it did not do here: try the next endpoint.
            last_error = error.with_traceback(None)
            last_fields = Fields(endpoint=str(link.endpoint), code=None, details=str(error))
            links.fail_over(link)
            delay = await _backoff(delay, deadline)
        except grpc.aio.UsageError as error:
            # The channel was closed before the request could leave (another call failed over,
            # or the connection was suspended or closed): nothing was sent.
            links.check_open()
            last_error = error.with_traceback(None)
        except asyncio.CancelledError:
            if not link.retired or _cancelling():
                raise
            # gRPC ended the call because rdzv closed its channel, not because the caller was
            # cancelled.
            links.check_open()
            last_fields = Fields(endpoint=str(link.endpoint), code="CANCELLED", details=None)
            if sent and not may_resend:
                raise lost_answer(what, key, last_fields) from None
        except Refused as refusal:
            if refusal.auth and links.username is not None and not reauthenticated:
                links.forget_token(token)
                reauthenticated = True
                continue
            raise _refused(refusal, what=what, link=link, username=links.username) from refusal
        except grpc.aio.AioRpcError as error:
            # Without its traceback, whose frames hold the link.
            last_error, last_fields = error.with_traceback(None), fields(error, link.endpoint)
            kind = classify(error)
            if kind is Kind.AUTH_EXPIRED and links.username is not None and not reauthenticated:
                links.forget_token(token)
                reauthenticated = True
                continue
            if kind is Kind.FINAL or kind is Kind.AUTH_EXPIRED:
                raise translate(
                    error, what=what, endpoint=link.endpoint, username=links.username
                ) from error
            if kind is Kind.TRANSIENT:
                await links.diagnose(link, error, deadline)
                links.fail_over(link)
                if sent and not may_resend:
                    raise lost_answer(what, key, last_fields) from error
                reauthenticated = False
            # Kind.BUSY: etcd applied nothing; back off and send again.
            delay = await _backoff(delay, deadline)
    raise RendezvousConnectionError(CONNECTION_FAILED_MESSAGE, **last_fields) from last_error


async def _ready(link: Link, timeout: float) -> bool:
    """Connect `link` if needed; false if it could not connect within `timeout`."""
    if link.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
        return True
    try:
        await asyncio.wait_for(link.channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def _backoff(delay: float, deadline: float) -> float:
    jittered = delay * random.uniform(0.5, 1.0)
    await asyncio.sleep(min(jittered, max(0.0, deadline - time.monotonic())))
    return min(delay * 2, MAX_BACKOFF)


def _replaced(link: Link) -> bool:
    """Whether another call retired `link` (a function, so that each call reads it anew)."""
    return link.retired


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (known on Python 3.11+ only)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _refused(refusal: Refused, *, what: str, link: Link, username: str | None) -> RendezvousError:
    known = Fields(endpoint=str(link.endpoint), code=None, details=refusal.details)
    if refusal.auth:
        return RendezvousAuthError(
            f"etcd at {link.endpoint} refused to let user {username!r} {what}: {refusal.details}",
            **known,
        )
    return RendezvousError(f"etcd at {link.endpoint} refused to {what}: {refusal.details}", **known)
