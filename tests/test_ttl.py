"""The state lives on a lease of exactly ttl seconds: it expires ttl after the last write."""

from __future__ import annotations

import time
from itertools import pairwise

import aetcd
import anyio
import pytest

import rdzv
import rdzv._etcd
from rdzv import _lease
from rdzv._lease import REFRESH_INTERVAL
from support import present, remaining_until

pytestmark = pytest.mark.anyio

TTL = 2
# etcd looks for expired leases every 500 ms and deletes their keys through raft; the watch
# then tells us. Slack for that, on a busy machine.
EXPIRY_SLACK = 1.0
# How long a test waits for something that should happen at once.
WAIT = 5.0


async def _lease_of(raw_etcd: aetcd.Client, key: str) -> int:
    """The lease that `key` is attached to (it must exist)."""
    stored = await raw_etcd.get(key.encode())
    assert stored is not None
    assert stored.lease != 0
    return int(stored.lease)


async def _deleted_at(backend: rdzv.AsyncEtcdBackend, token: int) -> float:
    """The `time.monotonic()` time the state, at `token`, is seen deleted (its lease expired)."""
    with anyio.fail_after(TTL + EXPIRY_SLACK + WAIT):
        async for state, _ in backend.watch(token):
            if state is None:
                return time.monotonic()
    raise AssertionError("the watch ended")


async def test_writes_within_ttl_reuse_one_lease(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Consecutive writes attach the state to the same lease instead of granting one each."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=60)
    _, token, _ = present(await backend.set_state(b"one"))
    first = await _lease_of(raw_etcd, backend.key)
    await backend.set_state(b"two", token)
    assert await _lease_of(raw_etcd, backend.key) == first


async def test_state_lease_is_granted_exactly_ttl(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """The state's lease is granted with ttl, and LeaseTimeToLive never reports more."""
    ttl = 7200
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=ttl)
    _, token, _ = present(await backend.set_state(b"one"))
    await backend.set_state(b"two", token)
    info = await raw_etcd.get_lease_info(await _lease_of(raw_etcd, backend.key), keys=False)
    assert info.grantedTTL == ttl
    assert 0 < info.TTL <= ttl


async def test_store_key_lease_is_granted_exactly_ttl(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A store key's lease is granted with the store's ttl, and never reports more."""
    ttl = 7200
    store = rdzv.AsyncEtcdStore(connection, prefix=f"{etcd_key_prefix}/store/", ttl=ttl)
    await store.set("k", b"v")
    await store.set("k", b"w")
    lease_id = await _lease_of(raw_etcd, f"{etcd_key_prefix}/store/k")
    info = await raw_etcd.get_lease_info(lease_id, keys=False)
    assert info.grantedTTL == ttl
    assert 0 < info.TTL <= ttl


async def test_each_write_restores_the_full_ttl(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A write sends a keep-alive with it: the state's lease is back to its full ttl."""
    ttl = 4
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=ttl)
    _, token, _ = present(await backend.set_state(b"one"))
    lease_id = await _lease_of(raw_etcd, backend.key)
    await anyio.sleep(1.2)
    # Whole seconds, rounded down: ttl - 2 after 1.2 s; a full ttl reads as ttl - 1.
    assert await connection.lease_time_to_live(lease_id) <= ttl - 2
    await backend.set_state(b"two", token)
    assert await _lease_of(raw_etcd, backend.key) == lease_id
    assert (
        await remaining_until(connection, lease_id, lambda remaining: remaining >= ttl - 1) <= ttl
    )


async def test_a_burst_of_writes_sends_a_keep_alive_after_its_last_write(
    connection: rdzv.Connection, etcd_key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes within 0.1 s share keep-alives, the last one sent after the last write."""
    sent: list[float] = []
    refresh_lease = rdzv._etcd.refresh_lease

    async def recorded(connection: rdzv.Connection, lease_id: int) -> None:
        sent.append(time.monotonic())
        await refresh_lease(connection, lease_id)

    monkeypatch.setattr(_lease, "refresh_lease", recorded)
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=60)
    started = time.monotonic()
    _, token, _ = present(await backend.set_state(b"0"))
    for n in range(1, 10):
        last_sent_at = time.monotonic()
        _, token, _ = present(await backend.set_state(str(n).encode(), token))
    burst = time.monotonic() - started
    await anyio.sleep(REFRESH_INTERVAL * 3)
    assert len(sent) <= 2 + burst / REFRESH_INTERVAL  # 2 for 10 writes, unless they were slow
    assert all(later - earlier >= REFRESH_INTERVAL * 0.9 for earlier, later in pairwise(sent))
    assert sent[-1] > last_sent_at


async def test_write_after_the_lease_was_revoked_takes_a_new_one(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """With its lease revoked behind its back, the next write lands on a new lease of ttl."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=60)
    present(await backend.set_state(b"one"))
    revoked = await _lease_of(raw_etcd, backend.key)
    await raw_etcd.revoke_lease(revoked)
    _, _, written = present(await backend.set_state(b"two"))
    assert written
    lease_id = await _lease_of(raw_etcd, backend.key)
    assert lease_id != revoked
    assert await connection.lease_time_to_live(lease_id) <= 60


@pytest.mark.slow
async def test_state_lives_ttl_after_a_write_near_the_end_of_its_lease(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A state rewritten late in its lease still survives ttl seconds after that write."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=TTL)
    _, token, _ = present(await backend.set_state(b"one"))
    await anyio.sleep(TTL * 0.9)
    sent_at = time.monotonic()
    _, token, _ = present(await backend.set_state(b"two", token))
    returned_at = time.monotonic()
    deleted_at = await _deleted_at(backend, token)
    assert deleted_at - sent_at >= TTL
    assert deleted_at - returned_at <= TTL + EXPIRY_SLACK


@pytest.mark.slow
async def test_state_expires_ttl_after_the_last_of_many_writes(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Writes every ttl/4 keep one lease alive past its ttl; the state goes ttl after the last."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=TTL)
    _, token, _ = present(await backend.set_state(b"0"))
    first_at = time.monotonic()
    lease_id = await _lease_of(raw_etcd, backend.key)
    for n in range(1, 7):
        await anyio.sleep(TTL / 4)
        sent_at = time.monotonic()
        _, token, written = present(await backend.set_state(str(n).encode(), token))
        assert written
    returned_at = time.monotonic()
    # The lease granted first is still the state's: without the keep-alives, it would be gone.
    assert returned_at - first_at > TTL
    assert await _lease_of(raw_etcd, backend.key) == lease_id
    deleted_at = await _deleted_at(backend, token)
    assert deleted_at - sent_at >= TTL
    assert deleted_at - returned_at <= TTL + EXPIRY_SLACK
