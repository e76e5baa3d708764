"""The etcd boundary: the only package that speaks gRPC to etcd.

aetcd 1.0 gives us the generated etcd v3 protobuf messages and stubs, which we use, and a client
that we do not use: it opens only an insecure channel to a single endpoint, builds transactions
with an untyped operator-overloading mini-language, and tells errors apart by their message text.
This package replaces those pieces, one module a job:

- `_endpoints`: parsing endpoint lists;
- `_values`: typed keys, transaction conditions and operations, watch events;
- `_classify`: what a gRPC error means, and its translation into the `rdzv.RendezvousError` tree;
- `_tls`: channel credentials and recognising TLS misconfiguration;
- `_calls`: awaiting a gRPC call, so that a cancellation of the caller stays the caller's;
- `_options`: the connection options, each with its default and its check;
- `_links`: the channel to the current endpoint, failover, authentication, suspension;
- `_attempts`: the attempt driver, the one place that retries a request, and its backoff;
- `_settle`: the driver of a write that may lose its answer: it resends or resolves;
- `_keepalive`: lease keep-alives, all of a connection's leases on one stream;
- `_connection`: the `Connection` and its calls.

aetcd and grpc.aio are asyncio-only, so this package and everything above it runs on asyncio.
"""

from __future__ import annotations

from rdzv._etcd._connection import (
    Connection,
    connect,
    first_change_after,
    follow_lease,
    keep_alive,
    read_deadline,
    refresh_lease,
    resume,
    suspend,
)
from rdzv._etcd._endpoints import DEFAULT_PORT, Endpoint, parse_endpoints
from rdzv._etcd._keepalive import LeaseKeeper
from rdzv._etcd._options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_READ_TIMEOUT,
    ConnectionKeywords,
    ConnectionOptions,
    as_options,
)
from rdzv._etcd._settle import AGAIN, Again, answer_itself, settle
from rdzv._etcd._values import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Nested,
    Operation,
    Put,
    TxnResult,
    WatchEvent,
    prefix_end,
)

__all__ = [
    "AGAIN",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PORT",
    "DEFAULT_READ_TIMEOUT",
    "Again",
    "Compare",
    "Connection",
    "ConnectionKeywords",
    "ConnectionOptions",
    "Delete",
    "Endpoint",
    "Get",
    "KeyValue",
    "LeaseKeeper",
    "Nested",
    "Operation",
    "Put",
    "TxnResult",
    "WatchEvent",
    "answer_itself",
    "as_options",
    "connect",
    "first_change_after",
    "follow_lease",
    "keep_alive",
    "parse_endpoints",
    "prefix_end",
    "read_deadline",
    "refresh_lease",
    "resume",
    "settle",
    "suspend",
]
