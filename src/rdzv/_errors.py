"""The rdzv error tree.

Every error that leaves rdzv is a `RendezvousError`. Errors that come from the transport (gRPC)
are translated once, in the etcd boundary (`rdzv._etcd`), and keep the original error as their
`__cause__`. What went wrong is in structured fields (`endpoint`, `code`, `details`), so code
that handles an error never needs to read its message.

    RendezvousError
    ├── RendezvousConnectionError          etcd unreachable, or no answer within the read timeout
    │   ├── RendezvousAuthError            credentials rejected, or no permission on a key
    │   ├── RendezvousTLSError             TLS cannot work as configured
    │   └── RendezvousOutcomeUnknownError  a write may or may not have landed
    ├── RendezvousStateError               a corrupt stored state
    │   ├── RendezvousForeignStateError    a stored value that is not an rdzv state at all
    │   └── RendezvousStateTooLargeError   (also a ValueError) a state etcd refuses to store
    ├── RendezvousCompactedError           etcd no longer holds the revisions asked for
    │   └── RendezvousWatchCompactedError
    ├── RendezvousLeaseNotFoundError       a write named a lease etcd no longer has
    ├── RendezvousClosedError              the rendezvous is closed: nobody can join it any more
    ├── RendezvousTimeoutError             (also a TimeoutError) a join did not complete in time
    └── StoreTimeoutError                  (also a TimeoutError) store keys did not appear in time
"""

from __future__ import annotations

from collections.abc import Sequence


class RendezvousError(Exception):
    """The base of every error that rdzv raises.

    Attributes:
        endpoint: the etcd endpoint (`"host:port"`) involved, when one was.
        code: the name of the gRPC status code behind the error (`"UNAVAILABLE"`,
            `"PERMISSION_DENIED"`, ...), when there was one.
        details: etcd's (or gRPC's) own description of the failure, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        code: str | None = None,
        details: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.code = code
        self.details = details


class RendezvousConnectionError(RendezvousError):
    """etcd could not be reached, or did not answer within the read timeout.

    Attributes:
        endpoints: the etcd endpoints (`"host:port"`) that the call tried, in the order it
            first tried them; empty when none is known.
        waited: the seconds the call waited for an answer before it gave up, when it gave up
            because its time ran out; `None` otherwise.
        endpoint, code, details: the endpoint of the last failed attempt, and the gRPC status
            (code name and details) it failed with, when known (see `RendezvousError`).
    """

    def __init__(
        self,
        message: str,
        *,
        endpoints: Sequence[str] = (),
        waited: float | None = None,
        **fields: str | None,
    ) -> None:
        super().__init__(message, **fields)
        self.endpoints = tuple(endpoints)
        self.waited = waited


class RendezvousAuthError(RendezvousConnectionError):
    """etcd rejected the credentials, or the user lacks permission on a key.

    A subclass of `RendezvousConnectionError`, so code that handles "etcd is not usable" keeps
    working, while the message names the real cause.
    """


class RendezvousTLSError(RendezvousConnectionError):
    """TLS between rdzv and etcd cannot work as configured.

    The handshake failed (an untrusted server certificate, a missing or rejected client
    certificate), or a plain-text client met a TLS server. Raised at once, not after retrying
    for the read timeout, since retrying cannot help.
    """


class RendezvousOutcomeUnknownError(RendezvousConnectionError):
    """A write may or may not have been applied, and rdzv could not find out which in time.

    The request left and no answer came back, and reading etcd within the read timeout did not
    settle it (etcd was unreachable, or had compacted the history needed). Read the state again
    before acting on it. Unlike its parent, "unreachable", this error says that etcd may have
    changed.

    Attributes:
        key: the etcd key the write was for, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        endpoints: Sequence[str] = (),
        waited: float | None = None,
        **fields: str | None,
    ) -> None:
        super().__init__(message, endpoints=endpoints, waited=waited, **fields)
        self.key = key


class RendezvousStateError(RendezvousError):
    """The stored state is corrupt or cannot be written (for example, it is too large).

    Attributes:
        token: for a corrupt value, its etcd revision: pass it to `set_state` to overwrite the
            corrupt value on purpose. `None` when no value is involved.
    """

    def __init__(self, message: str, *, token: int | None = None, **fields: str | None) -> None:
        super().__init__(message, **fields)
        self.token = token


class RendezvousForeignStateError(RendezvousStateError):
    """The value at the state key is not an rdzv state: rdzv did not write it.

    It lacks rdzv's envelope entirely (unlike a corrupt rdzv state, an envelope that fails its
    checks): another program, or another rendezvous backend (PyTorch's etcd-v2 backend, for
    instance), wrote to the same key. Use another key prefix or run id, or, if the value is
    not needed, overwrite it with `set_state(new_state, error.token)`.

    Attributes:
        looks_like: what the value seems to be: `"torch-etcd-v2"` (the base64 text of a pickled
            PyTorch rendezvous state), `"pickle"`, `"json"`, `"text"`, `"empty"` or `"unknown"`.
        token: the value's etcd revision (see `RendezvousStateError`).
    """

    def __init__(
        self,
        message: str,
        *,
        looks_like: str,
        token: int | None = None,
        **fields: str | None,
    ) -> None:
        super().__init__(message, token=token, **fields)
        self.looks_like = looks_like


class RendezvousStateTooLargeError(RendezvousStateError, ValueError):
    """The state is larger than the etcd server accepts; nothing was written."""


class RendezvousCompactedError(RendezvousError):
    """A read asked for a revision that etcd has already compacted away.

    Attributes:
        compact_revision: the oldest revision etcd still holds, when etcd said which.
    """

    def __init__(
        self, message: str, *, compact_revision: int | None = None, **fields: str | None
    ) -> None:
        super().__init__(message, **fields)
        self.compact_revision = compact_revision


class RendezvousWatchCompactedError(RendezvousCompactedError):
    """A watch asked for changes from a revision that etcd has already compacted away.

    Attributes:
        compact_revision: the oldest revision etcd still holds; watch again from the state read
            by `get_state`.
    """


class RendezvousLeaseNotFoundError(RendezvousError):
    """A write named a lease that etcd no longer has (it expired or was revoked).

    Nothing was written. rdzv's backends and stores take a new lease and write again on their
    own; this error reaches callers of the low-level `Connection` only.
    """


class RendezvousClosedError(RendezvousError):
    """The rendezvous was closed (`AsyncRendezvous.close`): nobody can join it any more.

    Attributes:
        run_id: the closed rendezvous's run id.
    """

    def __init__(self, message: str, *, run_id: str, **fields: str | None) -> None:
        super().__init__(message, **fields)
        self.run_id = run_id


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """A join did not complete a round within its `join_timeout`; the node left the round.

    Attributes:
        run_id: the rendezvous's run id.
        round: the round the node was waiting in.
        timeout: the join timeout, in seconds.
    """

    def __init__(
        self, message: str, *, run_id: str, round: int, timeout: float, **fields: str | None
    ) -> None:
        super().__init__(message, **fields)
        self.run_id = run_id
        self.round = round
        self.timeout = timeout


class StoreTimeoutError(RendezvousError, TimeoutError):
    """A store operation waited for keys that did not appear within its timeout."""


CONNECTION_FAILED_MESSAGE = "The connection to etcd has failed"
"""How every message of a `RendezvousConnectionError` for a call that ran out of time begins."""
