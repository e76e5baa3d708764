"""Plain helpers that test modules import: `from support import closed_port, present, ...`.

Fixtures live in `conftest.py`; this module holds what is not a fixture: functions and classes
that a test calls with arguments of its own (a server it started, an endpoint list it built).
They are not in `conftest.py` because pytest loads that file itself and warns against importing
it; a module of its own has one stable name, the same for the tests, for mypy, and for the
worker processes that multiprocessing starts (a spawned worker imports the test module, and so
this one, by name). pytest's default import mode puts `tests/` on `sys.path`, which is what makes
`import support` work; `tests/` is not a package.

The raw etcd client is aetcd's `Client`, the library that rdzv itself wraps, used without rdzv's
envelope, retries or error translation: it reads and writes keys behind rdzv's back. The
`raw_etcd` and `raw_etcd_sync` fixtures give one for the session's etcd; `raw_client` and
`RawEtcd` give one for any endpoint. Nothing here deletes a prefix or wipes a keyspace: each
test writes under its own key prefix (the `etcd_key_prefix` fixture) or on a server of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

import aetcd
import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner, Result

import rdzv

if TYPE_CHECKING:
    # Not imported at run time: torch takes seconds to import, and spawned workers import this.
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousState

    from rdzv.torch import TorchEtcdBackend

T = TypeVar("T")

# Seconds that a raw client waits for etcd's answer.
RAW_TIMEOUT = 10

READER_PASSWORD = "reader-Passw0rd"
"""The password of the users "reader" and "nobody" of the `reader_server` fixture."""

# The timeout of torch stores (the `etcd_store` fixture): long enough never to fire on a slow
# machine, short enough that a broken wait fails the test.
STORE_WAIT = datetime.timedelta(seconds=20)


def closed_port() -> int:
    """A loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def present(value: T | None) -> T:
    """`value`, which must not be None: for results such as `set_state`'s, typed as optional."""
    assert value is not None
    return value


def torch_backend_of(handler: RendezvousHandler) -> TorchEtcdBackend:
    """The rdzv backend under a torch rendezvous handler: torch offers no public way to it."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        _BackendRendezvousStateHolder,
    )

    from rdzv.torch import TorchEtcdBackend

    assert isinstance(handler, DynamicRendezvousHandler)
    holder = handler._state_holder
    assert isinstance(holder, _BackendRendezvousStateHolder)
    backend = holder._backend
    assert isinstance(backend, TorchEtcdBackend)
    return backend


def torch_params(
    endpoint: str,
    prefix: str,
    /,
    *,
    backend: str = "etcd-v3",
    run_id: str = "job",
    nodes: int | str = 1,
    local_addr: str | None = None,
    **conf: object,
) -> RendezvousParameters:
    """torchrun's parameters for `run_id` at `endpoint`, under the test's own `prefix`.

    `nodes` is torchrun's --nnodes: 2, "2" or "1:2". `conf` is its --rdzv-conf, each value as
    its str; it overrides the defaults: key_prefix `{prefix}/rdzv`, store_prefix
    `{prefix}/store/` and read_timeout "10".
    """
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    low, _, high = str(nodes).partition(":")
    options = {
        "key_prefix": f"{prefix}/rdzv",
        "store_prefix": f"{prefix}/store/",
        "read_timeout": "10",
        **{name: str(value) for name, value in conf.items()},
    }
    return RendezvousParameters(
        backend, endpoint, run_id, int(low), int(high or low), local_addr, **options
    )


def torch_state(**fields: Any) -> _RendezvousState:
    """A torch state: round 2, complete, one participant and one waiting node, then `fields`."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        _NodeDesc,
        _RendezvousState,
    )

    state = _RendezvousState()
    state.round = 2
    state.complete = True
    participant, waiting = _NodeDesc("10.1.2.3", 4242, 0), _NodeDesc("10.1.2.4", 99, 1)
    state.participants[participant] = 0
    state.wait_list.add(waiting)
    now = datetime.datetime.now(datetime.timezone.utc)
    state.last_heartbeats[participant] = now - datetime.timedelta(seconds=3)
    state.last_heartbeats[waiting] = now
    for name, value in fields.items():
        setattr(state, name, value)
    return state


def run_cli(*arguments: str, env: dict[str, str | None] | None = None) -> Result:
    """Run `rdzv ARGUMENTS` in this process; `env` sets variables (None unsets one)."""
    from rdzv._cli import main

    return CliRunner().invoke(
        main, list(arguments), env=env, prog_name="rdzv", catch_exceptions=False
    )


def overwrite_state(endpoint: str, key_prefix: str, state: bytes, **options: Any) -> int:
    """Write `state` for run id "job" over whatever is there; its token (the write's revision).

    `options` go to `rdzv.EtcdBackend`.
    """
    with rdzv.EtcdBackend(endpoint, "job", key_prefix=key_prefix, **options) as backend:
        current = backend.get_state()
        result = backend.set_state(state, None if current is None else current[1])
    assert result is not None
    assert result[2]
    return int(result[1])


def new_threads_end(before: set[threading.Thread], timeout: float = 10) -> bool:
    """Whether every thread started since `before` ends within `timeout` seconds.

    Threads of earlier tests may end meanwhile; only new ones count.
    """
    deadline = time.monotonic() + timeout
    while set(threading.enumerate()) - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _client(endpoint: str) -> Any:
    """An aetcd client (not yet entered) for one `"host:port"` endpoint."""
    host, port = endpoint.rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=RAW_TIMEOUT)


@contextlib.asynccontextmanager
async def raw_client(endpoint: str) -> AsyncIterator[Any]:
    """An open aetcd client of the etcd at `endpoint` (`"host:port"`), closed on exit."""
    async with _client(endpoint) as client:
        yield client


class RawEtcd:
    """A raw client for synchronous tests: aetcd on an event-loop thread of its own.

    Use it as a context manager, or call `close()`. Revisions and TTLs come back as ints.
    """

    def __init__(self, endpoint: str) -> None:
        with contextlib.ExitStack() as stack:
            self._portal = stack.enter_context(start_blocking_portal("asyncio"))
            self._client = stack.enter_context(
                self._portal.wrap_async_context_manager(_client(endpoint))
            )
            self._exit = stack.pop_all()

    def close(self) -> None:
        """Close the client and stop its thread. Idempotent."""
        self._exit.close()

    def __enter__(self) -> RawEtcd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def get(self, key: str | bytes) -> Any:
        """aetcd's reply for `key` (`.value`, `.mod_revision`, `.lease`, ...), or None."""
        return self._portal.call(self._client.get, _bytes(key))

    def put(self, key: str | bytes, value: bytes) -> int:
        """Write `value` at `key`, on no lease; the revision of the write."""
        return int(self._portal.call(self._client.put, _bytes(key), value).header.revision)

    def delete(self, key: str | bytes) -> int | None:
        """Delete `key`; the revision of the delete, or None when there was no key."""
        deleted = self._portal.call(self._client.delete, _bytes(key))
        return None if deleted is None else int(deleted.header.revision)

    def under(self, prefix: str | bytes) -> list[Any]:
        """aetcd's key-values of every key under `prefix` (`.key`, `.value`, `.lease`, ...)."""
        return list(self._portal.call(self._client.get_prefix, _bytes(prefix)))

    def revoke_lease(self, lease: int) -> None:
        """Revoke a lease, deleting its keys at once."""
        self._portal.call(self._client.revoke_lease, lease)

    def granted_ttl(self, lease: int) -> int:
        """The TTL that etcd granted to `lease`, in seconds."""
        info = self._portal.call(functools.partial(self._client.get_lease_info, lease, keys=False))
        return int(info.grantedTTL)


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


class LoseAnswers:
    """Wraps `Connection.txn` of a real connection: after `skip` transactions, one loses its answer.

    Install it with `monkeypatch.setattr(connection, "txn", LoseAnswers(connection, ...))`.

    `landing` says when the lost transaction reaches etcd: "before" the error is raised,
    "never", or "late", just before the next transaction is sent.
    """

    def __init__(self, connection: rdzv.Connection, landing: str, *, skip: int = 0) -> None:
        self._txn = connection.txn
        self._landing = landing
        self._skip = skip
        self._lost = False
        self._late: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> object:
        """Run the transaction, or lose its answer."""
        for late_args, late_kwargs in self._late:
            await self._txn(*late_args, **late_kwargs)
        self._late.clear()
        if self._skip or self._lost:
            self._skip -= 1
            return await self._txn(*args, **kwargs)
        self._lost = True
        if self._landing == "before":
            await self._txn(*args, **kwargs)
        elif self._landing == "late":
            self._late.append((args, kwargs))
        raise rdzv.RendezvousOutcomeUnknownError("lost")


async def agreed_members(
    node: rdzv.AsyncRendezvous, memberships: list[rdzv.Membership]
) -> tuple[rdzv.Member, ...]:
    """The members of one round, read once, after asserting that its memberships agree.

    Agree: one decision, one world size, distinct ranks, and each rank indexes its own member.
    """
    assert len({m._decision for m in memberships}) == 1, "the members disagree about the round"
    members = await node.read_members(memberships[0])
    assert len(members) == memberships[0].world_size
    assert len({m.rank for m in memberships}) == len(memberships)
    for membership in memberships:
        assert members[membership.rank].id == membership.member_id
    return members


async def poll_until(check: Callable[[], Awaitable[bool]], *, interval: float = 0.01) -> None:
    """Return once `check()` is true; the caller bounds the wait (`anyio.fail_after`).

    For conditions that no event announces: keys that appear in etcd behind rdzv's back.
    """
    while not await check():  # noqa: ASYNC110 - nothing announces these conditions
        await anyio.sleep(interval)


class Lines:
    """The lines of a subprocess's output stream, read by a thread, to wait for with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stream = stream
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process exited: let the reader reach the end, then close the stream."""
        self._thread.join(timeout=10)
        self._stream.close()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next(self, timeout: float = 30) -> str:
        """The next line; fails the test if none comes within `timeout` seconds."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line within {timeout:g} s; seen so far: {self.seen}")
        if line is None:
            pytest.fail(f"the stream ended; seen: {self.seen}")
        self.seen.append(line)
        return line

    def until(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Read lines until one matches `pattern`; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.next(max(0.1, deadline - time.monotonic())))
            if match:
                return match

    async def next_async(self, timeout: float = 30) -> str:
        """`next`, awaited without holding the event loop."""
        return await anyio.to_thread.run_sync(self.next, timeout)

    async def until_async(self, pattern: str, timeout: float = 30) -> str:
        """`until`, awaited without holding the event loop; the whole line that matched."""
        match = await anyio.to_thread.run_sync(self.until, pattern, timeout)
        return match.string


class RdzvProcess:
    """`python -m rdzv ARGUMENTS` as a subprocess, with both output streams read by threads."""

    def __init__(self, *arguments: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "rdzv", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self.stdout, self.stderr = Lines(self.popen.stdout), Lines(self.popen.stderr)

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send `signum`; the exit code."""
        self.popen.send_signal(signum)
        return self.popen.wait(timeout=30)

    def close(self) -> None:
        """Kill the process if it still runs, and close its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for lines in (self.stdout, self.stderr):
            lines.close()


async def remaining_until(
    connection: rdzv.Connection, lease_id: int, done: Callable[[int], bool], *, wait: float = 5.0
) -> int:
    """Read the lease's remaining seconds until `done(remaining)`; fail after `wait` seconds."""
    with anyio.fail_after(wait):
        while True:
            remaining = await connection.lease_time_to_live(lease_id)
            if done(remaining):
                return remaining
            await anyio.sleep(0.02)


async def etcd_metric(endpoint: str, name: str) -> float:
    """The value of counter or gauge `name` (without labels) on etcd's /metrics, now."""

    def read() -> str:
        url = f"{endpoint}/metrics" if "://" in endpoint else f"http://{endpoint}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    text = await anyio.to_thread.run_sync(read)
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"etcd at {endpoint} has no metric {name}"
    return float(found[1])
