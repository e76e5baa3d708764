"""Shared fixtures: a real etcd (from rdzv's pytest plugin), connections and backends on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aetcd
import pytest

import rdzv
from rdzv.testing import EtcdServer


@pytest.fixture
def anyio_backend() -> str:
    """Rdzv's etcd client (aetcd over grpc.aio) runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def connection(etcd_endpoints: str) -> AsyncIterator[rdzv.Connection]:
    """An open connection to the session's etcd."""
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as conn:
        yield conn


@pytest.fixture
def backend(connection: rdzv.Connection, etcd_key_prefix: str) -> rdzv.AsyncEtcdBackend:
    """A backend for run id "job" under this test's own key prefix."""
    return rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)


@pytest.fixture
async def raw_etcd(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A plain aetcd client, to read and write keys behind rdzv's back."""
    host, port = etcd_server.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        yield client
