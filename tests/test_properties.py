"""Property tests against the real etcd: a model of the contract, corruption fuzzing, races.

Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable: "ci" (the default)
keeps this file to a few minutes; "fuzz" (`nox -s fuzz`) runs many more examples. Each test
prints its figures after it ends (`pytest -s` shows them); docs/reliability.md quotes them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import queue
import threading
import time
import uuid
from typing import Any

import aetcd
import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import rdzv
from support import RawEtcd, present, torch_backend_of

Tally = collections.Counter[str]

# Hundreds of examples against a real etcd, spawned and forked writers: not for the fast loop.
pytestmark = pytest.mark.slow

settings.register_profile(
    "ci",
    deadline=None,
    database=None,
    print_blob=True,
    stateful_step_count=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("fuzz", settings.get_profile("ci"), stateful_step_count=60)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# Examples per test and profile, and the largest number of rounds per concurrent writer.
_EXAMPLES = {
    "ci": {
        "model": 12,
        "corruption": 150,
        "facade": 60,
        "handler": 20,
        "recovery": 60,
        "tasks": 20,
        "threads": 15,
        "processes": 4,
        "rounds": 6,
    },
    "fuzz": {
        "model": 150,
        "corruption": 2000,
        "facade": 500,
        "handler": 150,
        "recovery": 500,
        "tasks": 150,
        "threads": 100,
        "processes": 25,
        "rounds": 20,
    },
}
if PROFILE not in _EXAMPLES:
    raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(_EXAMPLES)}, not {PROFILE!r}.")
EXAMPLES = _EXAMPLES[PROFILE]


def _settings(test: str) -> settings:
    return settings(settings.get_profile(PROFILE), max_examples=EXAMPLES[test])


# The envelope header, per docs/format.md.
HEADER_SIZE = 24
READ_TIMEOUT = 10
# A generous bound on every wait, for slow or busy machines.
WAIT = 60


def _is_revision(token: object) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and token > 0


# --------------------------------------------------------------------------------------------
# 1. A model of the contract


_BACKENDS = 3
_SHORT_TTL = 1
_INVALID_TOKENS = ("1", "abc", True, False, 0, -1, 1.0, 2.5, b"1", (), object())
_states = st.binary(max_size=48)
_backend_index = st.integers(0, _BACKENDS - 1)
# What rdzv says of bytes that it did not write: a damaged envelope is a corrupt state, bytes
# without one are not an rdzv state at all (`RendezvousForeignStateError`).
_CORRUPT_OR_FOREIGN = r"The state object is (corrupt|not an rdzv state)"
# Bytes that rdzv did not write: anything, or a plausible header with a wrong body.
_foreign_values = st.one_of(
    st.binary(max_size=64), st.binary(max_size=64).map(lambda tail: b"RDZV\x01\x00\x00\x00" + tail)
)


class RendezvousModel(RuleBasedStateMachine):
    """Backends on separate connections share one run id; a small model predicts every reply.

    The model knows what the key holds: nothing, a state, or bytes rdzv did not write (corrupt),
    with its token (the key's mod revision) and whether it lives on a lease.
    """

    tokens = Bundle("tokens")

    def __init__(self, endpoints: str, key_prefix: str, raw: RawEtcd, tally: Tally) -> None:
        super().__init__()
        run_id = uuid.uuid4().hex
        self.raw = raw
        self.tally = tally
        self.backends: list[rdzv.EtcdBackend] = []
        for ttl in [60] * _BACKENDS + [_SHORT_TTL]:
            self.backends.append(
                rdzv.EtcdBackend(
                    endpoints, run_id, key_prefix=key_prefix, ttl=ttl, read_timeout=READ_TIMEOUT
                )
            )
        self.short_lived = self.backends.pop()
        self.key = self.backends[0].key.encode()
        self.kind = "absent"  # or "state", or "corrupt"
        self.state: bytes | None = None
        self.token: int | None = None
        self.leased = False
        self.highest = 0  # the highest revision this example has seen
        self.expiries = 0
        tally["examples"] += 1

    def teardown(self) -> None:
        """Close every facade and remove the key."""
        for backend in [*self.backends, self.short_lived]:
            backend.close()
        self.raw.delete(self.key)

    # ---------------------------------------------------------------------- the model

    def _now_holds(self, kind: str, state: bytes | None, token: int | None, leased: bool) -> None:
        if token is not None:
            assert token > self.highest, "a new revision must be above every earlier one"
            self.highest = token
        self.kind, self.state, self.token, self.leased = kind, state, token, leased

    def _set(self, backend: rdzv.EtcdBackend, state: bytes, token: object) -> int | None:
        """set_state, checked against the model; the new token if it wrote."""
        self.tally["operations"] += 1
        if token is None:
            writes = self.kind == "absent"
        else:
            writes = _is_revision(token) and self.kind != "absent" and token == self.token
        if not writes and self.kind == "corrupt":
            with pytest.raises(rdzv.RendezvousStateError, match=_CORRUPT_OR_FOREIGN) as caught:
                backend.set_state(state, token)
            assert caught.value.token == self.token
            self.tally["corrupt errors"] += 1
            return None
        result = backend.set_state(state, token)
        if not writes:
            expected = None if self.kind == "absent" else (self.state, self.token, False)
            assert result == expected
            self.tally["refused writes"] += 1
            return None
        assert result is not None
        new_state, new_token, written = result
        assert (new_state, written) == (state, True)
        if self.kind == "corrupt":
            self.tally["corrupt values overwritten with their token"] += 1
        self._now_holds("state", state, new_token, leased=True)
        self.tally["acknowledged writes"] += 1
        return new_token

    # ---------------------------------------------------------------------- rules

    @rule(target=tokens, i=_backend_index)
    def get_state(self, i: int) -> Any:
        """get_state returns the model's state and token, None, or raises for corrupt bytes."""
        self.tally["operations"] += 1
        if self.kind == "corrupt":
            with pytest.raises(rdzv.RendezvousStateError, match=_CORRUPT_OR_FOREIGN) as caught:
                self.backends[i].get_state()
            assert caught.value.token == self.token
            self.tally["corrupt errors"] += 1
            return multiple()
        result = self.backends[i].get_state()
        if self.kind == "absent":
            assert result is None
            return multiple()
        assert result == (self.state, self.token)
        return self.token

    @rule(target=tokens, i=_backend_index, state=_states)
    def set_state_with_current_token(self, i: int, state: bytes) -> Any:
        """The current token (None when there is no state) always writes, even over corruption."""
        token = self._set(self.backends[i], state, self.token)
        return multiple() if token is None else token

    @rule(target=tokens, i=_backend_index, state=_states)
    def set_state_with_none(self, i: int, state: bytes) -> Any:
        """A None token creates the state, and nothing else."""
        token = self._set(self.backends[i], state, None)
        return multiple() if token is None else token

    @rule(target=tokens, i=_backend_index, state=_states, token=tokens)
    def set_state_with_a_token_seen_before(self, i: int, state: bytes, token: int) -> Any:
        """A token seen earlier writes only if it is still current."""
        written = self._set(self.backends[i], state, token)
        return multiple() if written is None else written

    @rule(i=_backend_index, state=_states, token=st.integers(2**40, 2**62))
    def set_state_with_a_revision_not_reached(self, i: int, state: bytes, token: int) -> None:
        """A revision etcd has not reached yet never writes."""
        assert self._set(self.backends[i], state, token) is None

    @rule(i=_backend_index, state=_states, token=st.sampled_from(_INVALID_TOKENS))
    def set_state_with_an_invalid_token(self, i: int, state: bytes, token: object) -> None:
        """A token that is not a revision only reads."""
        assert self._set(self.backends[i], state, token) is None

    @rule(target=tokens, value=_foreign_values)
    def write_foreign_bytes(self, value: bytes) -> int:
        """Bytes written behind rdzv's back make the state corrupt."""
        self.tally["operations"] += 1
        self.tally["faults: foreign writes"] += 1
        revision = self.raw.put(self.key, value)
        self._now_holds("corrupt", None, revision, leased=False)
        return revision

    @precondition(lambda self: self.kind != "absent")
    @rule()
    def delete(self) -> None:
        """Deleting the key leaves no state."""
        self.tally["operations"] += 1
        self.tally["faults: deletes"] += 1
        revision = self.raw.delete(self.key)
        assert revision is not None
        self._now_holds("absent", None, None, leased=False)
        self.highest = max(self.highest, revision)

    @precondition(lambda self: self.leased)
    @rule()
    def revoke_the_lease(self) -> None:
        """Revoking the state's lease (what etcd does when it expires) removes the state."""
        self.tally["operations"] += 1
        self.tally["faults: lease revocations"] += 1
        stored = self.raw.get(self.key)
        assert stored is not None
        assert stored.lease != 0
        self.raw.revoke_lease(stored.lease)
        self._now_holds("absent", None, None, leased=False)

    @precondition(lambda self: self.expiries == 0)
    @rule(state=_states)
    def let_a_short_lived_state_expire(self, state: bytes) -> None:
        """A state written with ttl=1 and left alone expires between ttl and 2*ttl (+slack)."""
        self.expiries += 1
        sent = time.monotonic()
        assert self._set(self.short_lived, state, self.token) is not None
        deadline = sent + 2 * _SHORT_TTL + 3
        while self.backends[0].get_state() is not None:
            self.tally["operations"] += 1
            assert time.monotonic() < deadline, "the state outlived its lease"
            time.sleep(0.05)
        assert time.monotonic() - sent >= _SHORT_TTL
        self.tally["faults: real lease expiries"] += 1
        self._now_holds("absent", None, None, leased=False)

    @invariant()
    def etcd_holds_what_the_model_says(self) -> None:
        """The key exists exactly when the model says so, at the model's revision."""
        stored = self.raw.get(self.key)
        if self.kind == "absent":
            assert stored is None
        else:
            assert stored is not None
            assert stored.mod_revision == self.token
            assert (stored.lease != 0) == self.leased


def test_backends_follow_the_model(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd, tally: Tally
) -> None:
    """Interleaved reads, writes, raw writes, deletes and expiries match a simple model."""

    class Model(RendezvousModel):
        """The model on this test's etcd, key prefix and tally (Hypothesis wants a class)."""

        def __init__(self) -> None:
            super().__init__(etcd_endpoints, etcd_key_prefix, raw_etcd_sync, tally)

    run_state_machine_as_test(Model, settings=_settings("model"))


# --------------------------------------------------------------------------------------------
# 2. Corruption


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One way to damage a stored value."""

    kind: str
    index: int = 0
    mask: int = 0
    data: bytes = b""

    def apply(self, value: bytes) -> bytes:
        """The damaged value."""
        if self.kind == "truncate":
            return value[: self.index]
        if self.kind in ("flip a bit", "change a byte"):
            damaged = bytearray(value)
            damaged[self.index] ^= self.mask
            return bytes(damaged)
        if self.kind == "append":
            return value + self.data
        return self.data


@st.composite
def corrupted_states(draw: st.DrawFn) -> tuple[bytes, Corruption]:
    """A state, and a damage to apply to the value that stores it."""
    state = draw(st.binary(max_size=300))
    size = HEADER_SIZE + len(state)
    kind = draw(st.sampled_from(["truncate", "flip a bit", "change a byte", "append", "foreign"]))
    if kind == "truncate":
        return state, Corruption(kind, index=draw(st.integers(0, size - 1)))
    if kind == "flip a bit":
        index, bit = draw(st.integers(0, size - 1)), draw(st.integers(0, 7))
        return state, Corruption(kind, index=index, mask=1 << bit)
    if kind == "change a byte":
        index, mask = draw(st.integers(0, size - 1)), draw(st.integers(1, 255))
        return state, Corruption(kind, index=index, mask=mask)
    if kind == "append":
        return state, Corruption(kind, data=draw(st.binary(min_size=1, max_size=64)))
    return state, Corruption(kind, data=draw(_foreign_values | st.binary(max_size=400)))


async def _corrupt_async(
    backend: rdzv.AsyncEtcdBackend, raw: aetcd.Client, state: bytes, damage: Corruption
) -> tuple[int, int]:
    """Write `state`, then damage it raw; return the stale token and the corrupt revision."""
    _, stale, _ = present(await backend.set_state(state))
    stored = await raw.get(backend.key.encode())
    assert stored is not None
    assert len(stored.value) == HEADER_SIZE + len(state)
    put = await raw.put(backend.key.encode(), damage.apply(stored.value))
    return stale, int(put.header.revision)


def _corrupt_sync(
    backend: rdzv.EtcdBackend, raw: RawEtcd, state: bytes, damage: Corruption
) -> tuple[int, int]:
    """Write `state`, then damage it raw; return the stale token and the corrupt revision."""
    _, stale, _ = present(backend.set_state(state))
    stored = raw.get(backend.key.encode())
    assert stored is not None
    assert len(stored.value) == HEADER_SIZE + len(state)
    return stale, raw.put(backend.key.encode(), damage.apply(stored.value))


@pytest.mark.anyio
@_settings("corruption")
@given(case=corrupted_states())
async def test_async_core_never_returns_a_corrupt_value(
    case: tuple[bytes, Corruption],
    connection: rdzv.Connection,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
    tally: Tally,
) -> None:
    """Any damage makes get_state and set_state (None, stale or invalid token) raise."""
    state, damage = case
    backend = rdzv.AsyncEtcdBackend(connection, uuid.uuid4().hex, key_prefix=etcd_key_prefix)
    stale, corrupt = await _corrupt_async(backend, raw_etcd, state, damage)
    tally["examples"] += 1
    tally[f"damage: {damage.kind}"] += 1
    for call in (
        lambda: backend.get_state(),
        lambda: backend.set_state(b"new", None),
        lambda: backend.set_state(b"new", stale),
        lambda: backend.set_state(b"new", "not a token"),
    ):
        tally["operations"] += 1
        with pytest.raises(rdzv.RendezvousStateError, match=_CORRUPT_OR_FOREIGN) as caught:
            await call()
        assert caught.value.token == corrupt
        assert backend.key in str(caught.value)
    stored = await raw_etcd.get(backend.key.encode())
    assert stored is not None
    assert stored.mod_revision == corrupt  # nothing overwrote the corrupt value


@_settings("facade")
@given(case=corrupted_states())
def test_sync_facade_never_returns_a_corrupt_value(
    case: tuple[bytes, Corruption],
    etcd_endpoints: str,
    etcd_key_prefix: str,
    raw_etcd_sync: RawEtcd,
    tally: Tally,
) -> None:
    """Any damage makes the facade's get_state and set_state (None or stale token) raise."""
    state, damage = case
    with rdzv.EtcdBackend(
        etcd_endpoints, uuid.uuid4().hex, key_prefix=etcd_key_prefix, read_timeout=READ_TIMEOUT
    ) as backend:
        stale, corrupt = _corrupt_sync(backend, raw_etcd_sync, state, damage)
        tally["examples"] += 1
        tally[f"damage: {damage.kind}"] += 1
        with pytest.raises(rdzv.RendezvousStateError) as on_get:
            backend.get_state()
        with pytest.raises(rdzv.RendezvousStateError) as on_create:
            backend.set_state(b"new")
        with pytest.raises(rdzv.RendezvousStateError) as on_stale:
            backend.set_state(b"new", stale)
        tally["operations"] += 3
    assert on_get.value.token == on_create.value.token == on_stale.value.token == corrupt
    assert raw_etcd_sync.get(backend.key.encode()).mod_revision == corrupt


@_settings("handler")
@given(case=corrupted_states())
def test_torch_handler_raises_on_a_corrupt_state(
    case: tuple[bytes, Corruption],
    etcd_endpoints: str,
    etcd_key_prefix: str,
    raw_etcd_sync: RawEtcd,
    tally: Tally,
) -> None:
    """next_rendezvous() of the etcd-v3 handler raises torch's RendezvousStateError, promptly."""
    # Imported here: spawned writer processes import this module, and torch takes seconds.
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.api import RendezvousStateError

    import rdzv.torch

    state, damage = case
    run_id = uuid.uuid4().hex
    with rdzv.EtcdBackend(etcd_endpoints, run_id, key_prefix=etcd_key_prefix) as backend:
        _corrupt_sync(backend, raw_etcd_sync, state, damage)
    join_timeout = 10
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=etcd_endpoints,
        run_id=run_id,
        min_nodes=1,
        max_nodes=1,
        key_prefix=etcd_key_prefix,
        read_timeout=str(READ_TIMEOUT),
        join_timeout=str(join_timeout),
    )
    handler = rdzv.torch.create_handler(params)
    tally["examples"] += 1
    tally[f"damage: {damage.kind}"] += 1
    started = time.monotonic()
    try:
        with pytest.raises(RendezvousStateError, match=_CORRUPT_OR_FOREIGN) as caught:
            handler.next_rendezvous()
        tally["operations"] += 1
    finally:
        torch_backend_of(handler).facade.close()
    assert time.monotonic() - started < join_timeout
    assert isinstance(caught.value.__cause__, rdzv.RendezvousStateError)


@pytest.mark.anyio
@_settings("recovery")
@given(case=corrupted_states(), fresh=st.binary(max_size=64))
async def test_the_errors_token_overwrites_a_corrupt_value(
    case: tuple[bytes, Corruption],
    fresh: bytes,
    connection: rdzv.Connection,
    raw_etcd: aetcd.Client,
    etcd_key_prefix: str,
    tally: Tally,
) -> None:
    """set_state(new, error.token) replaces any corrupt value, and the run goes on."""
    state, damage = case
    backend = rdzv.AsyncEtcdBackend(connection, uuid.uuid4().hex, key_prefix=etcd_key_prefix)
    _, corrupt = await _corrupt_async(backend, raw_etcd, state, damage)
    tally["examples"] += 1
    with pytest.raises(rdzv.RendezvousStateError) as caught:
        await backend.get_state()
    assert caught.value.token == corrupt
    result = await backend.set_state(fresh, caught.value.token)
    assert result is not None
    _, token, written = result
    assert written
    assert token > corrupt
    assert await backend.get_state() == (fresh, token)
    tally["operations"] += 3
    tally["recovered"] += 1


# --------------------------------------------------------------------------------------------
# 3. Concurrent writers


_writers = st.integers(2, 8)
_rounds = st.integers(1, EXAMPLES["rounds"])
_delays = st.lists(st.floats(0, 0.01), min_size=1, max_size=8)


def _dump(entries: list[list[int]]) -> bytes:
    return json.dumps(entries).encode()


@dataclasses.dataclass
class Appender:
    """One writer's read-modify-write loop, without the I/O.

    Each successful compare-and-swap appends `[writer, seq]` to the JSON list in the state.
    `acks` holds `(writer, seq, token, state)` for every acknowledged write; `replies` holds
    every `(state, token)` the writer was given without writing: its first read and every
    conflict.
    """

    writer: int
    rounds: int
    delays: list[float]
    state: bytes
    token: int
    acks: list[tuple[int, int, int, bytes]] = dataclasses.field(default_factory=list)
    replies: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        self.replies.append((self.state, self.token))

    @property
    def done(self) -> bool:
        """Whether every round is written."""
        return len(self.acks) == self.rounds

    def delay(self) -> float:
        """The pause before the next attempt."""
        return self.delays[(self.writer + self.attempts) % len(self.delays)]

    def proposal(self) -> bytes:
        """The next state to try: the last one seen, plus this writer's next entry."""
        entries = json.loads(self.state)
        entries.append([self.writer, len(self.acks)])
        return _dump(entries)

    def record(self, proposal: bytes, result: tuple[bytes, int, bool] | None) -> None:
        """Take in set_state's reply."""
        self.attempts += 1
        assert result is not None, "the state vanished"
        self.state, self.token, written = result
        if written:
            assert self.state == proposal
            self.acks.append((self.writer, len(self.acks), self.token, self.state))
        else:
            self.replies.append((self.state, self.token))


async def _append_async(backend: rdzv.AsyncEtcdBackend, appender: Appender) -> None:
    while not appender.done:
        await anyio.sleep(appender.delay())
        proposal = appender.proposal()
        appender.record(proposal, await backend.set_state(proposal, appender.token))


def _append_sync(backend: rdzv.EtcdBackend, appender: Appender) -> None:
    while not appender.done:
        time.sleep(appender.delay())
        proposal = appender.proposal()
        appender.record(proposal, backend.set_state(proposal, appender.token))


def _check_history(
    initial: tuple[bytes, int],
    appenders: list[Appender],
    final: tuple[bytes, int] | None,
    tally: Tally,
) -> None:
    """Every acknowledged write is in the final state once, in token order; replies were real."""
    acks = [ack for appender in appenders for ack in appender.acks]
    tokens = [token for _, _, token, _ in acks]
    tally["examples"] += 1
    tally["writers"] += len(appenders)
    # Per writer its first read and every attempt; the first write and the final read.
    tally["operations"] += sum(appender.attempts + 1 for appender in appenders) + 2
    tally["acknowledged writes"] += len(acks)
    tally["conflicts"] += sum(len(appender.replies) - 1 for appender in appenders)
    assert final is not None
    final_entries = json.loads(final[0])
    lost = [(w, seq) for w, seq, _, _ in acks if final_entries.count([w, seq]) != 1]
    tally["acknowledged writes lost"] += len(lost)
    assert not lost, f"acknowledged writes missing from the final state: {lost}"
    assert len(set(tokens)) == len(tokens), "two acknowledged writes share a token"
    for appender in appenders:
        own = [token for _, _, token, _ in appender.acks]
        assert own == sorted(own)
        assert appender.done
    committed = sorted(acks, key=lambda ack: ack[2])
    assert final_entries == [[w, seq] for w, seq, _, _ in committed]
    assert final[1] == committed[-1][2]
    for position, (_, _, _, state) in enumerate(committed):
        assert json.loads(state) == final_entries[: position + 1]
    real = {(state, token) for _, _, token, state in committed} | {initial}
    for appender in appenders:
        for reply in appender.replies:
            assert reply in real, f"a reply carried a state never committed: {reply}"


@pytest.mark.anyio
@_settings("tasks")
@given(writers=_writers, rounds=_rounds, delays=_delays)
async def test_concurrent_tasks_lose_no_acknowledged_write(
    writers: int,
    rounds: int,
    delays: list[float],
    etcd_endpoints: str,
    etcd_key_prefix: str,
    tally: Tally,
) -> None:
    """Tasks on separate connections racing read-modify-write keep every acknowledged write."""
    run_id = uuid.uuid4().hex
    appenders: list[Appender] = []
    ready = 0
    go = anyio.Event()

    async def write(writer: int) -> None:
        nonlocal ready
        async with rdzv.connect(etcd_endpoints, read_timeout=READ_TIMEOUT) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, run_id, key_prefix=etcd_key_prefix)
            ready += 1
            if ready == writers:
                go.set()
            await go.wait()
            current = await backend.get_state()
            assert current is not None
            appender = Appender(writer, rounds, delays, *current)
            appenders.append(appender)
            await _append_async(backend, appender)

    async with rdzv.connect(etcd_endpoints, read_timeout=READ_TIMEOUT) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, run_id, key_prefix=etcd_key_prefix)
        _, token, _ = present(await backend.set_state(b"[]"))
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tasks:
                for writer in range(writers):
                    tasks.start_soon(write, writer)
        final = await backend.get_state()
    _check_history((b"[]", token), appenders, final, tally)


@_settings("threads")
@given(writers=_writers, rounds=_rounds, delays=_delays, shared=st.booleans())
def test_concurrent_threads_lose_no_acknowledged_write(
    writers: int,
    rounds: int,
    delays: list[float],
    shared: bool,
    etcd_endpoints: str,
    etcd_key_prefix: str,
    tally: Tally,
) -> None:
    """Threads on one shared facade, or on one facade each, keep every acknowledged write."""
    run_id = uuid.uuid4().hex
    facades = [
        rdzv.EtcdBackend(
            etcd_endpoints, run_id, key_prefix=etcd_key_prefix, read_timeout=READ_TIMEOUT
        )
        for _ in range(1 if shared else writers)
    ]
    appenders: list[Appender] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers, timeout=WAIT)

    def write(writer: int) -> None:
        backend = facades[0 if shared else writer]
        try:
            barrier.wait()
            current = backend.get_state()
            assert current is not None
            appender = Appender(writer, rounds, delays, *current)
            appenders.append(appender)
            _append_sync(backend, appender)
        except BaseException as error:
            errors.append(error)

    try:
        _, token, _ = present(facades[0].set_state(b"[]"))
        threads = [threading.Thread(target=write, args=(writer,)) for writer in range(writers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "a writer thread hangs"
        final = facades[0].get_state()
    finally:
        for facade in facades:
            facade.close()
    assert not errors, errors
    tally["shared facade" if shared else "facade per thread"] += 1
    _check_history((b"[]", token), appenders, final, tally)


def _write_in_process(
    endpoints: str,
    key_prefix: str,
    run_id: str,
    writer: int,
    rounds: int,
    delays: list[float],
    go: Any,
    results: Any,
) -> None:
    """A spawned writer: its own facade, then the read-modify-write loop; reports by queue."""
    try:
        with rdzv.EtcdBackend(
            endpoints, run_id, key_prefix=key_prefix, read_timeout=READ_TIMEOUT
        ) as backend:
            results.put(("ready", writer))
            if not go.wait(timeout=WAIT):
                raise TimeoutError("the parent never said go")
            current = backend.get_state()
            assert current is not None
            appender = Appender(writer, rounds, delays, *current)
            _append_sync(backend, appender)
        results.put(("done", appender))
    except BaseException as error:
        results.put(("error", f"writer {writer}: {error!r}"))


@_settings("processes")
@given(writers=_writers, rounds=_rounds, delays=_delays)
def test_concurrent_processes_lose_no_acknowledged_write(
    writers: int,
    rounds: int,
    delays: list[float],
    etcd_endpoints: str,
    etcd_key_prefix: str,
    tally: Tally,
) -> None:
    """Spawned processes, each with its own facade, racing read-modify-write keep every write."""
    run_id = uuid.uuid4().hex
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    results = context.Queue()
    processes = [
        context.Process(
            target=_write_in_process,
            args=(etcd_endpoints, etcd_key_prefix, run_id, w, rounds, delays, go, results),
        )
        for w in range(writers)
    ]
    with rdzv.EtcdBackend(
        etcd_endpoints, run_id, key_prefix=etcd_key_prefix, read_timeout=READ_TIMEOUT
    ) as backend:
        _, token, _ = present(backend.set_state(b"[]"))
        appenders: list[Appender] = []
        finished = False
        try:
            for process in processes:
                process.start()
            deadline = time.monotonic() + WAIT
            messages = []
            while len(appenders) < writers:
                try:
                    kind, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail(f"the writer processes did not finish within {WAIT} s")
                messages.append(kind)
                assert kind != "error", payload
                if kind == "ready" and messages.count("ready") == writers:
                    go.set()
                if kind == "done":
                    appenders.append(payload)
            final = backend.get_state()
            finished = True
        finally:
            for process in processes:
                process.join(timeout=10 if finished else 0)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)
            results.close()
    assert [process.exitcode for process in processes] == [0] * writers
    _check_history((b"[]", token), appenders, final, tally)
