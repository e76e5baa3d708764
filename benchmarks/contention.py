"""Throughput under contention: K writers compare-and-swap one state as fast as they can.

Every writer reads the state once, then loops for a fixed window: `set_state(its next state,
the last token it saw)`. A win moves it to the token it wrote; a loss hands it the winner's
token in the same answer (two requests for etcd-v2: the refused write, then a read). Reported:
successful compare-and-swaps per second (all writers together), and conflicts per success.

Writers are tasks on one event loop for the async contenders and threads for the others, and
each writer has a backend, and so a connection, of its own, as each node of a job has: K = 256
means 256 gRPC channels (and, for rdzv sync, 256 facades with an event-loop thread each), 256
HTTP connections or 256 TCPStore clients. All of them run in this one Python process, so on a
small machine the client side's CPU time (and the GIL) is part of what is measured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from contenders import (
    ASYNC,
    SYNC,
    V2,
    AsyncBackend,
    AsyncContender,
    SyncBackend,
    Token,
    contenders,
)
from harness import describe, interleave, load_average, markdown_table, ratio
from servers import Servers, compact, requests_between, server_requests

WRITERS: Final = (1, 8, 64, 256)
QUICK_WRITERS: Final = (1, 8)
STATE_SIZE: Final = 1024

Outcome = dict[str, float]
Window = Callable[[], Awaitable[Outcome]]


@dataclasses.dataclass(frozen=True)
class Plan:
    seconds: float
    rounds: int


def plan(*, quick: bool) -> Plan:
    return Plan(seconds=0.3, rounds=1) if quick else Plan(seconds=2.0, rounds=4)


@dataclasses.dataclass
class Tally:
    successes: int = 0
    conflicts: int = 0

    def add(self, written: bool) -> None:
        if written:
            self.successes += 1
        else:
            self.conflicts += 1


def _states(writer: int) -> tuple[bytes, bytes]:
    """Two states of writer `writer`, different from every other writer's (c10d's token is the
    state itself, so two writers must never send the same bytes)."""
    even, odd = (
        (f"writer-{writer}-{parity}-".encode() * STATE_SIZE)[:STATE_SIZE] for parity in (0, 1)
    )
    return even, odd


async def _token(backend: AsyncBackend) -> Token | None:
    current = await backend.get_state()
    return None if current is None else current[1]


async def _write_async(
    backend: AsyncBackend, writer: int, token: Token | None, deadline: float
) -> Tally:
    states, tally = _states(writer), Tally()
    while time.perf_counter() < deadline:
        result = await backend.set_state(states[tally.successes % 2], token)
        if result is None:  # cannot happen here: nothing deletes the state
            raise RuntimeError("the state vanished")
        _, token, written = result
        tally.add(written)
    return tally


def _write_sync(backend: SyncBackend, writer: int, token: Token | None, deadline: float) -> Tally:
    states, tally = _states(writer), Tally()
    while time.perf_counter() < deadline:
        result = backend.set_state(states[tally.successes % 2], token)
        if result is None:
            raise RuntimeError("the state vanished")
        _, token, written = result
        tally.add(written)
    return tally


def _outcome(tallies: Sequence[Tally], seconds: float) -> Outcome:
    successes = sum(t.successes for t in tallies)
    conflicts = sum(t.conflicts for t in tallies)
    if successes == 0:
        raise RuntimeError("no writer won a single compare-and-swap")
    return {"successes": successes, "conflicts": conflicts, "seconds": seconds}


async def _window_tasks(backends: Sequence[AsyncBackend], seconds: float) -> Outcome:
    # Every writer reads the state before the clock starts, then writes until it stops.
    tokens = await asyncio.gather(*(_token(backend) for backend in backends))
    started = time.perf_counter()
    deadline = started + seconds
    tallies = await asyncio.gather(
        *(
            _write_async(backend, i, token, deadline)
            for i, (backend, token) in enumerate(zip(backends, tokens, strict=True))
        )
    )
    return _outcome(tallies, time.perf_counter() - started)


def _window_threads(backends: Sequence[SyncBackend], seconds: float) -> Outcome:
    barrier = threading.Barrier(len(backends) + 1)

    def writer(index: int) -> Tally:
        current = backends[index].get_state()
        token = None if current is None else current[1]
        barrier.wait()
        return _write_sync(backends[index], index, token, time.perf_counter() + seconds)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(backends)) as pool:
        futures = [pool.submit(writer, index) for index in range(len(backends))]
        barrier.wait()
        started = time.perf_counter()
        tallies = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
    return _outcome(tallies, elapsed)


async def _measure_writers(
    servers: Servers, namespace: str, names: Sequence[str], writers: int, window: Plan
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        runs: dict[str, Window] = {}
        for contender in contenders(servers, namespace, names):
            run_id = f"contention-{writers}"
            if isinstance(contender, AsyncContender):
                tasks = [
                    await stack.enter_async_context(contender.open(run_id)) for _ in range(writers)
                ]
                window_run = _async_window(tasks, window.seconds)
            else:
                threads = [stack.enter_context(contender.open(run_id)) for _ in range(writers)]
                window_run = _thread_window(threads, window.seconds)
            runs[contender.name] = _counted(servers, window_run)
        rounds = await interleave(runs, rounds=window.rounds)
    return {name: _summary(outcomes) for name, outcomes in rounds.items()}


def _async_window(backends: Sequence[AsyncBackend], seconds: float) -> Window:
    async def run() -> Outcome:
        return await _window_tasks(backends, seconds)

    return run


def _thread_window(backends: Sequence[SyncBackend], seconds: float) -> Window:
    async def run() -> Outcome:
        # The event loop waits in select() meanwhile; the writers are the threads.
        return await asyncio.to_thread(_window_threads, backends, seconds)

    return run


def _counted(servers: Servers, window_run: Window) -> Window:
    """A window, with the requests etcd received during it (nothing else talks to it then)."""

    async def run() -> Outcome:
        before = server_requests(servers.etcd)
        outcome = await window_run()
        received = requests_between(before, server_requests(servers.etcd))
        outcome["etcd_requests"] = received["v3"] + received["v2"]
        return outcome

    return run


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    successes = sum(o["successes"] for o in outcomes)
    conflicts = sum(o["conflicts"] for o in outcomes)
    requests = sum(o["etcd_requests"] for o in outcomes)
    return {
        "throughput": describe([o["successes"] / o["seconds"] for o in outcomes]),
        "conflicts_per_success": conflicts / successes,
        # c10d's TCPStore is not etcd: it has no count of its own.
        "etcd_requests_per_success": requests / successes if requests else None,
        "rounds": outcomes,
    }


async def run(servers: Servers, *, quick: bool, names: Sequence[str]) -> dict[str, Any]:
    window = plan(quick=quick)
    namespace = f"/rdzv-bench/{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {
        "contenders": list(names),
        "state_size": STATE_SIZE,
        "window_seconds": window.seconds,
        "rounds": window.rounds,
        "writers": {},
        "load_average": {"before": load_average()},
    }
    for writers in QUICK_WRITERS if quick else WRITERS:
        await compact(servers)
        print(f"  K = {writers:>3} writers", flush=True)
        results["writers"][str(writers)] = await _measure_writers(
            servers, namespace, names, writers, window
        )
    await compact(servers)
    results["load_average"]["after"] = load_average()
    return results


# -------------------------------------------------------------------------------- reporting


def table(results: dict[str, Any]) -> str:
    """Successful compare-and-swaps per second (median of the rounds), conflicts per success."""
    names = results["contenders"]
    rows = []
    for writers, summary in results["writers"].items():
        rows.append(
            [
                int(writers),
                *(
                    f"{summary[n]['throughput']['median']:,.0f} "
                    f"({summary[n]['conflicts_per_success']:.1f})"
                    for n in names
                ),
            ]
        )
    return markdown_table(["K", *names], rows)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per K: rdzv's throughput over etcd-v2's."""
    out = []
    for writers, summary in results["writers"].items():
        row: dict[str, Any] = {"writers": int(writers)}
        if V2 in summary:
            v2 = summary[V2]["throughput"]["median"]
            for name, key in ((ASYNC, "async_over_v2"), (SYNC, "sync_over_v2")):
                if name in summary:
                    row[key] = ratio(summary[name]["throughput"]["median"], v2)
        out.append(row)
    return out
