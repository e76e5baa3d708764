"""The state lives on a lease: it expires between ttl and 2*ttl after the last write."""

from __future__ import annotations

import time

import aetcd
import anyio
import pytest

import rdzv
from support import present

pytestmark = pytest.mark.anyio

TTL = 2


async def test_writes_within_ttl_reuse_one_lease(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Consecutive writes attach the state to the same lease instead of granting one each."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=60)
    _, token, _ = present(await backend.set_state(b"one"))
    first = await raw_etcd.get(backend.key.encode())
    await backend.set_state(b"two", token)
    second = await raw_etcd.get(backend.key.encode())
    assert first is not None
    assert second is not None
    assert first.lease != 0
    assert second.lease == first.lease


@pytest.mark.slow
async def test_state_lives_at_least_ttl_after_last_write(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A state rewritten after its lease window still survives ttl seconds after that write."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=TTL)
    _, token, _ = present(await backend.set_state(b"one"))
    await anyio.sleep(TTL * 0.9)
    _, token, _ = present(await backend.set_state(b"two", token))
    written_at = time.monotonic()
    await anyio.sleep(TTL - 0.3 - (time.monotonic() - written_at))
    assert await backend.get_state() == (b"two", token)


@pytest.mark.slow
async def test_state_expires_within_twice_ttl_of_last_write(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Without writes, the state disappears no sooner than ttl and no later than 2*ttl (+1 s)."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=TTL)
    _, token, _ = present(await backend.set_state(b"short-lived"))
    written_at = time.monotonic()
    with anyio.fail_after(2 * TTL + 1.5):
        async for state, _ in backend.watch(token):
            if state is None:
                break
    lived = time.monotonic() - written_at
    assert await backend.get_state() is None
    assert TTL <= lived <= 2 * TTL + 1
