"""rdzv logs on the `rdzv.*` loggers: what happened, with structured fields, and no secrets.

Every test captures the records of the `rdzv` logger hierarchy with pytest's `caplog`, against
a real etcd, and reads the records' `rdzv_*` attributes (the `extra=` fields), not only their
text.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aetcd
import anyio
import pytest

import rdzv
from rdzv._etcd import keep_alive
from rdzv.testing import EtcdServer, FaultProxy
from support import LoseAnswers, closed_port, present

pytestmark = pytest.mark.anyio

PAYLOAD = b"PAYLOAD-7f3a9c-never-logged"
"""A state recognisable in any record that would leak it."""

# The attributes of every LogRecord, and those that pytest's capture adds.
_STANDARD = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message",
    "asctime",
}


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name.startswith("rdzv")]


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {name: value for name, value in vars(record).items() if name not in _STANDARD}


def _field(record: logging.LogRecord, name: str) -> Any:
    """The structured field `name` of a record (an `extra=` attribute)."""
    return getattr(record, name)


def _everything_in(record: logging.LogRecord) -> str:
    """The record's message, its arguments and its extra fields, as text."""
    return f"{record.getMessage()} {record.args!r} {_extra(record)!r}"


def _leaks(records: list[logging.LogRecord], secret: bytes) -> list[logging.LogRecord]:
    """The records that show `secret`, as text or as the repr of its bytes."""
    forms = (secret.decode(), repr(secret)[2:-1])
    return [record for record in records if any(form in _everything_in(record) for form in forms)]


@pytest.fixture
def rdzv_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every record of the `rdzv` loggers, down to DEBUG."""
    with caplog.at_level(logging.DEBUG, logger="rdzv"):
        yield caplog


def test_library_adds_no_handler_and_sets_no_level() -> None:
    """After import and a connection's use, no logger has a handler or a level from rdzv."""
    program = (
        "import asyncio, logging, rdzv\n"
        "async def use():\n"
        f"    async with rdzv.connect('127.0.0.1:{closed_port()}', read_timeout=0.2):\n"
        "        pass\n"
        "try:\n"
        "    asyncio.run(use())\n"
        "except rdzv.RendezvousConnectionError:\n"
        "    pass\n"
        "names = [''] + [n for n in logging.root.manager.loggerDict if n.startswith('rdzv')]\n"
        "for name in names:\n"
        "    logger = logging.getLogger(name)\n"
        "    assert not logger.handlers, (name, logger.handlers)\n"
        "    assert name == '' or logger.level == logging.NOTSET, (name, logger.level)\n"
        "print(sorted(names))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "'rdzv.etcd'" in completed.stdout


async def test_connect_logs_the_endpoint_and_etcd_version_at_info(
    etcd_endpoints: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a connection logs, at INFO, the endpoint that answered and etcd's version."""
    with caplog.at_level(logging.INFO, logger="rdzv"):
        async with rdzv.connect(etcd_endpoints, read_timeout=10):
            pass
    [connected] = [r for r in _records(caplog) if r.getMessage().startswith("Connected to etcd")]
    assert (connected.name, connected.levelno) == ("rdzv.etcd", logging.INFO)
    assert _field(connected, "rdzv_endpoint") == etcd_endpoints
    assert str(_field(connected, "rdzv_version")).count(".") == 2
    assert _field(connected, "rdzv_version") in connected.getMessage()


async def test_failover_from_a_closed_port_is_a_warning_naming_both_endpoints(
    etcd_endpoints: str, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """Failing over from a dead endpoint logs a WARNING naming it, the next one and why."""
    dead = f"127.0.0.1:{closed_port()}"
    async with rdzv.connect(f"{dead},{etcd_endpoints}", read_timeout=10):
        pass
    [failover] = [r for r in _records(rdzv_debug) if r.levelno >= logging.WARNING]
    assert failover.name == "rdzv.etcd"
    assert (_field(failover, "rdzv_endpoint"), _field(failover, "rdzv_next_endpoint")) == (
        dead,
        etcd_endpoints,
    )
    assert "UNAVAILABLE" in _field(failover, "rdzv_details")
    assert dead in failover.getMessage()
    assert etcd_endpoints in failover.getMessage()


async def test_lease_grant_is_logged_at_debug(
    backend: rdzv.AsyncEtcdBackend, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """The first write takes a lease: its id and TTL are logged at DEBUG on rdzv.lease."""
    await backend.set_state(b"state")
    [grant] = [r for r in _records(rdzv_debug) if r.getMessage().startswith("Granted lease")]
    assert (grant.name, grant.levelno) == ("rdzv.lease", logging.DEBUG)
    assert _field(grant, "rdzv_ttl") == backend.ttl
    assert f"{_field(grant, 'rdzv_lease'):x}" in grant.getMessage()


async def test_kept_lease_that_expires_is_a_warning(
    connection: rdzv.Connection, raw_etcd: aetcd.Client, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """A lease kept alive that etcd no longer has is logged at WARNING on rdzv.lease."""
    lease_id = await connection.grant_lease(3)
    keeper = keep_alive(connection, lease_id, 3)
    try:
        await raw_etcd.revoke_lease(lease_id)
        with anyio.fail_after(10):
            await keeper.wait_expired()
    finally:
        keeper.release()
    [expired] = [r for r in _records(rdzv_debug) if r.levelno >= logging.WARNING]
    assert (expired.name, _field(expired, "rdzv_lease")) == ("rdzv.lease", lease_id)
    assert "etcd no longer has it" in expired.getMessage()


async def test_lease_revoked_by_rdzv_is_no_warning(
    connection: rdzv.Connection, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """A kept lease that rdzv itself revokes expires without a warning."""
    lease_id = await connection.grant_lease(3)
    keeper = keep_alive(connection, lease_id, 3)
    await connection.revoke_lease(lease_id)
    assert keeper.expired
    assert not [r for r in _records(rdzv_debug) if r.levelno >= logging.WARNING]


async def test_lost_answer_and_its_resolution_are_logged(
    backend: rdzv.AsyncEtcdBackend,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    rdzv_debug: pytest.LogCaptureFixture,
) -> None:
    """A write whose answer is lost logs the loss and how it was resolved, at INFO."""
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "before"))
    _, token, written = present(await backend.set_state(b"state"))
    assert written
    backend_records = [r for r in _records(rdzv_debug) if r.name == "rdzv.backend"]
    assert [r.levelno for r in backend_records] == [logging.INFO, logging.INFO]
    lost, resolved = backend_records
    assert "lost its answer" in lost.getMessage()
    assert _field(lost, "rdzv_key") == backend.key
    assert (_field(resolved, "rdzv_outcome"), _field(resolved, "rdzv_revision")) == (
        "it landed",
        token,
    )


@pytest.mark.slow
async def test_answer_lost_in_the_network_names_the_endpoint(
    etcd_endpoints: str, etcd_key_prefix: str, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """A transaction whose answer the network loses is logged with the silent endpoint."""
    with FaultProxy(etcd_endpoints) as proxy:
        async with rdzv.connect(f"{proxy.endpoint},{etcd_endpoints}", read_timeout=4) as conn:
            backend = rdzv.AsyncEtcdBackend(conn, "job", key_prefix=etcd_key_prefix)
            _, token, _ = present(await backend.set_state(b"round 1"))
            proxy.hold("responses")
            present(await backend.set_state(b"round 2", token))
    [lost] = [r for r in _records(rdzv_debug) if "may or may not have been applied" in r.msg]
    assert (lost.name, lost.levelno) == ("rdzv.etcd", logging.INFO)
    assert _field(lost, "rdzv_endpoint") == proxy.endpoint
    assert _field(lost, "rdzv_key") == backend.key
    backend_records = [r for r in _records(rdzv_debug) if r.name == "rdzv.backend"]
    assert getattr(backend_records[-1], "rdzv_outcome", None) == "it landed"


async def test_compacted_watch_is_a_warning(
    backend: rdzv.AsyncEtcdBackend, raw_etcd: aetcd.Client, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """A watch from a compacted revision logs a WARNING with the revisions involved."""
    _, first, _ = present(await backend.set_state(b"one"))
    _, second, _ = present(await backend.set_state(b"two", first))
    await raw_etcd.compact(second)
    with pytest.raises(rdzv.RendezvousWatchCompactedError):
        async for _ in backend.watch(first - 1):
            pass
    [compacted] = [r for r in _records(rdzv_debug) if r.levelno >= logging.WARNING]
    assert compacted.name == "rdzv.etcd"
    assert _field(compacted, "rdzv_key") == backend.key
    assert _field(compacted, "rdzv_compact_revision") >= second


async def test_healthy_run_logs_nothing_at_warning_or_above(
    backend: rdzv.AsyncEtcdBackend, connection: rdzv.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes, reads, a watch and a store on a healthy etcd log no warning or error."""
    with caplog.at_level(logging.DEBUG, logger="rdzv"):
        _, token, _ = present(await backend.set_state(b"one"))
        changes = backend.watch(token)
        present(await backend.set_state(b"two", token))
        with anyio.fail_after(10):
            await changes.__anext__()
        await changes.aclose()
        store = rdzv.AsyncEtcdStore(connection, prefix=f"{backend.key}/store/")
        await store.set("key", b"value")
        await store.compare_set("key", b"value", b"other")
        assert await store.get("key", timeout=5) == b"other"
    records = _records(caplog)
    assert records
    assert not [r for r in records if r.levelno >= logging.WARNING]


async def test_extra_fields_are_prefixed_rdzv(
    etcd_endpoints: str, etcd_key_prefix: str, rdzv_debug: pytest.LogCaptureFixture
) -> None:
    """Every structured field that rdzv adds to a record is named `rdzv_...`."""
    async with rdzv.connect(f"127.0.0.1:{closed_port()},{etcd_endpoints}") as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        await backend.set_state(b"state")
    records = _records(rdzv_debug)
    assert records
    for record in records:
        assert all(name.startswith("rdzv_") for name in _extra(record)), _extra(record)


async def test_no_record_shows_a_state_payload(
    backend: rdzv.AsyncEtcdBackend,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    rdzv_debug: pytest.LogCaptureFixture,
) -> None:
    """States and store values, written, read, watched or lost, appear in no log record."""
    _, token, _ = present(await backend.set_state(PAYLOAD))
    changes = backend.watch(token)
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "before"))
    present(await backend.set_state(PAYLOAD + b"-2", token))
    monkeypatch.undo()
    with anyio.fail_after(10):
        await changes.__anext__()
    await changes.aclose()
    assert await backend.get_state() is not None
    store = rdzv.AsyncEtcdStore(connection, prefix=f"{backend.key}/store/")
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "before"))
    assert await store.compare_set("key", b"", PAYLOAD) == PAYLOAD
    monkeypatch.undo()
    records = _records(rdzv_debug)
    assert any(r.name == "rdzv.store" for r in records)
    assert not _leaks(records, PAYLOAD)


@pytest.mark.slow
async def test_no_record_shows_the_password_or_the_auth_token(
    auth_server: EtcdServer,
    auth_password: str,
    etcd_key_prefix: str,
    rdzv_debug: pytest.LogCaptureFixture,
) -> None:
    """With authentication, re-authenticating after a restart: neither secret is ever logged."""
    async with rdzv.connect(
        auth_server.endpoint, read_timeout=15, username="alice", password=auth_password
    ) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=f"/allowed{etcd_key_prefix}")
        _, token, _ = present(await backend.set_state(b"before"))
        auth_token = present(connection._links._token)
        auth_server.restart()
        assert await backend.get_state() == (b"before", token)
    records = _records(rdzv_debug)
    assert any("authenticating again" in r.getMessage() for r in records)
    assert not _leaks(records, auth_password.encode())
    assert not _leaks(records, auth_token.encode())


async def test_a_completed_round_and_a_close_are_logged_at_info(
    etcd_endpoints: str, etcd_key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The round's coordinator logs its completion; close() logs that it closed."""
    caplog.set_level(logging.DEBUG, logger="rdzv")
    async with rdzv.connect(etcd_endpoints) as connection:
        nodes = [
            rdzv.AsyncRendezvous(
                connection, "job", min_nodes=2, max_nodes=2, key_prefix=etcd_key_prefix
            )
            for _ in range(2)
        ]
        async with anyio.create_task_group() as joining:
            for node in nodes:
                joining.start_soon(node.join)
        await nodes[0].close()
        for node in nodes:
            await node.leave()
    rounds = [r for r in _records(caplog) if r.name == "rdzv.rendezvous"]
    [completed] = [r for r in rounds if "completed" in r.getMessage()]
    assert completed.levelno == logging.INFO
    assert completed.getMessage() == "round 1 completed with 2 members"
    assert _field(completed, "rdzv_key").endswith("/job/round/1/c/done")
    assert [r.levelno for r in rounds if "closed" in r.getMessage()] == [logging.INFO]
    assert len([r for r in rounds if r.getMessage().startswith("joined round 1")]) == 2
