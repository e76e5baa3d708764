"""Chaos: concurrent writers on a 3-member cluster whose members are killed and frozen at random.

Writers run `set_state` (compare-and-swap on a log), and the store's `add`, `append` and
`compare_set`, while a fault task kills, restarts, pauses and resumes one member at a time.
Every call's outcome is recorded as acknowledged, refused (not written: a lost
compare-and-swap, or an error raised before anything could land) or unknown
(`RendezvousOutcomeUnknownError`). At the end etcd must hold every acknowledged write exactly
once, no refused one, and each unknown one at most once: nothing lost, nothing misreported.

`RDZV_CHAOS_SECONDS` sets how long the faults go on (20 s by default; the figures in
docs/reliability.md come from longer runs). `pytest -s` prints the tally.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import time
from typing import Any

import anyio
import pytest

import rdzv
from rdzv.testing import EtcdCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Tally = collections.Counter[str]

SECONDS = float(os.environ.get("RDZV_CHAOS_SECONDS", "20"))
WORKERS = 3
READ_TIMEOUT = 6
# Calls that fail because etcd is unreachable: neither written nor unknown.
UNREACHABLE = (rdzv.RendezvousConnectionError, rdzv.StoreTimeoutError)


@dataclasses.dataclass
class Ledger:
    """What the callers were told, per write id."""

    acked: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)

    def check(self, found: list[str], what: str, tally: Tally) -> None:
        """`found` (ids in etcd) holds every acknowledged id once, no refused one."""
        counts = collections.Counter(found)
        tally[f"{what}: acknowledged"] += len(self.acked)
        tally[f"{what}: refused"] += len(self.refused)
        tally[f"{what}: unknown"] += len(self.unknown)
        lost = [entry for entry in self.acked if counts[entry] != 1]
        misreported = [entry for entry in self.refused if counts[entry]]
        doubled = [entry for entry in self.unknown if counts[entry] > 1]
        foreign = set(counts) - {*self.acked, *self.refused, *self.unknown}
        tally[f"{what}: lost or misreported"] += len(lost) + len(misreported) + len(doubled)
        assert not lost, f"{what}: acknowledged writes lost or doubled: {lost}"
        assert not misreported, f"{what}: writes reported as not written are in etcd: {misreported}"
        assert not doubled, f"{what}: writes applied twice: {doubled}"
        assert not foreign, f"{what}: etcd holds writes nobody made: {foreign}"


@dataclasses.dataclass
class Counter:
    """What `add` callers were told."""

    values: list[int] = dataclasses.field(default_factory=list)
    refused: int = 0
    unknown: int = 0


async def _set_state_writer(
    backend: rdzv.AsyncEtcdBackend, name: str, ledger: Ledger, stop: anyio.Event
) -> None:
    """Append its own ids to a JSON log in the state, by compare-and-swap."""

    async def write(entry: str) -> bool:
        current = await backend.get_state()
        entries, token = ([], None) if current is None else (json.loads(current[0]), current[1])
        result = await backend.set_state(json.dumps([*entries, entry]).encode(), token)
        return result is not None and result[2]

    for number in range(1_000_000):
        if stop.is_set():
            return
        entry = f"{name}-{number}"
        try:
            written = await write(entry)
        except rdzv.RendezvousOutcomeUnknownError:
            ledger.unknown.append(entry)
        except UNREACHABLE:
            ledger.refused.append(entry)
        else:
            (ledger.acked if written else ledger.refused).append(entry)


async def _adder(store: rdzv.AsyncEtcdStore, counter: Counter, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            counter.values.append(await store.add("counter", 1))
        except rdzv.RendezvousOutcomeUnknownError:
            counter.unknown += 1
        except UNREACHABLE:
            counter.refused += 1


async def _appender(
    store: rdzv.AsyncEtcdStore, name: str, ledger: Ledger, stop: anyio.Event
) -> None:
    for number in range(1_000_000):
        if stop.is_set():
            return
        entry = f"{name}-{number}"
        try:
            await store.append("log", f"{entry};".encode())
        except rdzv.RendezvousOutcomeUnknownError:
            ledger.unknown.append(entry)
        except UNREACHABLE:
            ledger.refused.append(entry)
        else:
            ledger.acked.append(entry)


async def _swapper(
    store: rdzv.AsyncEtcdStore, name: str, ledger: Ledger, steps: list[int], stop: anyio.Event
) -> None:
    """Move the value "n:id" to "n+1:own id" with compare_set."""
    for number in range(1_000_000):
        if stop.is_set():
            return
        entry = f"{name}-{number}"
        try:
            current = await store.get("swapped", timeout=READ_TIMEOUT)
            step = int(current.split(b":")[0]) + 1
            desired = f"{step}:{entry}".encode()
            swapped = await store.compare_set("swapped", current, desired) == desired
        except rdzv.RendezvousOutcomeUnknownError:
            ledger.unknown.append(entry)
        except UNREACHABLE:
            ledger.refused.append(entry)
        else:
            (ledger.acked if swapped else ledger.refused).append(entry)
            if swapped:
                steps.append(step)


async def _faults(cluster: EtcdCluster, stop: anyio.Event, tally: Tally) -> None:
    """Kill and restart, or pause and resume, one random member every few seconds."""
    chooser = random.Random()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        await anyio.sleep(chooser.uniform(1.0, 2.5))
        member = chooser.choice(cluster.members)
        if chooser.random() < 0.5:
            await anyio.to_thread.run_sync(member.kill)
            tally["faults: member killed"] += 1
            await anyio.sleep(chooser.uniform(0.5, 2.0))
            await anyio.to_thread.run_sync(member.restart)
        else:
            await anyio.to_thread.run_sync(member.pause)
            tally["faults: member frozen"] += 1
            await anyio.sleep(chooser.uniform(1.0, 3.0))
            await anyio.to_thread.run_sync(member.resume)
    stop.set()


def _count_resolutions(monkeypatch: pytest.MonkeyPatch, tally: Tally) -> None:
    """Count, for the tally, how often a lost answer had to be resolved."""
    for owner, name in (
        (rdzv.AsyncEtcdBackend, "_resolve_unknown_outcome"),
        (rdzv.AsyncEtcdStore, "_lost_write_landed"),
        (rdzv.AsyncEtcdStore, "_landed_since"),
    ):
        original = getattr(owner, name)

        def counted(*args: Any, __original: Any = original, __name: str = name) -> Any:
            tally[f"lost answers resolved: {__name.strip('_')}"] += 1
            return __original(*args)

        monkeypatch.setattr(owner, name, counted)


async def test_chaos_loses_and_misreports_nothing(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, tally: Tally, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under random member kills and freezes, every write is reported as it happened."""
    _count_resolutions(monkeypatch, tally)
    endpoints = [member.endpoint for member in etcd_cluster.members]
    orders = [",".join(endpoints[i:] + endpoints[:i]) for i in range(len(endpoints))]
    store_prefix = f"{etcd_key_prefix}/store/"
    states, logs, swaps, counter = Ledger(), Ledger(), Ledger(), Counter()
    steps: list[int] = []
    async with rdzv.connect(orders[0], read_timeout=READ_TIMEOUT) as setup:
        await rdzv.AsyncEtcdStore(setup, prefix=store_prefix).set("swapped", b"0:start")
    stop = anyio.Event()
    connections = [rdzv.connect(order, read_timeout=READ_TIMEOUT) for order in orders]
    try:
        for connection in connections:
            await connection.open()
        with anyio.fail_after(SECONDS + 120):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_faults, etcd_cluster, stop, tally)
                for index in range(WORKERS):
                    connection = connections[index % len(connections)]
                    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
                    store = rdzv.AsyncEtcdStore(connection, prefix=store_prefix)
                    tasks.start_soon(_set_state_writer, backend, f"state{index}", states, stop)
                    tasks.start_soon(_adder, store, counter, stop)
                    tasks.start_soon(_appender, store, f"append{index}", logs, stop)
                    tasks.start_soon(_swapper, store, f"swap{index}", swaps, steps, stop)
    finally:
        for connection in connections:
            await connection.aclose()
    for member in etcd_cluster.members:
        if member.is_paused:
            member.resume()
    await anyio.to_thread.run_sync(etcd_cluster.wait_ready)

    async with rdzv.connect(orders[0], read_timeout=30) as reader:
        state = await rdzv.AsyncEtcdBackend(reader, "job", key_prefix=etcd_key_prefix).get_state()
        store = rdzv.AsyncEtcdStore(reader, prefix=store_prefix)
        count = int(await store.get("counter", timeout=30))
        log = (await store.get("log", timeout=30)).decode()
        swapped = (await store.get("swapped", timeout=30)).decode()

    states.check([] if state is None else json.loads(state[0]), "set_state", tally)
    logs.check([entry for entry in log.split(";") if entry], "append", tally)
    _check_counter(counter, count, tally)
    _check_swaps(swaps, steps, swapped, tally)
    tally["operations"] += (
        sum(
            len(ledger.acked) + len(ledger.refused) + len(ledger.unknown)
            for ledger in (states, logs, swaps)
        )
        + len(counter.values)
        + counter.refused
        + counter.unknown
    )


def _check_counter(counter: Counter, count: int, tally: Tally) -> None:
    """Every acknowledged add is in the count once; each returned a value of its own."""
    tally["add: acknowledged"] += len(counter.values)
    tally["add: refused"] += counter.refused
    tally["add: unknown"] += counter.unknown
    assert len(set(counter.values)) == len(counter.values), "two adds returned the same value"
    assert len(counter.values) <= count <= len(counter.values) + counter.unknown
    assert max(counter.values, default=0) <= count


def _check_swaps(ledger: Ledger, steps: list[int], swapped: str, tally: Tally) -> None:
    """Each step of the compare_set chain was taken by one swap; acknowledged swaps all count."""
    assert len(set(steps)) == len(steps), "two acknowledged swaps took the same step"
    tally["compare_set: acknowledged"] += len(ledger.acked)
    tally["compare_set: refused"] += len(ledger.refused)
    tally["compare_set: unknown"] += len(ledger.unknown)
    final_step = int(swapped.split(":")[0])
    assert len(ledger.acked) <= final_step <= len(ledger.acked) + len(ledger.unknown)
