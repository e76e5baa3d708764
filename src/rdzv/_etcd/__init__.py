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
- `_links`: the channel to the current endpoint, failover, authentication, suspension;
- `_attempts`: the attempt driver, the one place that retries;
- `_keepalive`: lease keep-alives, all of a connection's leases on one stream;
- `_connection`: the `Connection` and its calls.

aetcd and grpc.aio are asyncio-only, so this package and everything above it runs on asyncio.
"""

from __future__ import annotations

from rdzv._etcd._connection import DEFAULT_MAX_IN_FLIGHT, Connection, connect
from rdzv._etcd._endpoints import DEFAULT_PORT, Endpoint, parse_endpoints
from rdzv._etcd._keepalive import LeaseKeeper
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
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PORT",
    "Compare",
    "Connection",
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
    "connect",
    "parse_endpoints",
    "prefix_end",
]
