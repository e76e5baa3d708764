"""Shared fixtures: a real etcd (from rdzv's pytest plugin); connections, backends, stores on it.

Plain helpers that are not fixtures (a closed port, a raw client of any endpoint, `present`)
are in `support.py`, whose docstring says why they are apart.
"""

from __future__ import annotations

import collections
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aetcd
import pytest

import rdzv
from rdzv.testing import EtcdServer, FaultProxy, find_etcd_binary
from support import READER_PASSWORD, STORE_WAIT, RawEtcd, RdzvProcess, raw_client, torch_params

if TYPE_CHECKING:
    # Imported in the fixtures that need them: torch takes seconds to import.
    from torch._C._distributed_c10d import Store

    from rdzv.torch import EtcdStore


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
def proxy(etcd_endpoints: str) -> Iterator[FaultProxy]:
    """A started fault proxy in front of the session's etcd."""
    with FaultProxy(etcd_endpoints) as proxy:
        yield proxy


@pytest.fixture
def proxied_read_timeout() -> float:
    """The read timeout of `proxied`; a test module overrides this fixture to change it."""
    return 2.0


@pytest.fixture
async def proxied(proxy: FaultProxy, proxied_read_timeout: float) -> AsyncIterator[rdzv.Connection]:
    """A connection to the session's etcd through `proxy` alone."""
    async with rdzv.connect(proxy.endpoint, read_timeout=proxied_read_timeout) as connection:
        yield connection


@pytest.fixture
def store_prefix(etcd_key_prefix: str) -> str:
    """A store prefix of this test's own."""
    return f"{etcd_key_prefix}/store/"


@pytest.fixture
def store(connection: rdzv.Connection, store_prefix: str) -> rdzv.AsyncEtcdStore:
    """An async store under this test's own prefix, on the shared connection."""
    return rdzv.AsyncEtcdStore(connection, prefix=store_prefix)


@pytest.fixture
def etcd_store(etcd_endpoints: str, etcd_key_prefix: str) -> Iterator[EtcdStore]:
    """The EtcdStore of a fresh create_backend pair under this test's prefix, closed afterwards.

    Its timeout is `STORE_WAIT`; its prefix is `store_prefix`.
    """
    from rdzv.torch import create_backend

    backend, store = create_backend(torch_params(etcd_endpoints, etcd_key_prefix))
    try:
        store.set_timeout(STORE_WAIT)
        yield store
    finally:
        backend.facade.close()


@pytest.fixture(params=["python", "prefix_store"])
def torch_store(request: pytest.FixtureRequest, etcd_store: EtcdStore) -> Store:
    """`etcd_store` called from Python, or through C++ as a PrefixStore's underlying store."""
    from torch._C._distributed_c10d import PrefixStore

    if request.param == "python":
        return etcd_store
    # etcd_store stays referenced by its fixture: C++ does not keep the Python object alive.
    return PrefixStore("view", etcd_store)


@pytest.fixture
def rdzv_process() -> Iterator[Callable[..., RdzvProcess]]:
    """Start `python -m rdzv ...` subprocesses; each is killed and closed at teardown."""
    started: list[RdzvProcess] = []

    def start(*arguments: str) -> RdzvProcess:
        started.append(RdzvProcess(*arguments))
        return started[-1]

    yield start
    for process in started:
        process.close()


@pytest.fixture
async def raw_etcd(etcd_endpoints: str) -> AsyncIterator[aetcd.Client]:
    """A raw aetcd client of the session's etcd, to read and write keys behind rdzv's back."""
    async with raw_client(etcd_endpoints) as client:
        yield client


@pytest.fixture
def raw_etcd_sync(etcd_endpoints: str) -> Iterator[RawEtcd]:
    """The same raw client for synchronous tests: blocking calls, on a thread of its own."""
    with RawEtcd(etcd_endpoints) as raw:
        yield raw


@pytest.fixture(scope="session")
def auth_password() -> str:
    """The password of the users of `auth_server`."""
    return "s3cret-Passw0rd"


@pytest.fixture(scope="session")
def auth_server(auth_password: str) -> Iterator[EtcdServer]:
    """An etcd with auth on: "alice" may read and write under /allowed/; "bob" has no role."""
    with EtcdServer() as server:
        etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))

        def run(*arguments: str) -> None:
            subprocess.run(
                [etcdctl, f"--endpoints={server.endpoint}", *arguments],
                check=True,
                capture_output=True,
                timeout=30,
            )

        run("user", "add", "root:root-password")
        run("role", "add", "rendezvous")
        run("role", "grant-permission", "rendezvous", "--prefix=true", "readwrite", "/allowed/")
        for user in ("alice", "bob"):
            run("user", "add", f"{user}:{auth_password}")
        run("user", "grant-role", "alice", "rendezvous")
        run("auth", "enable")
        yield server


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[collections.Counter[str]]:
    """Counts for docs/reliability.md, printed when the test ends (shown with -s)."""
    counts: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    yield counts
    profile = getattr(request.module, "PROFILE", None)
    labels = [f"profile={profile}"] if profile else []
    labels += [f"{name}={value}" for name, value in sorted(counts.items())]
    elapsed = time.monotonic() - started
    print(f"\nreliability: {request.node.name} {' '.join(labels)} seconds={elapsed:.1f}")


class Participants:
    """Makes rendezvous participants under the test's prefix; they all leave when it ends."""

    def __init__(self, connection: rdzv.Connection, key_prefix: str) -> None:
        self.connection = connection
        self.key_prefix = key_prefix
        self.made: list[rdzv.AsyncRendezvous] = []

    def __call__(
        self,
        *,
        min_nodes: int = 1,
        max_nodes: int = 1,
        last_call_timeout: float = 0.2,
        join_timeout: float = 20,
        lease_ttl: int = 2,
        connection: rdzv.Connection | None = None,
        run_id: str = "job",
    ) -> rdzv.AsyncRendezvous:
        """One more participant, on the shared connection unless another is given."""
        participant = rdzv.AsyncRendezvous(
            connection or self.connection,
            run_id,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            last_call_timeout=last_call_timeout,
            join_timeout=join_timeout,
            lease_ttl=lease_ttl,
            key_prefix=self.key_prefix,
        )
        self.made.append(participant)
        return participant


@pytest.fixture
async def participants(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> AsyncIterator[Participants]:
    """A factory of rendezvous participants for run id "job" under the test's own prefix."""
    made = Participants(connection, etcd_key_prefix)
    yield made
    for participant in made.made:
        await participant.leave()


@pytest.fixture(scope="module")
def reader_server() -> Iterator[EtcdServer]:
    """An etcd with auth on: "reader" may only read (role "reading"), "nobody" has no role.

    Its root's password is "root-password".
    """
    with EtcdServer() as server:
        etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))

        def run(*arguments: str) -> None:
            command = [etcdctl, f"--endpoints={server.endpoint}", *arguments]
            subprocess.run(command, check=True, capture_output=True, timeout=30)

        run("user", "add", "root:root-password")
        run("role", "add", "reading")
        run("role", "grant-permission", "reading", "--prefix=true", "read", "/")
        run("user", "add", f"reader:{READER_PASSWORD}")
        run("user", "add", f"nobody:{READER_PASSWORD}")
        run("user", "grant-role", "reader", "reading")
        run("auth", "enable")
        yield server
