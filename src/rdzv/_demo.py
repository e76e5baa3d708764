"""The demo: N asyncio agents rendezvous through `AsyncEtcdBackend`.

Each agent appends its name to a shared participant list with compare-and-swap, then waits,
through `watch`, until the list holds all N names. Its rank is its position in the list.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import anyio
import anyio.abc

from rdzv._backend import AsyncEtcdBackend
from rdzv._errors import RendezvousError
from rdzv._etcd import connect


@dataclasses.dataclass
class DemoResult:
    """What a demo rendezvous produced."""

    ranks: dict[str, int]
    conflicts: int
    seconds: float


@dataclasses.dataclass
class _Progress:
    joined: int = 0
    conflicts: int = 0


async def _agent(
    name: str,
    nodes: int,
    endpoints: str,
    run_id: str,
    key_prefix: str,
    read_timeout: float,
    progress: _Progress,
) -> int:
    async with connect(endpoints, read_timeout=read_timeout) as connection:
        backend = AsyncEtcdBackend(connection, run_id, key_prefix=key_prefix)
        current = await backend.get_state()
        state, token = current if current is not None else (b"[]", None)
        participants: list[str] = json.loads(state)
        while name not in participants:
            if len(participants) >= nodes:
                raise RuntimeError(f"{name} arrived after the rendezvous was full.")
            result = await backend.set_state(json.dumps([*participants, name]).encode(), token)
            if result is None:  # the state vanished under us (it expired): start over
                participants, token = [], None
                continue
            state, token, written = result
            participants = json.loads(state)
            if written:
                progress.joined += 1
            else:
                progress.conflicts += 1
        if len(participants) < nodes:
            async for changed, _ in backend.watch(token):
                if changed is None:
                    raise RuntimeError(f"The rendezvous state of {run_id!r} disappeared.")
                participants = json.loads(changed)
                if len(participants) >= nodes:
                    break
        return participants.index(name)


async def run_demo(
    nodes: int,
    endpoints: str,
    *,
    run_id: str,
    key_prefix: str,
    timeout: float,
    read_timeout: float = 10,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> DemoResult:
    """Run `nodes` agents to one rendezvous.

    Raises `TimeoutError` if it takes over `timeout` seconds, and the first agent's
    `RendezvousError` if one fails (the others are then cancelled).
    """
    progress = _Progress()
    ranks: dict[str, int] = {}
    failures: list[RendezvousError] = []
    started = time.perf_counter()

    async def agent(name: str, joining: anyio.abc.TaskGroup) -> None:
        try:
            ranks[name] = await _agent(
                name, nodes, endpoints, run_id, key_prefix, read_timeout, progress
            )
        except RendezvousError as error:
            # One failure is enough to report; a task group would wrap them all in a group.
            failures.append(error)
            joining.cancel_scope.cancel()

    async def report() -> None:
        while True:
            if on_progress is not None:
                on_progress(progress.joined, progress.conflicts, time.perf_counter() - started)
            await anyio.sleep(0.05)

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as agents:
            agents.start_soon(report)
            async with anyio.create_task_group() as joining:
                for index in range(nodes):
                    joining.start_soon(agent, f"node-{index}", joining)
            agents.cancel_scope.cancel()
    if failures:
        raise failures[0]
    seconds = time.perf_counter() - started
    if on_progress is not None:
        on_progress(progress.joined, progress.conflicts, seconds)
    return DemoResult(ranks=ranks, conflicts=progress.conflicts, seconds=seconds)
