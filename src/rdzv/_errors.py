"""The rdzv error tree.

Every error that leaves rdzv is a `RendezvousError`. Errors that come from the transport (gRPC,
aetcd) are translated once, in `rdzv._etcd`, and keep the original error as their `__cause__`.
"""

from __future__ import annotations


class RendezvousError(Exception):
    """The base of every error that rdzv raises."""


class RendezvousConnectionError(RendezvousError):
    """etcd could not be reached, or did not answer within the read timeout."""


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


class RendezvousStateError(RendezvousError):
    """The stored state is corrupt or cannot be written (for example, it is too large).

    Attributes:
        token: for a corrupt value, its etcd revision: pass it to `set_state` to overwrite the
            corrupt value on purpose. `None` when no value is involved.
    """

    def __init__(self, message: str, *, token: int | None = None) -> None:
        super().__init__(message)
        self.token = token


class RendezvousStateTooLargeError(RendezvousStateError, ValueError):
    """The state is larger than the etcd server accepts; nothing was written."""


class StoreTimeoutError(RendezvousError, TimeoutError):
    """A store operation waited for keys that did not appear within its timeout."""


class RendezvousWatchCompactedError(RendezvousError):
    """A watch asked for changes from a revision that etcd has already compacted away.

    Attributes:
        compact_revision: the oldest revision etcd still holds; watch again from the state read
            by `get_state`.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


CONNECTION_FAILED_MESSAGE = "The connection to etcd has failed. See inner exception for details."
