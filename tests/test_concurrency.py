"""Concurrent compare-and-swap writers never lose an update."""

from __future__ import annotations

import anyio
import pytest

import rdzv

pytestmark = pytest.mark.anyio


async def _increment(backend: rdzv.AsyncEtcdBackend, times: int, acknowledged: list[int]) -> int:
    """Add one to the counter `times` times with read-modify-write; return the conflicts seen."""
    conflicts = 0
    current = await backend.get_state()
    assert current is not None
    state, token = current
    for _ in range(times):
        while True:
            result = await backend.set_state(str(int(state) + 1).encode(), token)
            assert result is not None
            new_state, token, written = result
            if written:
                acknowledged.append(token)
                state = new_state
                break
            conflicts += 1
            state = new_state
    return conflicts


async def test_concurrent_writers_lose_no_update(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Eight writers on separate connections each add 15 to a counter: it ends at 120."""
    writers, rounds = 8, 15
    acknowledged: list[int] = []
    conflicts: list[int] = []
    async with rdzv.connect(etcd_endpoints) as setup:
        await rdzv.AsyncEtcdBackend(setup, "counter", key_prefix=etcd_key_prefix).set_state(b"0")

    async def writer() -> None:
        async with rdzv.connect(etcd_endpoints) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "counter", key_prefix=etcd_key_prefix)
            conflicts.append(await _increment(backend, rounds, acknowledged))

    async with anyio.create_task_group() as tasks:
        for _ in range(writers):
            tasks.start_soon(writer)

    async with rdzv.connect(etcd_endpoints) as check:
        counter = rdzv.AsyncEtcdBackend(check, "counter", key_prefix=etcd_key_prefix)
        final = await counter.get_state()
    assert final is not None
    assert final[0] == str(writers * rounds).encode()
    assert len(set(acknowledged)) == writers * rounds
    assert final[1] == max(acknowledged)
    assert sum(conflicts) > 0  # the writers really did contend
