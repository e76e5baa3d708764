"""A write whose answer was lost is resolved by finding its own bytes in etcd.

The lost answer itself cannot be produced on demand, so these tests put the cluster in each
state that a lost answer can leave behind, with real writes, and ask the resolver what happened.
"""

from __future__ import annotations

import aetcd
import pytest

import rdzv
from rdzv import _envelope
from rdzv._etcd import read_deadline
from support import present

pytestmark = pytest.mark.anyio


async def test_landed_write_is_reported_written(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """If etcd holds exactly our value, the write landed: (state, its token, True)."""
    _, token, _ = present(await backend.set_state(b"before"))
    ours = _envelope.encode(b"ours", backend.key)
    await raw_etcd.put(backend.key.encode(), ours)
    landed = await raw_etcd.get(backend.key.encode())
    assert landed is not None
    resolved = await backend._resolve_unknown_outcome(
        b"ours", ours, token, read_deadline(backend.connection)
    )
    assert resolved == (b"ours", landed.mod_revision, True)


async def test_untouched_key_means_retry(backend: rdzv.AsyncEtcdBackend) -> None:
    """If the key still has the token's revision, the write did not land: send it again."""
    _, token, _ = present(await backend.set_state(b"before"))
    ours = _envelope.encode(b"ours", backend.key)
    assert (
        await backend._resolve_unknown_outcome(
            b"ours", ours, token, read_deadline(backend.connection)
        )
        == "retry"
    )


async def test_landed_then_overwritten_write_is_reported_written(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """If our value was the first change after the token, it landed even if overwritten since."""
    _, token, _ = present(await backend.set_state(b"before"))
    ours = _envelope.encode(b"ours", backend.key)
    await raw_etcd.put(backend.key.encode(), ours)
    landed = await raw_etcd.get(backend.key.encode())
    assert landed is not None
    _, later, _ = present(await backend.set_state(b"someone else's", landed.mod_revision))
    resolved = await backend._resolve_unknown_outcome(
        b"ours", ours, token, read_deadline(backend.connection)
    )
    assert resolved == (b"ours", landed.mod_revision, True)
    assert later > landed.mod_revision


async def test_lost_race_is_reported_as_conflict(backend: rdzv.AsyncEtcdBackend) -> None:
    """If another write came first after the token, ours did not land: the current state."""
    _, token, _ = present(await backend.set_state(b"before"))
    _, theirs, _ = present(await backend.set_state(b"theirs", token))
    ours = _envelope.encode(b"ours", backend.key)
    assert await backend._resolve_unknown_outcome(
        b"ours", ours, token, read_deadline(backend.connection)
    ) == (
        b"theirs",
        theirs,
        False,
    )


async def test_created_then_overwritten_state_is_reported_written(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """For a create (None token), finding our value at the key's creation means it landed."""
    ours = _envelope.encode(b"ours", backend.key)
    await raw_etcd.put(backend.key.encode(), ours)
    created = await raw_etcd.get(backend.key.encode())
    assert created is not None
    await backend.set_state(b"someone else's", created.mod_revision)
    resolved = await backend._resolve_unknown_outcome(
        b"ours", ours, None, read_deadline(backend.connection)
    )
    assert resolved == (b"ours", created.mod_revision, True)


async def test_create_that_did_not_land_is_retried(backend: rdzv.AsyncEtcdBackend) -> None:
    """For a create, an absent key means the write did not land: send it again."""
    ours = _envelope.encode(b"ours", backend.key)
    assert (
        await backend._resolve_unknown_outcome(
            b"ours", ours, None, read_deadline(backend.connection)
        )
        == "retry"
    )


async def test_landed_then_deleted_write_is_reported_written(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """If our value was the first change after the token and the key is gone now, it landed."""
    _, token, _ = present(await backend.set_state(b"before"))
    ours = _envelope.encode(b"ours", backend.key)
    await raw_etcd.put(backend.key.encode(), ours)
    landed = await raw_etcd.get(backend.key.encode())
    assert landed is not None
    await raw_etcd.delete(backend.key.encode())
    resolved = await backend._resolve_unknown_outcome(
        b"ours", ours, token, read_deadline(backend.connection)
    )
    assert resolved == (b"ours", landed.mod_revision, True)


async def test_resolution_that_runs_out_of_time_is_outcome_unknown(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """A resolver with no time left says "may or may not have landed", never a guess."""
    _, token, _ = present(await backend.set_state(b"before"))
    ours = _envelope.encode(b"ours", backend.key)
    with pytest.raises(rdzv.RendezvousOutcomeUnknownError) as caught:
        await backend._resolve_unknown_outcome(b"ours", ours, token, 0.0)
    assert caught.value.key == backend.key
