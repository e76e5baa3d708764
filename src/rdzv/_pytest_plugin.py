"""pytest fixtures for a real etcd, registered as the `rdzv` pytest plugin.

Installing rdzv makes these fixtures available to every pytest run (the `pytest11` entry point);
nothing is started unless a test uses one:

- `etcd_server` (session): an `rdzv.testing.EtcdServer`, started once and stopped at the end.
- `etcd_endpoints`: the session server's endpoint, `"127.0.0.1:PORT"`.
- `etcd_key_prefix`: a key prefix unique to the test, so tests sharing the server never share
  keys, and nothing needs to wipe the key space.
- `etcd_cluster`: a fresh 3-member `rdzv.testing.EtcdCluster` for each test, for fault tests.

Without an etcd binary these fixtures fail with `rdzv.testing.EtcdBinaryNotFoundError`, whose
message says how to provide one; they never skip.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from rdzv._server import EtcdCluster, EtcdServer

_KEY_PREFIX_ROOT = "/rdzv-test"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_NAME_LENGTH = 60


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A single etcd server shared by the whole test session."""
    from rdzv._server import EtcdServer

    server = EtcdServer(name="rdzv-session")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_endpoints(etcd_server: EtcdServer) -> str:
    """The session etcd server's endpoint, `"127.0.0.1:PORT"`.

    A test that left the session server paused or killed does not break the tests after it: the
    server is resumed, or restarted with its data.
    """
    if etcd_server.is_paused:
        etcd_server.resume()
    if not etcd_server.is_running:
        etcd_server.restart()
    return etcd_server.endpoint


@pytest.fixture
def etcd_key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to the test: `/rdzv-test/<test name>-<8 hex digits>`, no final slash."""
    name = _UNSAFE.sub("_", request.node.name).strip("_")[:_MAX_NAME_LENGTH] or "test"
    return f"{_KEY_PREFIX_ROOT}/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh, started 3-member etcd cluster for one test, stopped afterwards."""
    from rdzv._server import EtcdCluster

    cluster = EtcdCluster(3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
