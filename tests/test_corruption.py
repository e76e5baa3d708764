"""Corrupt stored values are errors, never states, and can be overwritten on purpose."""

from __future__ import annotations

import aetcd
import pytest

import rdzv
from support import present

pytestmark = pytest.mark.anyio


async def test_foreign_value_makes_get_state_raise(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """A value rdzv did not write raises RendezvousForeignStateError naming the key."""
    await raw_etcd.put(backend.key.encode(), b"written by someone else")
    with pytest.raises(
        rdzv.RendezvousForeignStateError, match="The state object is not an rdzv state"
    ) as caught:
        await backend.get_state()
    assert backend.key in str(caught.value)
    assert caught.value.looks_like == "text"


async def test_flipped_bit_makes_get_state_raise(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """A value with one bit flipped raises instead of returning altered bytes."""
    await backend.set_state(b"a healthy state")
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    flipped = bytearray(stored.value)
    flipped[-3] ^= 0x04
    await raw_etcd.put(backend.key.encode(), bytes(flipped))
    with pytest.raises(rdzv.RendezvousStateError, match="checksum"):
        await backend.get_state()


async def test_truncated_value_makes_set_state_raise(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """set_state with a None token raises when the value it finds is truncated."""
    await backend.set_state(b"a healthy state")
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    await raw_etcd.put(backend.key.encode(), stored.value[:-4])
    with pytest.raises(rdzv.RendezvousStateError, match="corrupt"):
        await backend.set_state(b"new")


async def test_stale_token_over_corrupt_value_raises(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """set_state with a stale token raises rather than return the foreign value it finds."""
    _, token, _ = present(await backend.set_state(b"first"))
    await raw_etcd.put(backend.key.encode(), b"garbage")
    with pytest.raises(rdzv.RendezvousForeignStateError, match="not an rdzv state"):
        await backend.set_state(b"second", token)


async def test_corrupt_value_is_overwritten_with_its_token(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """The error carries the corrupt value's token; set_state with it recovers the run."""
    await raw_etcd.put(backend.key.encode(), b"garbage")
    with pytest.raises(rdzv.RendezvousStateError) as caught:
        await backend.get_state()
    assert caught.value.token is not None
    _, token, written = present(await backend.set_state(b"fresh", caught.value.token))
    assert written
    assert await backend.get_state() == (b"fresh", token)
