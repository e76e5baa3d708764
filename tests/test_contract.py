"""PyTorch's RendezvousBackend contract, case by case, through AsyncEtcdBackend."""

from __future__ import annotations

import aetcd
import pytest

import rdzv
from support import present

pytestmark = pytest.mark.anyio


async def test_get_state_returns_none_when_there_is_no_state(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """get_state answers None for a run id that was never written."""
    assert await backend.get_state() is None


async def test_set_state_without_token_creates_the_state(backend: rdzv.AsyncEtcdBackend) -> None:
    """A None token writes when no state exists, and returns the new token."""
    state, token, written = present(await backend.set_state(b"first"))
    assert (state, written) == (b"first", True)
    assert await backend.get_state() == (b"first", token)


async def test_set_state_without_token_does_not_overwrite(backend: rdzv.AsyncEtcdBackend) -> None:
    """A None token never overwrites an existing state; the current one comes back."""
    _, token, _ = present(await backend.set_state(b"first"))
    assert await backend.set_state(b"second") == (b"first", token, False)
    assert await backend.get_state() == (b"first", token)


async def test_set_state_with_current_token_writes(backend: rdzv.AsyncEtcdBackend) -> None:
    """The current token lets set_state write, and the token moves forward."""
    _, token, _ = present(await backend.set_state(b"first"))
    state, new_token, written = present(await backend.set_state(b"second", token))
    assert (state, written) == (b"second", True)
    assert new_token > token
    assert await backend.get_state() == (b"second", new_token)


async def test_set_state_with_stale_token_returns_current_state(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """A stale token does not write and returns the current state and token."""
    _, stale, _ = present(await backend.set_state(b"first"))
    _, current, _ = present(await backend.set_state(b"second", stale))
    assert await backend.set_state(b"third", stale) == (b"second", current, False)
    assert await backend.get_state() == (b"second", current)


async def test_set_state_with_token_and_no_state_returns_none(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """A token given for a state that does not exist yields None and writes nothing."""
    assert await backend.set_state(b"x", 12345) is None
    assert await backend.get_state() is None


@pytest.mark.parametrize("token", ["1", "abc", True, False, -1, 0, 1.0, b"1", object()])
async def test_set_state_with_invalid_token_does_not_write(
    backend: rdzv.AsyncEtcdBackend, token: object
) -> None:
    """A token that is not an etcd revision returns the current state and does not write."""
    _, current, _ = present(await backend.set_state(b"first"))
    assert await backend.set_state(b"second", token) == (b"first", current, False)
    assert await backend.get_state() == (b"first", current)


@pytest.mark.parametrize("token", ["1", True, -1, 0])
async def test_set_state_with_invalid_token_and_no_state_returns_none(
    backend: rdzv.AsyncEtcdBackend, token: object
) -> None:
    """An invalid token with no state yields None and creates nothing."""
    assert await backend.set_state(b"x", token) is None
    assert await backend.get_state() is None


async def test_token_is_the_keys_mod_revision(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client, etcd_key_prefix: str
) -> None:
    """The token is the etcd mod_revision of the key f"{key_prefix}/{run_id}"."""
    _, token, _ = present(await backend.set_state(b"state"))
    assert backend.key == f"{etcd_key_prefix}/job"
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    assert isinstance(token, int)
    assert token == stored.mod_revision


async def test_backends_with_different_run_ids_are_independent(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Two run ids on one connection keep separate states."""
    first = rdzv.AsyncEtcdBackend(connection, "a", key_prefix=etcd_key_prefix)
    second = rdzv.AsyncEtcdBackend(connection, "b", key_prefix=etcd_key_prefix)
    await first.set_state(b"state of a")
    assert await second.get_state() is None


async def test_backend_name_is_etcd_v3(backend: rdzv.AsyncEtcdBackend) -> None:
    """The backend calls itself "etcd-v3", the name torchrun knows it by."""
    assert backend.name == "etcd-v3"


async def test_state_of_one_mebibyte_round_trips(backend: rdzv.AsyncEtcdBackend) -> None:
    """A 1 MiB state is written and read back intact."""
    state = bytes(range(256)) * 4096
    _, token, written = present(await backend.set_state(state))
    assert written
    assert await backend.get_state() == (state, token)


async def test_oversize_state_is_a_clear_error_and_writes_nothing(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """A state larger than etcd accepts raises RendezvousStateTooLargeError; nothing changes."""
    _, token, _ = present(await backend.set_state(b"small"))
    for size in (int(1.7 * 2**20), 3 * 2**20):
        with pytest.raises(rdzv.RendezvousStateTooLargeError, match="Nothing was written"):
            await backend.set_state(b"x" * size, token)
    assert await backend.get_state() == (b"small", token)


async def test_non_bytes_state_is_rejected(backend: rdzv.AsyncEtcdBackend) -> None:
    """A state that is not bytes raises TypeError before anything is written."""
    with pytest.raises(TypeError, match="must be bytes"):
        await backend.set_state("text")  # type: ignore[arg-type]  # the wrong type, on purpose
    assert await backend.get_state() is None
