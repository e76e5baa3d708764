"""Faults on real etcd: a killed leader, a frozen member, restarts, a total outage.

Every test runs on a fresh 3-member cluster (`etcd_cluster`) or a private single server, and
checks the acknowledged history: nothing acknowledged may be lost. Each test prints its figures
when it ends (`pytest -s` shows them); docs/reliability.md quotes them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import rdzv
from rdzv.testing import EtcdCluster, EtcdServer
from support import present

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Tally = collections.Counter[str]

READ_TIMEOUT = 10
# Generous slack on time bounds, for slow or busy machines.
SLACK = 2.0
WAIT = 60


async def _leader(cluster: EtcdCluster) -> EtcdServer:
    return await anyio.to_thread.run_sync(cluster.leader)


def _follower(cluster: EtcdCluster, leader: EtcdServer) -> EtcdServer:
    return next(member for member in cluster.members if member is not leader)


def _endpoints_from(cluster: EtcdCluster, first: EtcdServer) -> str:
    """The cluster's endpoints with `first` first: the member a new connection uses."""
    others = [member for member in cluster.members if member is not first]
    return ",".join(member.endpoint for member in [first, *others])


def _dump(entries: list[int]) -> bytes:
    return json.dumps(entries).encode()


@dataclasses.dataclass
class Stream:
    """A lone writer appending 0, 1, 2, ... to a JSON list with compare-and-swap.

    `acked` holds `(token, sent, acknowledged)` for every acknowledged write, with the monotonic
    times the request was sent and answered.
    """

    backend: rdzv.AsyncEtcdBackend
    acked: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    initial: int = 0
    progress: anyio.Event = dataclasses.field(default_factory=anyio.Event)

    async def run(self, stop: anyio.Event) -> None:
        """Write until `stop` is set; any error or lost compare-and-swap fails the test."""
        result = await self.backend.set_state(_dump([]))
        assert result is not None
        state, token, _ = result
        self.initial = token
        while not stop.is_set():
            proposal = _dump([*json.loads(state), len(self.acked)])
            sent = time.monotonic()
            result = await self.backend.set_state(proposal, token)
            assert result is not None
            state, token, written = result
            assert written, "a lone writer lost a compare-and-swap"
            assert state == proposal
            self.acked.append((token, sent, time.monotonic()))
            self.progress.set()
            self.progress = anyio.Event()

    async def wait_for(self, count: int) -> None:
        """Wait until `count` writes are acknowledged."""
        while len(self.acked) < count:
            await self.progress.wait()

    def resumed_after(self, moment: float) -> float:
        """Seconds from `moment` until the first write sent after it was acknowledged."""
        return min(acked for _, sent, acked in self.acked if sent >= moment) - moment

    def check(self, final: tuple[bytes, int] | None, tally: Tally) -> None:
        """The final state holds every acknowledged write, once, in order."""
        tally["acknowledged writes"] += len(self.acked)
        tally["operations"] += len(self.acked) + 2
        assert final is not None
        entries = json.loads(final[0])
        lost = [n for n in range(len(self.acked)) if entries.count(n) != 1]
        tally["acknowledged writes lost"] += len(lost)
        assert not lost, f"acknowledged writes lost: {lost}"
        assert entries == list(range(len(self.acked)))
        tokens = [token for token, _, _ in self.acked]
        assert tokens == sorted(set(tokens))
        assert tokens[0] > self.initial
        assert final[1] == tokens[-1]


@pytest.mark.parametrize("connected_to", ["leader", "follower"])
async def test_writes_resume_after_the_leader_is_killed(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, connected_to: str, tally: Tally
) -> None:
    """Killing the leader under a stream of writes delays them; no acknowledged write is lost."""
    leader = await _leader(etcd_cluster)
    first = leader if connected_to == "leader" else _follower(etcd_cluster, leader)
    endpoints = _endpoints_from(etcd_cluster, first)
    async with rdzv.connect(endpoints, read_timeout=READ_TIMEOUT) as connection:
        stream = Stream(rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix))
        stop = anyio.Event()
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(stream.run, stop)
                await stream.wait_for(20)
                await anyio.to_thread.run_sync(leader.kill)
                killed_at = time.monotonic()
                tally["faults: leader killed"] += 1
                await stream.wait_for(len(stream.acked) + 20)
                stop.set()
        final = await stream.backend.get_state()
    stream.check(final, tally)
    resumed = stream.resumed_after(killed_at)
    tally["resumed after ms"] = round(resumed * 1000)
    assert resumed < READ_TIMEOUT
    new_leader = await _leader(etcd_cluster)
    assert new_leader is not leader


@pytest.mark.parametrize("role", ["leader", "follower"])
async def test_every_call_finishes_in_time_while_the_connected_member_is_frozen(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, role: str, tally: Tally
) -> None:
    """With the member in use paused (SIGSTOP), each call succeeds within its read timeout."""
    read_timeout = 6
    leader = await _leader(etcd_cluster)
    frozen = leader if role == "leader" else _follower(etcd_cluster, leader)
    endpoints = _endpoints_from(etcd_cluster, frozen)
    async with rdzv.connect(endpoints, read_timeout=read_timeout) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        _, token, _ = present(await backend.set_state(b"0"))
        await anyio.to_thread.run_sync(frozen.pause)
        tally["faults: member paused"] += 1
        durations: list[float] = []

        async def timed(call: Callable[[], Awaitable[Any]]) -> Any:
            started = time.monotonic()
            try:
                return await call()
            finally:
                durations.append(time.monotonic() - started)

        try:
            # The first call is a compare-and-swap sent to the frozen member: its answer never
            # comes, so the write's outcome is unknown until rdzv reads it from another member.
            for n in range(1, 6):
                result = await timed(functools.partial(backend.set_state, str(n).encode(), token))
                assert result is not None
                state, token, written = result
                assert written
                assert await timed(lambda: backend.get_state()) == (state, token)
                assert await timed(lambda: backend.set_state(b"lost race", None)) == (
                    state,
                    token,
                    False,
                )
            assert frozen.is_paused
        finally:
            await anyio.to_thread.run_sync(frozen.resume)
        # Whatever the frozen member still had queued cannot overwrite the state once it wakes.
        await anyio.sleep(1)
        assert await backend.get_state() == (state, token)
    tally["operations"] += len(durations) + 2
    tally["acknowledged writes"] += 6
    tally["slowest call ms"] = round(max(durations) * 1000)
    assert max(durations) < read_timeout + SLACK


@pytest.mark.parametrize("how", ["graceful", "crash"])
async def test_state_survives_a_restart_and_the_same_connection_recovers(
    etcd_key_prefix: str, how: str, tally: Tally
) -> None:
    """After a restart (or a SIGKILL and a restart), every acknowledged write is still there."""
    with EtcdServer() as server:
        async with rdzv.connect(server.endpoint, read_timeout=READ_TIMEOUT) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
            _, first, _ = present(await backend.set_state(b"0"))
            acked = []
            token = first
            for n in range(1, 21):
                _, token, written = present(await backend.set_state(str(n).encode(), token))
                assert written
                acked.append((str(n).encode(), token))
            if how == "crash":
                await anyio.to_thread.run_sync(server.kill)
            await anyio.to_thread.run_sync(server.restart)
            tally[f"faults: {how} restart"] += 1
            started = time.monotonic()
            assert await backend.get_state() == acked[-1]
            tally["first call after restart ms"] = round((time.monotonic() - started) * 1000)
            history = []
            with anyio.fail_after(READ_TIMEOUT):
                async for change in backend.watch(first):
                    history.append(change)
                    if len(history) == len(acked):
                        break
            assert history == acked
            result = await backend.set_state(b"after", token)
            assert result is not None
            assert result[2]
    tally["operations"] += len(acked) + 4
    tally["acknowledged writes"] += len(acked) + 2
    tally["acknowledged writes lost"] += len(acked) - len(history)


async def test_total_outage_fails_in_time_then_the_same_connection_recovers(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, tally: Tally
) -> None:
    """With every member down, calls raise RendezvousConnectionError in time; then recover."""
    read_timeout = 3
    async with rdzv.connect(etcd_cluster.endpoints, read_timeout=read_timeout) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix)
        _, token, _ = present(await backend.set_state(b"before"))
        for member in etcd_cluster.members:
            await anyio.to_thread.run_sync(member.kill)
        tally["faults: members killed"] += len(etcd_cluster.members)
        slowest = 0.0
        for call in (
            lambda: backend.get_state(),
            lambda: backend.set_state(b"during", token),
            lambda: backend.set_state(b"during"),
        ):
            started = time.monotonic()
            with pytest.raises(rdzv.RendezvousConnectionError, match="connection to etcd has"):
                await call()
            slowest = max(slowest, time.monotonic() - started)
        tally["slowest failing call ms"] = round(slowest * 1000)
        assert slowest < read_timeout + SLACK

        for member in etcd_cluster.members:
            await anyio.to_thread.run_sync(functools.partial(member.restart, wait=False))
        await anyio.to_thread.run_sync(etcd_cluster.wait_ready, 30)
        started = time.monotonic()
        assert await backend.get_state() == (b"before", token)
        tally["first call after recovery ms"] = round((time.monotonic() - started) * 1000)
        result = await backend.set_state(b"after", token)
        assert result is not None
        assert result[2]
    tally["operations"] += 6
    tally["acknowledged writes"] += 2


@pytest.mark.parametrize("watcher_on", ["leader", "follower"])
async def test_watch_misses_no_change_across_a_leader_change(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, watcher_on: str, tally: Tally
) -> None:
    """A watcher sees every acknowledged write, in order, while the leader is killed midway."""
    writes = 40
    leader = await _leader(etcd_cluster)
    first = leader if watcher_on == "leader" else _follower(etcd_cluster, leader)
    async with (
        rdzv.connect(_endpoints_from(etcd_cluster, first), read_timeout=READ_TIMEOUT) as watching,
        rdzv.connect(etcd_cluster.endpoints, read_timeout=READ_TIMEOUT) as writing,
    ):
        watcher = rdzv.AsyncEtcdBackend(watching, "job", key_prefix=etcd_key_prefix)
        writer = rdzv.AsyncEtcdBackend(writing, "job", key_prefix=etcd_key_prefix)
        _, token, _ = present(await writer.set_state(b"0"))
        seen: list[tuple[bytes | None, int]] = []
        acked: list[tuple[bytes, int]] = []
        halfway = anyio.Event()

        async def watch(since: int) -> None:
            async for change in watcher.watch(since):
                seen.append(change)
                if len(seen) == writes // 2:
                    halfway.set()
                if len(seen) == writes:
                    return

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch, token)
                for n in range(1, writes + 1):
                    if n == writes // 2 + 1:
                        # The watch stream is live (it delivered every change so far): break it.
                        await halfway.wait()
                        await anyio.to_thread.run_sync(leader.kill)
                        tally["faults: leader killed"] += 1
                    state = str(n).encode()
                    _, token, written = present(await writer.set_state(state, token))
                    assert written
                    acked.append((state, token))
    tally["operations"] += writes + 2
    tally["acknowledged writes"] += writes
    tally["changes missed by the watcher"] += len(set(acked) - set(seen))
    assert seen == acked


async def test_watch_on_a_frozen_member_moves_on_without_missing_a_change(
    etcd_cluster: EtcdCluster, etcd_key_prefix: str, tally: Tally
) -> None:
    """A watch whose member is paused notices (keepalive), moves on, and misses no change."""
    # docs/semantics.md: a keepalive ping every 10 s, 5 s to answer; then a reconnect.
    bound = 10 + 5 + READ_TIMEOUT + SLACK
    leader = await _leader(etcd_cluster)
    frozen = _follower(etcd_cluster, leader)
    writes = 10
    async with (
        rdzv.connect(_endpoints_from(etcd_cluster, frozen), read_timeout=READ_TIMEOUT) as watching,
        rdzv.connect(_endpoints_from(etcd_cluster, leader), read_timeout=READ_TIMEOUT) as writing,
    ):
        watcher = rdzv.AsyncEtcdBackend(watching, "job", key_prefix=etcd_key_prefix)
        writer = rdzv.AsyncEtcdBackend(writing, "job", key_prefix=etcd_key_prefix)
        _, token, _ = present(await writer.set_state(b"0"))
        seen: list[tuple[bytes | None, int]] = []
        acked: list[tuple[bytes, int]] = []
        first, done = anyio.Event(), anyio.Event()

        async def watch(since: int) -> None:
            async for change in watcher.watch(since):
                seen.append(change)
                first.set()
                if len(seen) == writes:
                    done.set()
                    return

        paused_at = caught_up_at = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch, token)
                _, token, _ = present(await writer.set_state(b"1", token))
                acked.append((b"1", token))
                with anyio.fail_after(READ_TIMEOUT):
                    await first.wait()
                await anyio.to_thread.run_sync(frozen.pause)
                paused_at = time.monotonic()
                tally["faults: member paused"] += 1
                for n in range(2, writes + 1):
                    state = str(n).encode()
                    _, token, written = present(await writer.set_state(state, token))
                    assert written
                    acked.append((state, token))
                with anyio.move_on_after(bound - (time.monotonic() - paused_at)):
                    await done.wait()
                    caught_up_at = time.monotonic()
                tasks.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(frozen.resume)
    tally["operations"] += writes + 1
    tally["acknowledged writes"] += writes
    tally["changes missed by the watcher"] += len(set(acked) - set(seen))
    assert paused_at is not None
    assert caught_up_at is not None, (
        f"{bound:.0f} s after its member was paused, the watch had delivered {len(seen)} of "
        f"{len(acked)} changes"
    )
    tally["watch caught up after ms"] = round((caught_up_at - paused_at) * 1000)
    assert seen == acked
