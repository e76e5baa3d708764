"""The embedded etcd: real etcd processes on the loopback interface, ports and directories managed.

This is production code: `rdzv serve` and `rdzv demo` run on it, and so does the pytest plugin
(`rdzv._pytest_plugin`). Its public names are re-exported, and documented for users, by
`rdzv.testing`; this package's name is private so that the CLI does not depend on a test module.

`_servers` runs the processes (`EtcdServer`, `EtcdCluster`). It stands on modules that know
one thing each: which binary to run (`_binary`), the TLS settings (`_tls`), loopback ports
(`_ports`), etcd's JSON gateway (`_gateway`), and the watchdog that cleans up after a killed
Python process (`_reaper`). Only the standard library is used, so importing this is cheap.
"""

from rdzv._server._binary import EtcdBinaryNotFoundError, find_etcd_binary
from rdzv._server._servers import EtcdCluster, EtcdServer
from rdzv._server._tls import EtcdTLS

__all__ = [
    "EtcdBinaryNotFoundError",
    "EtcdCluster",
    "EtcdServer",
    "EtcdTLS",
    "find_etcd_binary",
]
