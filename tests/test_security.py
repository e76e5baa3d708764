"""TLS, mutual TLS, etcd authentication, signed states, and secrets kept out of sight."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import pytest
import trustme

import rdzv
from rdzv.testing import EtcdServer, EtcdTLS

pytestmark = pytest.mark.anyio

STATE_KEY = b"a-shared-state-key-of-32-bytes!!"


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for 127.0.0.1, a client certificate, another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """Certificates made for this test run by trustme."""
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("rdzv-client")
    files = Certificates(*(directory / name for name in ("ca", "sc", "sk", "cc", "ck", "oca")))
    ca.cert_pem.write_to_path(files.ca)
    other_ca.cert_pem.write_to_path(files.other_ca)
    server.cert_chain_pems[0].write_to_path(files.server_cert)
    server.private_key_pem.write_to_path(files.server_key)
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.client_key)
    return files


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[EtcdServer]:
    """An etcd that serves clients over TLS only."""
    tls = EtcdTLS(certificates.server_cert, certificates.server_key, certificates.ca)
    with EtcdServer(tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(certificates: Certificates) -> Iterator[EtcdServer]:
    """An etcd that requires a client certificate signed by the test CA."""
    tls = EtcdTLS(
        certificates.server_cert,
        certificates.server_key,
        certificates.ca,
        client_cert_auth=True,
        client_cert_file=certificates.client_cert,
        client_key_file=certificates.client_key,
    )
    with EtcdServer(tls=tls) as server:
        yield server


async def _round_trip(connection: rdzv.Connection, key_prefix: str) -> None:
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=key_prefix)
    _, token, written = await backend.set_state(b"over tls")  # type: ignore[misc]
    assert written
    assert await backend.get_state() == (b"over tls", token)


async def test_https_with_the_servers_ca_works(
    tls_server: EtcdServer, certificates: Certificates
) -> None:
    """protocol="https" with the CA that signed the server's certificate reads and writes."""
    async with rdzv.connect(tls_server.endpoint, protocol="https", ca_cert=certificates.ca) as conn:
        await _round_trip(conn, "/tls")


async def test_mutual_tls_with_a_client_certificate_works(
    mtls_server: EtcdServer, certificates: Certificates
) -> None:
    """A client certificate signed by the trusted CA gets through a server that requires one."""
    async with rdzv.connect(
        mtls_server.endpoint,
        protocol="https",
        ca_cert=certificates.ca,
        ssl_cert=certificates.client_cert,
        ssl_cert_key=certificates.client_key,
    ) as conn:
        await _round_trip(conn, "/mtls")


async def _fails_fast_with_tls_error(endpoint: str, match: str, **options: object) -> None:
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousTLSError, match=match) as caught:
        async with rdzv.connect(endpoint, read_timeout=30, **options):  # type: ignore[arg-type]
            pass
    assert time.monotonic() - started < 10  # far inside the 30 s read timeout
    assert isinstance(caught.value, rdzv.RendezvousConnectionError)


async def test_plain_text_client_against_tls_server_fails_fast(tls_server: EtcdServer) -> None:
    """A plain-text client meeting a TLS server is told to use https, without a long wait."""
    await _fails_fast_with_tls_error(tls_server.endpoint, "protocol='https'")


async def test_wrong_ca_fails_fast(tls_server: EtcdServer, certificates: Certificates) -> None:
    """A CA that did not sign the server's certificate fails the handshake, at once."""
    await _fails_fast_with_tls_error(
        tls_server.endpoint, "TLS handshake", protocol="https", ca_cert=certificates.other_ca
    )


async def test_missing_client_certificate_fails_fast(
    mtls_server: EtcdServer, certificates: Certificates
) -> None:
    """Without a client certificate, a server that requires one fails the handshake, at once."""
    await _fails_fast_with_tls_error(
        mtls_server.endpoint, "TLS handshake", protocol="https", ca_cert=certificates.ca
    )


async def test_https_client_against_plain_server_fails_fast(
    etcd_endpoints: str, certificates: Certificates
) -> None:
    """A TLS client meeting a plain-text server fails the handshake, at once."""
    await _fails_fast_with_tls_error(
        etcd_endpoints, "TLS handshake", protocol="https", ca_cert=certificates.ca
    )


# ------------------------------------------------------------------------------ authentication


async def test_user_with_a_role_on_the_prefix_works(
    auth_server: EtcdServer, auth_password: str, etcd_key_prefix: str
) -> None:
    """A user whose role grants the rendezvous prefix reads and writes the state."""
    async with rdzv.connect(auth_server.endpoint, username="alice", password=auth_password) as conn:
        # The auth server is shared by the session: this test's key goes under its own prefix.
        await _round_trip(conn, f"/allowed{etcd_key_prefix}")


async def test_wrong_password_is_a_clear_auth_error(auth_server: EtcdServer) -> None:
    """A wrong password raises RendezvousAuthError naming the user, fast."""
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousAuthError, match=r"'alice'.*invalid user ID or password"):
        async with rdzv.connect(auth_server.endpoint, username="alice", password="wrong"):
            pass
    assert time.monotonic() - started < 5


async def test_user_without_permission_on_the_prefix_is_a_clear_auth_error(
    auth_server: EtcdServer, auth_password: str
) -> None:
    """A user lacking permission on the state's key gets RendezvousAuthError naming the key."""
    async with rdzv.connect(auth_server.endpoint, username="bob", password=auth_password) as conn:
        backend = rdzv.AsyncEtcdBackend(conn, "job", key_prefix="/allowed")
        with pytest.raises(
            rdzv.RendezvousAuthError, match=r"'bob'.*/allowed/job.*permission denied"
        ):
            await backend.set_state(b"x")


async def test_missing_credentials_on_an_auth_server_is_a_clear_auth_error(
    auth_server: EtcdServer,
) -> None:
    """No credentials against an etcd with auth on says that a username is needed."""
    async with rdzv.connect(auth_server.endpoint) as conn:
        backend = rdzv.AsyncEtcdBackend(conn, "job", key_prefix="/allowed")
        with pytest.raises(rdzv.RendezvousAuthError, match="requires authentication"):
            await backend.get_state()


async def test_password_appears_in_no_error_repr_or_log(
    auth_server: EtcdServer, caplog: pytest.LogCaptureFixture, auth_password: str
) -> None:
    """The password is absent from reprs, error messages, their causes, and log records."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    connection = rdzv.connect(auth_server.endpoint, username="bob", password=auth_password)
    seen.append(repr(connection))
    async with connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix="/allowed")
        seen.append(repr(backend))
        with pytest.raises(rdzv.RendezvousAuthError) as denied:
            await backend.set_state(b"x")
    with pytest.raises(rdzv.RendezvousAuthError) as rejected:
        async with rdzv.connect(auth_server.endpoint, username="bob", password=auth_password + "x"):
            pass
    for error in (denied.value, rejected.value):
        seen += [str(error), repr(error), str(error.__cause__), repr(error.__cause__)]
    facade = rdzv.EtcdBackend(auth_server.endpoint, "job", username="alice", password=auth_password)
    seen.append(repr(facade))
    facade.close()
    seen += [record.getMessage() for record in caplog.records]
    assert seen
    assert not [text for text in seen if auth_password in text]


# ------------------------------------------------------------------------------- signed states


async def test_signed_states_round_trip(connection: rdzv.Connection, etcd_key_prefix: str) -> None:
    """Backends sharing a state key read each other's states."""
    writer = rdzv.AsyncEtcdBackend(
        connection, "job", key_prefix=etcd_key_prefix, state_key=STATE_KEY
    )
    reader = rdzv.AsyncEtcdBackend(
        connection, "job", key_prefix=etcd_key_prefix, state_key=STATE_KEY
    )
    _, token, _ = await writer.set_state(b"signed")  # type: ignore[misc]
    assert await reader.get_state() == (b"signed", token)


async def test_state_injected_without_the_key_is_rejected(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A state written by a writer without the key is rejected by backends that have it."""
    intruder = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
    member = rdzv.AsyncEtcdBackend(
        connection, "job", key_prefix=etcd_key_prefix, state_key=STATE_KEY
    )
    await intruder.set_state(b"injected")
    with pytest.raises(rdzv.RendezvousStateError, match="not signed"):
        await member.get_state()
    with pytest.raises(rdzv.RendezvousStateError, match="not signed"):
        await member.set_state(b"mine")


def _signed(connection: rdzv.Connection, key_prefix: str) -> rdzv.AsyncEtcdBackend:
    return rdzv.AsyncEtcdBackend(connection, "job", key_prefix=key_prefix, state_key=STATE_KEY)


async def _stored(raw_etcd: aetcd.Client, backend: rdzv.AsyncEtcdBackend) -> Any:
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    return stored


async def _rounds(backend: rdzv.AsyncEtcdBackend, first: int, last: int, token: int) -> int:
    for number in range(first, last + 1):
        result = await backend.set_state(f"round {number}".encode(), token)
        assert result is not None
        assert result[2]
        token = result[1]
    return token


async def test_round_1_put_back_after_round_7_is_rejected(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """Round 1's signed value put back byte for byte after round 7 is a RendezvousStateError."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    round_1 = (await _stored(raw_etcd, backend)).value
    token = await _rounds(backend, 2, 7, created[1])
    await raw_etcd.put(backend.key.encode(), round_1)
    for reader in (backend, _signed(connection, etcd_key_prefix)):
        with pytest.raises(rdzv.RendezvousStateError, match="put back in its place"):
            await reader.get_state()
    with pytest.raises(rdzv.RendezvousStateError, match="put back in its place"):
        await backend.set_state(b"round 8", token)


async def test_middle_round_put_back_is_rejected_by_a_watch(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """A watch raises RendezvousStateError on round 3's signed value put back after round 5."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    token = await _rounds(backend, 2, 3, created[1])
    round_3 = (await _stored(raw_etcd, backend)).value
    token = await _rounds(backend, 4, 5, token)
    await raw_etcd.put(backend.key.encode(), round_3)
    changes = backend.watch(token)
    with pytest.raises(rdzv.RendezvousStateError, match="signed as version 3 of the key"):
        await asyncio.wait_for(anext(changes), 30)
    await changes.aclose()


async def test_replayed_value_can_be_overwritten_with_its_token(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """set_state(state, error.token) replaces a replayed value with a state that reads back."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    round_1 = (await _stored(raw_etcd, backend)).value
    await _rounds(backend, 2, 2, created[1])
    await raw_etcd.put(backend.key.encode(), round_1)
    fresh = _signed(connection, etcd_key_prefix)
    with pytest.raises(rdzv.RendezvousStateError) as caught:
        await fresh.get_state()
    assert caught.value.token is not None
    result = await fresh.set_state(b"recovered", caught.value.token)
    assert result is not None
    assert result[2]
    assert await _signed(connection, etcd_key_prefix).get_state() == (b"recovered", result[1])


async def test_first_value_put_back_after_a_delete_is_accepted(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """After a delete, the value that created the key verifies as the new key's first value."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    round_1 = (await _stored(raw_etcd, backend)).value
    await _rounds(backend, 2, 3, created[1])
    await raw_etcd.delete(backend.key.encode())
    await raw_etcd.put(backend.key.encode(), round_1)
    state = await backend.get_state()
    assert state is not None
    assert state[0] == b"round 1"


async def test_later_value_put_back_after_a_delete_is_rejected(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """After a delete, a signed value of any later round does not verify as the new key's."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    await _rounds(backend, 2, 2, created[1])
    round_2 = (await _stored(raw_etcd, backend)).value
    await raw_etcd.delete(backend.key.encode())
    await raw_etcd.put(backend.key.encode(), round_2)
    with pytest.raises(rdzv.RendezvousStateError, match="it is the value that creates the key"):
        await backend.get_state()


async def test_signed_write_on_a_token_from_another_backend_is_written(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A backend writes on a token it never saw (another backend's), and the state reads back."""
    alice, bob = _signed(connection, etcd_key_prefix), _signed(connection, etcd_key_prefix)
    created = await alice.set_state(b"round 1")
    assert created is not None
    token = await _rounds(alice, 2, 3, created[1])
    result = await bob.set_state(b"bob's round 4", token)
    assert result is not None
    assert result[::2] == (b"bob's round 4", True)
    assert await alice.get_state() == (b"bob's round 4", result[1])


async def test_signed_write_on_a_stale_unseen_token_returns_the_current_state(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """On a stale token it never saw, a signed set_state returns the current state, unwritten."""
    alice, bob = _signed(connection, etcd_key_prefix), _signed(connection, etcd_key_prefix)
    created = await alice.set_state(b"round 1")
    assert created is not None
    current = await _rounds(alice, 2, 2, created[1])
    assert await bob.set_state(b"bob's round 2", created[1]) == (b"round 2", current, False)
    assert (await _stored(raw_etcd, alice)).mod_revision == current


async def test_signed_write_on_an_unseen_token_of_a_deleted_state_returns_none(
    connection: rdzv.Connection, etcd_key_prefix: str, raw_etcd: aetcd.Client
) -> None:
    """On a token it never saw of a state deleted since, a signed set_state returns None."""
    alice, bob = _signed(connection, etcd_key_prefix), _signed(connection, etcd_key_prefix)
    created = await alice.set_state(b"round 1")
    assert created is not None
    await raw_etcd.delete(alice.key.encode())
    assert await bob.set_state(b"bob's round 2", created[1]) is None
    assert await alice.get_state() is None


async def test_signed_writes_on_tokens_the_backend_saw_send_no_extra_read(
    connection: rdzv.Connection,
    etcd_endpoints: str,
    etcd_key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tokens from its own writes, losing replies, get_state and watch need no read to write on."""
    reads: list[bytes] = []
    real_get = connection.get

    async def counting_get(key: bytes, **options: Any) -> Any:
        reads.append(key)
        return await real_get(key, **options)

    monkeypatch.setattr(connection, "get", counting_get)
    backend = _signed(connection, etcd_key_prefix)
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as elsewhere:
        other = _signed(elsewhere, etcd_key_prefix)
        created = await backend.set_state(b"round 1")
        assert created is not None
        token = await _rounds(backend, 2, 3, created[1])
        theirs = await other.set_state(b"other's round 4", token)
        assert theirs is not None
        lost = await backend.set_state(b"round 4", token)
        assert lost == (b"other's round 4", theirs[1], False)
        token = await _rounds(backend, 5, 5, theirs[1])
        assert reads == []
        token = await _rounds(other, 6, 6, token)
        current = await backend.get_state()
        assert current == (b"round 6", token)
        token = await _rounds(backend, 7, 7, token)
        changes = backend.watch(token)
        written = await _rounds(other, 8, 8, token)
        _, watched = await anext(changes)
        await changes.aclose()
        assert watched == written
        await _rounds(backend, 9, 9, watched)
    assert reads == [backend.key.encode()]  # get_state's own read


async def test_concurrent_signed_writes_of_one_backend_stay_readable(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Concurrent signed set_state calls on one backend: the winner's token writes on, readably."""
    backend = _signed(connection, etcd_key_prefix)
    created = await backend.set_state(b"round 1")
    assert created is not None
    results = await asyncio.gather(
        *(backend.set_state(f"candidate {n}".encode(), created[1]) for n in range(8))
    )
    winners = [result for result in results if result is not None and result[2]]
    assert len(winners) == 1
    token = await _rounds(backend, 3, 4, winners[0][1])
    assert await _signed(connection, etcd_key_prefix).get_state() == (b"round 4", token)


def test_short_state_key_is_rejected() -> None:
    """A state key shorter than 16 bytes is a ValueError."""
    with pytest.raises(ValueError, match="at least 16 bytes"):
        rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", state_key=b"short")


def test_state_key_is_not_in_the_backends_repr() -> None:
    """The backend's repr does not show the state key."""
    backend = rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", state_key=STATE_KEY)
    assert STATE_KEY.decode() not in repr(backend)


async def test_plain_text_client_against_mutual_tls_server_fails_fast(
    mtls_server: EtcdServer,
) -> None:
    """A plain-text client meeting a server that demands client certificates is told, at once."""
    await _fails_fast_with_tls_error(mtls_server.endpoint, "protocol='https'")
