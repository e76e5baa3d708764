"""A backend is ready when it is created: its first write costs one request to etcd.

The facades (and torchrun's backend) take the state's lease and open the keep-alive stream as
they are created (`AsyncEtcdBackend.prepare`), not in the first write's compare-and-swap; the
state still expires `ttl` seconds after its last write, and a lease no write used is revoked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator

import aetcd
import anyio
import anyio.lowlevel
import pytest

import rdzv
from rdzv.testing import EtcdServer
from support import poll_until, present

# etcd's own count of what it received, by gRPC method: each message, and each call started.
_METRIC = re.compile(
    r'^grpc_server_(?P<what>msg_received|started)_total\{grpc_method="(?P<method>\w+)",'
    r'grpc_service="etcdserverpb\.\w+",grpc_type="\w+"\} (?P<count>\d+)$',
    re.MULTILINE,
)

# Run in a new process: create the backend, then one set_state between two readings of etcd's
# counters, then a third reading once the write's keep-alive has surely gone out.
_FIRST_WRITE = textwrap.dedent(
    """
    import json, re, sys, time, urllib.request

    kind, endpoint, prefix = sys.argv[1:]
    pattern = re.compile({pattern!r}, re.MULTILINE)

    def counts():
        with urllib.request.urlopen(f"http://{{endpoint}}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        found = {{}}
        for match in pattern.finditer(text):
            name = match["what"] + ":" + match["method"]
            found[name] = found.get(name, 0) + int(match["count"])
        return found

    if kind == "facade":
        import rdzv

        backend = rdzv.EtcdBackend(endpoint, "job", key_prefix=prefix, read_timeout=10)
        close = backend.close
    else:
        from torch.distributed.elastic.rendezvous import RendezvousParameters

        import rdzv.torch

        params = RendezvousParameters("etcd-v3", endpoint, "job", 1, 1, key_prefix=prefix)
        backend, _ = rdzv.torch.create_backend(params)
        close = backend.facade.close
    before = counts()
    outcome = backend.set_state(b"first")
    after = counts()
    time.sleep(0.5)
    settled = counts()
    close()
    print(json.dumps([outcome[2], before, after, settled]))
    """
)


def _counts(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, int] = {}
    for match in _METRIC.finditer(text):
        name = f"{match['what']}:{match['method']}"
        found[name] = found.get(name, 0) + int(match["count"])
    return found


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}


@pytest.fixture(scope="module")
def quiet_etcd() -> Iterator[str]:
    """An etcd of this module's own, so that etcd's counters show this module's requests only."""
    with EtcdServer() as server:
        yield server.endpoint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["facade", "torch"])
def test_first_set_state_of_a_new_process_sends_one_request(quiet_etcd: str, kind: str) -> None:
    """A new process's first set_state is one Txn: lease and stream were opened by creation."""
    if kind == "torch":
        pytest.importorskip("torch")
    script = _FIRST_WRITE.format(pattern=_METRIC.pattern)
    prefix = f"/cold/{kind}"
    run = subprocess.run(
        [sys.executable, "-c", script, kind, quiet_etcd, prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    written, before, after, settled = json.loads(run.stdout.splitlines()[-1])
    assert written
    # One call started (no LeaseGrant, no new keep-alive stream), and one message: the Txn.
    first = _delta(before, after)
    first.pop("msg_received:LeaseKeepAlive", None)  # the write's keep-alive, if out already
    assert first == {"started:Txn": 1, "msg_received:Txn": 1}
    # The write's keep-alive, on the stream opened by creation, not awaited: the state lives
    # `ttl` seconds after this write, not after the creation.
    assert _delta(before, settled) == {
        "started:Txn": 1,
        "msg_received:Txn": 1,
        "msg_received:LeaseKeepAlive": 1,
    }


def test_a_facade_that_never_wrote_revokes_its_lease_on_close(
    quiet_etcd: str,
) -> None:
    """The lease taken at creation, unused, is revoked on close; it does not linger for ttl."""
    backend = rdzv.EtcdBackend(quiet_etcd, "reader", key_prefix="/cold/close", read_timeout=10)
    assert backend.get_state() is None
    before = _counts(quiet_etcd)
    backend.close()
    assert _delta(before, _counts(quiet_etcd)).get("msg_received:LeaseRevoke") == 1


def test_a_facade_that_wrote_leaves_its_state_on_close(quiet_etcd: str) -> None:
    """A lease that a write used holds the state, which outlives the facade: never revoked."""
    with rdzv.EtcdBackend(quiet_etcd, "writer", key_prefix="/cold/close") as backend:
        _, token, _ = present(backend.set_state(b"kept"))
        before = _counts(quiet_etcd)
    assert "msg_received:LeaseRevoke" not in _delta(before, _counts(quiet_etcd))
    with rdzv.EtcdBackend(quiet_etcd, "writer", key_prefix="/cold/close") as again:
        assert again.get_state() == (b"kept", token)


@pytest.mark.anyio
async def test_a_write_long_after_prepare_restores_the_full_ttl(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """The lease prepare took is refreshed by the first write: the ttl counts from the write."""
    ttl = 4
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=ttl)
    await backend.prepare()
    await anyio.sleep(1.2)
    present(await backend.set_state(b"late"))
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    lease_id = int(stored.lease)

    # Whole seconds, rounded down: a full ttl reads as ttl - 1, the lease as prepared ttl - 2.
    async def refreshed() -> bool:
        return await connection.lease_time_to_live(lease_id) >= ttl - 1

    with anyio.fail_after(5):
        await poll_until(refreshed)


@pytest.mark.anyio
async def test_a_write_racing_the_revocation_takes_a_new_lease(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A write that comes while close revokes the unused lease lands on a lease of its own."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=60)
    await backend.prepare()
    prepared = present(backend._unused_lease)
    async with anyio.create_task_group() as group:
        group.start_soon(backend._release)
        await anyio.lowlevel.checkpoint()  # the revocation is on its way
        present(await backend.set_state(b"written"))
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    assert int(stored.lease) != prepared
    assert await connection.lease_time_to_live(prepared) == -1
    assert await connection.lease_time_to_live(int(stored.lease)) > 0
