"""watch(token) yields every change after the token, through etcd's watch API."""

from __future__ import annotations

import aetcd
import anyio
import pytest

import rdzv
from rdzv.testing import EtcdServer
from support import present, raw_client

pytestmark = pytest.mark.anyio


# What watch() yields: the state (None once deleted) and its token.
Change = tuple[bytes | None, int]


async def _collect(backend: rdzv.AsyncEtcdBackend, token: object, count: int) -> list[Change]:
    """The first `count` changes after `token`, within 10 s."""
    changes: list[Change] = []
    with anyio.fail_after(10):
        async for change in backend.watch(token):
            changes.append(change)
            if len(changes) == count:
                break
    return changes


async def test_watch_replays_changes_after_token(backend: rdzv.AsyncEtcdBackend) -> None:
    """Changes made after the token, before watching started, are all delivered in order."""
    _, token0, _ = present(await backend.set_state(b"zero"))
    _, token1, _ = present(await backend.set_state(b"one", token0))
    _, token2, _ = present(await backend.set_state(b"two", token1))
    assert await _collect(backend, token0, 2) == [(b"one", token1), (b"two", token2)]


async def test_watch_delivers_live_changes(backend: rdzv.AsyncEtcdBackend) -> None:
    """A change made while a watcher waits reaches it."""
    _, token, _ = present(await backend.set_state(b"zero"))
    results: list[Change] = []

    async def watch() -> None:
        results.extend(await _collect(backend, token, 1))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        await anyio.sleep(0.2)
        _, new_token, _ = present(await backend.set_state(b"one", token))
    assert results == [(b"one", new_token)]


async def test_watch_reports_deletion_as_none(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """A deleted state arrives as (None, token of the deletion)."""
    _, token, _ = present(await backend.set_state(b"zero"))
    await raw_etcd.delete(backend.key.encode())
    [(state, deleted_at)] = await _collect(backend, token, 1)
    assert state is None
    assert deleted_at > token


async def test_watch_raises_on_corrupt_change(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client
) -> None:
    """A corrupt value written under a watcher raises RendezvousStateError, not a state."""
    _, token, _ = present(await backend.set_state(b"zero"))
    await raw_etcd.put(backend.key.encode(), b"garbage")
    with pytest.raises(rdzv.RendezvousStateError, match="corrupt"):
        await _collect(backend, token, 1)


async def test_watch_rejects_invalid_token(backend: rdzv.AsyncEtcdBackend) -> None:
    """Watching from a token that is not a revision is a ValueError."""
    with pytest.raises(ValueError, match="not an etcd revision"):
        await _collect(backend, "abc", 1)


async def test_watch_from_compacted_token_raises(etcd_key_prefix: str) -> None:
    """A token whose history etcd compacted away raises RendezvousWatchCompactedError."""
    # Compaction affects the whole keyspace, so this test has a server of its own.
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint, read_timeout=5) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
            _, token, _ = present(await backend.set_state(b"zero"))
            _, latest, _ = present(await backend.set_state(b"one", token))
            async with raw_client(server.endpoint) as raw:
                await raw.compact(latest)
            with pytest.raises(rdzv.RendezvousWatchCompactedError) as caught:
                await _collect(backend, token - 1, 1)
            assert caught.value.compact_revision == latest


@pytest.mark.slow
async def test_watch_resumes_after_server_restart_without_losing_changes(
    etcd_key_prefix: str,
) -> None:
    """A watcher survives a server restart and sees the change made while it reconnected."""
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint, read_timeout=15) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
            _, token, _ = present(await backend.set_state(b"zero"))
            results: list[Change] = []

            async def watch() -> None:
                results.extend(await _collect(backend, token, 2))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                await anyio.sleep(0.3)
                _, token1, _ = present(await backend.set_state(b"one", token))
                await anyio.to_thread.run_sync(server.kill)
                await anyio.to_thread.run_sync(server.restart)
                _, token2, _ = present(await backend.set_state(b"two", token1))
            assert results == [(b"one", token1), (b"two", token2)]
