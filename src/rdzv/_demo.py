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

from rdzv._backend import AsyncEtcdBackend
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
    progress: _Progress,
) -> int:
    async with connect(endpoints, read_timeout=30) as connection:
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
    on_progress: Callable[[int, int, float], None] | None = None,
) -> DemoResult:
    """Run `nodes` agents to one rendezvous; raise `TimeoutError` if it takes over `timeout`."""
    progress = _Progress()
    ranks: dict[str, int] = {}
    started = time.perf_counter()

    async def agent(name: str) -> None:
        ranks[name] = await _agent(name, nodes, endpoints, run_id, key_prefix, progress)

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
                    joining.start_soon(agent, f"node-{index}")
            agents.cancel_scope.cancel()
    seconds = time.perf_counter() - started
    if on_progress is not None:
        on_progress(progress.joined, progress.conflicts, seconds)
    return DemoResult(ranks=ranks, conflicts=progress.conflicts, seconds=seconds)
