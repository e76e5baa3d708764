"""rdzv: an async-first etcd v3 rendezvous backend for PyTorch elastic training.

The core is asyncio (`connect`, `AsyncRendezvous`, `AsyncEtcdBackend`, `AsyncEtcdStore`);
`Rendezvous` and `EtcdBackend` are thin synchronous facades over it for legacy launchers such
as torchrun. rdzv runs on asyncio only: its etcd client (aetcd,
over grpc.aio) does not support trio.
"""

from __future__ import annotations

from rdzv._backend import DEFAULT_KEY_PREFIX, DEFAULT_TTL, AsyncEtcdBackend
from rdzv._errors import (
    RendezvousAuthError,
    RendezvousClosedError,
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousForeignStateError,
    RendezvousLeaseNotFoundError,
    RendezvousOutcomeUnknownError,
    RendezvousStateError,
    RendezvousStateTooLargeError,
    RendezvousTimeoutError,
    RendezvousTLSError,
    RendezvousWatchCompactedError,
    StoreTimeoutError,
)
from rdzv._etcd import (
    Compare,
    Connection,
    ConnectionOptions,
    Delete,
    Endpoint,
    Get,
    KeyValue,
    Nested,
    Put,
    TxnResult,
    WatchEvent,
    connect,
)
from rdzv._rendezvous import (
    DEFAULT_LEASE_TTL,
    DEFAULT_ROUNDS_PREFIX,
    MAX_NODE_INFO,
    MAX_NODES,
    AsyncRendezvous,
    Member,
    Membership,
)
from rdzv._store import DEFAULT_STORE_PREFIX, AsyncEtcdStore
from rdzv._sync import EtcdBackend, Rendezvous
from rdzv._version import __version__

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_ROUNDS_PREFIX",
    "DEFAULT_STORE_PREFIX",
    "DEFAULT_TTL",
    "MAX_NODES",
    "MAX_NODE_INFO",
    "AsyncEtcdBackend",
    "AsyncEtcdStore",
    "AsyncRendezvous",
    "Compare",
    "Connection",
    "ConnectionOptions",
    "Delete",
    "Endpoint",
    "EtcdBackend",
    "Get",
    "KeyValue",
    "Member",
    "Membership",
    "Nested",
    "Put",
    "Rendezvous",
    "RendezvousAuthError",
    "RendezvousClosedError",
    "RendezvousCompactedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousForeignStateError",
    "RendezvousLeaseNotFoundError",
    "RendezvousOutcomeUnknownError",
    "RendezvousStateError",
    "RendezvousStateTooLargeError",
    "RendezvousTLSError",
    "RendezvousTimeoutError",
    "RendezvousWatchCompactedError",
    "StoreTimeoutError",
    "TxnResult",
    "WatchEvent",
    "__version__",
    "connect",
]

# Tracebacks and reprs show the public path, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("rdzv._"):
        _obj.__module__ = __name__
del _name, _obj
