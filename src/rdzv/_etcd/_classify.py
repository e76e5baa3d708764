"""What a gRPC error from etcd means: the one place that reads gRPC status codes and details.

`classify` sorts an error into what the attempt driver does next (retry, re-authenticate, give
up); `translate` turns it into the public error tree, with the endpoint, the status code and
etcd's own description as structured fields.
"""

from __future__ import annotations

import enum
from typing import Final, TypedDict

import grpc
import grpc.aio

from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousAuthError,
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousLeaseNotFoundError,
    RendezvousStateTooLargeError,
)


class Kind(enum.Enum):
    """What the attempt driver does after an error."""

    TRANSIENT = "transient"
    """The same request may succeed on a retry, here or on another member."""
    BUSY = "busy"
    """etcd refused the request for load ("too many requests"); nothing was applied."""
    AUTH_EXPIRED = "auth-expired"
    """The auth token is no longer valid: authenticate again, then retry."""
    FINAL = "final"
    """Retrying cannot help."""


# Codes after which the same request may succeed on a retry: the transport failed, the attempt
# ran out of time, or etcd is between leaders. A member dying while a stream opens surfaces as
# INTERNAL ("Internal error from Core").
_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)

# etcd gives several errors one status code: INVALID_ARGUMENT is an oversize request, a missing
# user name, and more; RESOURCE_EXHAUSTED is a full database and (from gRPC itself) an oversize
# message. Like etcd's own Go client (rpctypes.ErrorDesc), we tell them apart by etcd's fixed
# error descriptions, here and nowhere else.
TOO_LARGE: Final = "etcdserver: request is too large"
NO_SPACE: Final = "etcdserver: mvcc: database space exceeded"
# etcd refuses a request when its applied index lags its committed index by over 5,000 entries
# (etcdserver/v3_server.go, maxGapBetweenApplyAndCommitIndex). It means the code to be
# RESOURCE_EXHAUSTED, but maps the error to rpctypes.ErrTooManyRequests, which carries no gRPC
# status, so gRPC sends it as UNKNOWN (etcd 3.4 and later; seen from 3.5.1): only the
# description tells it apart.
TOO_MANY_REQUESTS: Final = "etcdserver: too many requests"
# A proposal that etcd accepted but did not apply within its request timeout (5 s plus two
# election timeouts): etcd is overloaded, and the request may yet be applied (UNAVAILABLE).
TIMED_OUT: Final = "etcdserver: request timed out"
# A grant named the id of a lease that exists (FAILED_PRECONDITION).
LEASE_EXISTS: Final = "etcdserver: lease already exists"
INVALID_TOKEN: Final = "etcdserver: invalid auth token"
USER_NAME_EMPTY: Final = "etcdserver: user name is empty"
PERMISSION_DENIED: Final = "etcdserver: permission denied"
COMPACTED: Final = "etcdserver: mvcc: required revision has been compacted"


def classify(error: grpc.aio.AioRpcError) -> Kind:
    """What to do after `error`."""
    code, details = error.code(), error.details()
    if details == TOO_MANY_REQUESTS:
        return Kind.BUSY
    if code is grpc.StatusCode.UNAUTHENTICATED or details == INVALID_TOKEN:
        return Kind.AUTH_EXPIRED
    if code in _TRANSIENT_CODES:
        return Kind.TRANSIENT
    return Kind.FINAL


def overloaded(error: grpc.aio.AioRpcError) -> bool:
    """Whether etcd answered that it has more work than it can do (see TOO_MANY_REQUESTS)."""
    return error.details() in (TOO_MANY_REQUESTS, TIMED_OUT)


def synthetic(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A gRPC error for a failure that gRPC did not report (a stream's end, no answer in time)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def is_auth_refusal(reason: str) -> bool:
    """Whether etcd cancelled a watch for its credentials (the reason is all it gives).

    etcd 3.5 says "permission denied" both for a user without permission and for a token it
    no longer knows; etcd 3.4 says "invalid auth token" (code Unauthenticated) for the latter.
    """
    lowered = reason.lower()
    return any(
        marker in lowered
        for marker in ("permission denied", "invalid auth token", "unauthenticated")
    )


def is_too_large(error: grpc.aio.AioRpcError) -> bool:
    """Whether etcd (or gRPC) refused a request for its size."""
    code, details = error.code(), error.details()
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return bool(details == TOO_LARGE)
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and details not in (
        NO_SPACE,
        TOO_MANY_REQUESTS,
    )


class Fields(TypedDict):
    """The structured fields of a `RendezvousError` (see `rdzv.RendezvousError`)."""

    endpoint: str | None
    code: str | None
    details: str | None


def fields(error: grpc.aio.AioRpcError, endpoint: object) -> Fields:
    """The structured fields of a `RendezvousError` translated from `error`."""
    return Fields(endpoint=str(endpoint), code=error.code().name, details=error.details())


def translate(
    error: grpc.aio.AioRpcError, *, what: str, endpoint: object, username: str | None
) -> RendezvousError:
    """The public error for `error`, which happened when rdzv tried to `what` at `endpoint`."""
    code, details = error.code(), error.details()
    known = fields(error, endpoint)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return RendezvousAuthError(
            f"etcd at {endpoint} refused to let user {username!r} {what}: {details}", **known
        )
    if details in (USER_NAME_EMPTY, INVALID_TOKEN):
        return RendezvousAuthError(
            f"etcd at {endpoint} requires authentication to {what}: connect with a username "
            f"and password ({details}).",
            **known,
        )
    if details == NO_SPACE:
        return RendezvousError(
            f"etcd at {endpoint} is out of space and refuses to {what}: compact and defragment "
            "it, then disarm its NOSPACE alarm.",
            **known,
        )
    if is_too_large(error):
        return RendezvousStateTooLargeError(
            f"etcd at {endpoint} refused to {what}: {details}. Nothing was written; raise "
            "etcd's --max-request-bytes or store less.",
            **known,
        )
    if code is grpc.StatusCode.NOT_FOUND:
        # The only thing our calls name that etcd can fail to find is a lease.
        return RendezvousLeaseNotFoundError(f"etcd cannot {what}: {details}", **known)
    if code is grpc.StatusCode.OUT_OF_RANGE and details == COMPACTED:
        # OUT_OF_RANGE is also "too large lease TTL" and "future revision".
        return RendezvousCompactedError(f"etcd cannot {what}: {details}", **known)
    if classify(error) in (Kind.TRANSIENT, Kind.BUSY):
        return RendezvousConnectionError(
            f"{CONNECTION_FAILED_MESSAGE}: etcd at {endpoint} could not {what}: {code.name}: "
            f"{details}.",
            endpoints=(str(endpoint),),
            **known,
        )
    return RendezvousError(f"etcd at {endpoint} refused to {what}: {code.name}: {details}", **known)
