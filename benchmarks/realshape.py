"""Real shape: N participants, each on a connection of its own, spread over P processes.

Under torchrun every agent is a process with its own connection to etcd. `scale.py`'s
contenders share one connection (or one per 100) among many participants of one process, which
shares reads and watches that a real job does not share. Three contenders, interleaved run by
run (`harness.interleave`), each run on one fresh etcd:

- real shape (`REAL`): each participant of `rdzv.AsyncRendezvous` has its own
  `rdzv.connect(...)`, N connections over P worker processes (`realshape_worker.py`, P = 8 by
  default), all joining one round of `min_nodes = max_nodes = N` with 64 bytes of node info;
- shared shape (`SHARED`): the same N participants in the same P processes with the same
  round settings, but each process opens one connection that all its participants share (P
  connections in all): the convenient lab shape that `scale.py` measures;
- the floor (`FLOOR`): the real shape's processes and connections, each doing the least a join
  can cost etcd, a `LeaseGrant` and one `Put` on that lease (rdzv's `Connection.grant_lease`
  and `Connection.put`).

`--contenders` runs a subset (the floor alone, say); the ratio rows (real ÷ floor, real ÷
shared) need both of their contenders, and recovery runs by default only with the real shape.
At N <= P each process holds one participant, so the two rendezvous shapes are the same.

The connections are open before the clock starts; the parent gives every worker one start
time (CLOCK_MONOTONIC, which the processes share), and the clock stops when the last
participant has its rank (for the floor: its key). Measured per run: seconds; etcd's bytes sent
and messages received per join (its `/metrics`: `etcd_network_client_grpc_sent_bytes_total`,
`grpc_server_msg_received_total` summed over every method); its CPU seconds; the workers' CPU
seconds (every thread) per participant; calls that ended in an error, by gRPC code
(`grpc_server_handled_total`), and refusals ("too many requests"); the participants' own
errors. The ranks are checked (both rendezvous shapes): exactly 0 .. N-1, once each, one world
size, one round.

Recovery (`--recovery N`, the real shape only): N participants with `min_nodes = N - 1`,
`max_nodes = N`, one of them alone in a process of its own. After a first round: (a) everybody
joins again, seconds until the next round completes; (b) the lone participant's process is
SIGKILLed, the survivors wait for the departure (`AsyncRendezvous.wait_for_departure`) and join
again: seconds from the kill until their round completes. (b) is bounded below by the lease TTL
(the dead participant's key goes when its lease expires: up to the TTL after its last
keep-alive, plus etcd's check for expired leases and the revoke) plus `last_call_timeout`
(N - 1 joined is `min_nodes`, not `max_nodes`, so the round waits that long for a last node).

A run that fails (a participant's error, a worker that dies or does not answer in time, ranks
that do not agree) is reported with its reason, and the sweep goes on.

    python benchmarks/realshape.py        # N = 1,000, 2,000 and 10,000, then recovery at 1,000
    python benchmarks/realshape.py --nodes 100 400 --rounds 3 --recovery 0
    python benchmarks/realshape.py --nodes 10000 --recovery 0 --contenders floor
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import rdzv
from harness import (
    RESULTS,
    code_version,
    describe,
    interleave,
    load_average,
    markdown_table,
    ratio,
    write_json,
)
from servers import counters_between, fresh_etcd, memory_kib, server_counters, server_traffic

REAL: Final = "real shape: rendezvous"
SHARED: Final = "shared shape: rendezvous"
FLOOR: Final = "floor: LeaseGrant + Put"
CONTENDERS: Final = (REAL, SHARED, FLOOR)
# The settings' "kind" of each contender, in `realshape_worker.py`.
KINDS: Final = {REAL: "rendezvous", SHARED: "shared", FLOOR: "floor"}
# `--contenders` names them short.
SHORT: Final = {"real": REAL, "shared": SHARED, "floor": FLOOR}
# The ratio rows: (numerator, denominator), of medians from the same sweep.
RATIOS: Final = {"real ÷ floor": (REAL, FLOOR), "real ÷ shared": (REAL, SHARED)}

SWEEP_NODES: Final = (1_000, 2_000, 10_000)  # this module's command line
SUITE_NODES: Final = (128, 1_000)  # in `scale.py`'s full run
QUICK_NODES: Final = (8, 64)  # in `scale.py`'s quick run (CI)
PROCESSES: Final = 8
RECOVERY_NODES: Final = 1_000
# Recovery waits for a lease to expire: a short TTL keeps the run short. rdzv's default (15 s)
# would add its difference to (b) and nothing else.
RECOVERY_LEASE_TTL: Final = 5
RECOVERY_LAST_CALL: Final = 2.0

_WORKER: Final = str(Path(__file__).resolve().with_name("realshape_worker.py"))
# Long enough for every worker to read its start command before the start.
START_DELAY: Final = 0.5
# Before the kill, for the survivors to read their round's keys and start watching.
WATCH_SETTLE: Final = 1.0
# What the parent allows beyond a worker's own bound before it gives up on the worker: a join
# cut short withdraws, with calls bounded by the connection's read timeout (60 s).
REPLY_MARGIN: Final = 90.0
LEAVE_TIMEOUT: Final = 60.0
# Each connection's bound on its first answer from etcd, which thousands of new connections
# at once can delay well past rdzv's default (5 s).
CONNECT_TIMEOUT: Final = 60.0
# A worker's answer holds one outcome per participant: more than asyncio's 64 KiB line limit.
LINE_LIMIT: Final = 64 * 1024**2

Message = dict[str, Any]
Outcome = dict[str, Any]


def join_timeout(nodes: int) -> float:
    """Each participant's bound on its join; large at large N, where etcd may refuse calls."""
    return 600.0 if nodes > 2_000 else 120.0


def open_timeout(nodes: int) -> float:
    """The bound on opening every connection (Python opens a few hundred a second)."""
    return 60.0 + nodes / 20


class RunFailed(Exception):
    """A run that cannot go on; its message is the reason reported."""


# ---------------------------------------------------------------------------------- workers


@dataclasses.dataclass
class Worker:
    """A worker process and the participants it holds."""

    process: asyncio.subprocess.Process
    indices: list[int]
    log: Path  # its stderr
    open_seconds: float = 0.0  # how long opening its connections took
    connections: int = 0  # how many it opened

    @classmethod
    async def start(cls, indices: list[int], log: Path) -> Worker:
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                _WORKER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=LINE_LIMIT,
            )
        return cls(process, indices, log)

    async def send(self, message: Message) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def receive(self, timeout: float) -> Message:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            reason = f"worker {self.process.pid} did not answer within {timeout:g} s"
            raise RunFailed(reason) from None
        if not line:
            await asyncio.wait_for(self.process.wait(), 10)
            raise RunFailed(
                f"worker {self.process.pid} exited ({self.process.returncode}): {self.tail()}"
            )
        message: Message = json.loads(line)
        if message.get("event") == "failed":
            raise RunFailed(f"worker {self.process.pid}: {message['reason']}")
        return message

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(nothing on stderr)"

    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()


def split(indices: Sequence[int], parts: int) -> list[list[int]]:
    """`indices` in `parts` contiguous groups whose sizes differ by one at most."""
    size, extra = divmod(len(indices), parts)
    groups, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        groups.append(list(indices[start:end]))
        start = end
    return [group for group in groups if group]


@contextlib.asynccontextmanager
async def started_workers(
    groups: list[list[int]], settings: Message
) -> AsyncIterator[list[Worker]]:
    """One worker per group, its connections open; they leave and are gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="rdzv-realshape-") as directory:
        workers: list[Worker] = []
        try:
            for number, group in enumerate(groups):
                log = Path(directory, f"worker-{number}.log")
                workers.append(await Worker.start(group, log))
            for worker in workers:
                await worker.send({**settings, "indices": worker.indices})
            limit = open_timeout(sum(map(len, groups)))
            ready = await asyncio.gather(*(worker.receive(limit) for worker in workers))
            for worker, message in zip(workers, ready, strict=True):
                worker.open_seconds = message["open_seconds"]
                worker.connections = message["connections"]
            yield workers
        finally:
            await _stop(workers)


async def _stop(workers: list[Worker]) -> None:
    """Let every live worker leave (bounded), then kill whatever is left."""
    alive = [worker for worker in workers if worker.alive()]
    with contextlib.suppress(Exception):
        for worker in alive:
            await worker.send({"op": "leave", "timeout": LEAVE_TIMEOUT / 2})
        await asyncio.gather(
            *(worker.receive(LEAVE_TIMEOUT) for worker in alive), return_exceptions=True
        )
    for worker in workers:
        worker.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.process.wait(), 10)


async def command(workers: list[Worker], message: Message, timeout: float) -> list[Message]:
    """Send `message` to every worker; their answers, each within `timeout`."""
    for worker in workers:
        await worker.send(message)
    return list(await asyncio.gather(*(worker.receive(timeout) for worker in workers)))


# -------------------------------------------------------------------------------- figures


def scrape(server: Any) -> dict[str, float]:
    return {**server_counters(server), **server_traffic(server)}


def server_figures(before: dict[str, float], after: dict[str, float], nodes: int) -> Outcome:
    """etcd's side of a clocked interval, per join where it says so."""
    spent = counters_between(before, after)
    return {
        "sent_bytes_per_join": spent["sent_bytes"] / nodes,
        "messages_per_join": spent["messages"] / nodes,
        "requests_per_join": spent["requests"] / nodes,
        "etcd_cpu": spent.get("cpu_seconds"),
        "refused": spent["refused"],
        "errors": _by_prefix(spent, "code:"),
        "methods": _by_prefix(spent, "method:"),
    }


def _by_prefix(counts: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        key.removeprefix(prefix): value
        for key, value in sorted(counts.items())
        if key.startswith(prefix) and value
    }


def client_figures(replies: list[Message], start: float, expected: int) -> Outcome:
    """The participants' side: when the last was done, their CPU, their errors."""
    outcomes = [outcome for reply in replies for outcome in reply["outcomes"]]
    errors: dict[str, int] = {}
    for reply in replies:
        for kind, count in reply["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    finished = sorted(o["done_at"] - start for o in outcomes)
    figures: Outcome = {
        "done": len(outcomes),
        "seconds": finished[-1] if finished else None,
        # When half had their rank: far below `seconds`, a few stragglers made the round long.
        "half_done_seconds": finished[len(finished) // 2] if finished else None,
        "client_cpu_per_participant": sum(reply["cpu"] for reply in replies) / expected,
        "client_errors": errors,
        "error_examples": {k: v for reply in replies for k, v in reply["error_examples"].items()},
        "late_start": max((reply.get("late", 0.0) for reply in replies), default=0.0),
    }
    if len(outcomes) != expected:
        figures["failed"] = f"{expected - len(outcomes)} of {expected} failed: {errors}"
        figures["seconds"] = None
    return figures


def opened(workers: list[Worker], server: Any) -> Outcome:
    """Before the clock: the workers and their connections, the slowest one's opening, etcd's
    memory then."""
    return {
        "workers": len(workers),
        "connections": sum(worker.connections for worker in workers),
        "open_seconds": max(worker.open_seconds for worker in workers),
        "etcd_open_mib": memory_kib(server.pid)["rss"] / 1024,
    }


def etcd_peak_mib(server: Any) -> float:
    """etcd's peak resident memory; the process is new, so its peak is this run's."""
    return memory_kib(server.pid)["peak"] / 1024


def check_ranks(replies: list[Message], nodes: int) -> None:
    """Every participant agrees: ranks 0 .. nodes-1 once each, one world size, one round."""
    outcomes = [outcome for reply in replies for outcome in reply["outcomes"]]
    sizes, rounds = {o["world_size"] for o in outcomes}, {o["round"] for o in outcomes}
    if sizes != {nodes} or len(rounds) != 1:
        raise RunFailed(f"expected {nodes} in one round: world sizes {sizes}, rounds {rounds}")
    ranks = sorted(o["rank"] for o in outcomes)
    if ranks != list(range(nodes)):
        raise RunFailed(f"ranks are not 0..{nodes - 1} once each: {ranks[:10]}...")
    if len({o["member_id"] for o in outcomes}) != nodes:
        raise RunFailed("two participants have one member id")


# ------------------------------------------------------------------------------- one run


@dataclasses.dataclass(frozen=True)
class Config:
    processes: int = PROCESSES
    join_timeout: float | None = None  # None: `join_timeout(N)`
    lease_ttl: int = rdzv.DEFAULT_LEASE_TTL
    recovery_lease_ttl: int = RECOVERY_LEASE_TTL
    last_call_timeout: float = RECOVERY_LAST_CALL

    def timeout(self, nodes: int) -> float:
        return self.join_timeout or join_timeout(nodes)


def worker_settings(kind: str, endpoint: str, nodes: int, config: Config) -> Message:
    return {
        "kind": kind,
        "endpoints": endpoint,
        "run_id": f"realshape-{uuid.uuid4().hex[:12]}",
        "min_nodes": nodes,
        "max_nodes": nodes,
        "last_call_timeout": config.last_call_timeout,
        "lease_ttl": config.lease_ttl,
        "timeout": config.timeout(nodes),
        "connect_timeout": CONNECT_TIMEOUT,
    }


async def clocked_join(
    workers: list[Worker], server: Any, nodes: int, timeout: float, *, ranked: bool
) -> Outcome:
    """Every participant joins at one start time; figures of the interval, ranks checked."""
    figures: Outcome = {}
    before = scrape(server)
    start = time.monotonic() + START_DELAY
    try:
        replies = await command(
            workers, {"op": "join", "at": start, "timeout": timeout}, timeout + REPLY_MARGIN
        )
    finally:
        figures.update(server_figures(before, scrape(server), nodes))
    figures.update(client_figures(replies, start, nodes))
    if ranked and not figures.get("failed"):
        check_ranks(replies, nodes)
    return figures


async def measure(name: str, nodes: int, config: Config) -> Outcome:
    """One run of contender `name` at N = `nodes` on a fresh etcd; failures are reported."""
    outcome: Outcome = {"load": load_average(), "failed": None}
    started = time.perf_counter()
    try:
        with fresh_etcd(1) as [server]:
            settings = worker_settings(KINDS[name], server.endpoint, nodes, config)
            groups = split(range(nodes), config.processes)
            async with started_workers(groups, settings) as workers:
                outcome.update(opened(workers, server))
                outcome.update(
                    await clocked_join(
                        workers,
                        server,
                        nodes,
                        config.timeout(nodes),
                        ranked=KINDS[name] != "floor",
                    )
                )
                outcome["etcd_peak_mib"] = etcd_peak_mib(server)
    except Exception as error:  # the sweep goes on: this run is reported as failed, and why
        outcome["failed"] = f"{type(error).__name__}: {error}"
    outcome["wall_seconds"] = time.perf_counter() - started
    return outcome


# ------------------------------------------------------------------------------- recovery


async def recover(nodes: int, config: Config) -> Outcome:
    """(a) everybody joins again; (b) one participant killed, the survivors join again."""
    outcome: Outcome = {
        "nodes": nodes,
        "processes": config.processes + 1,
        "lease_ttl": config.recovery_lease_ttl,
        "last_call_timeout": config.last_call_timeout,
        "min_nodes": nodes - 1,
        "max_nodes": nodes,
        "load": load_average(),
        "failed": None,
    }
    timeout = config.timeout(nodes)
    try:
        with fresh_etcd(1) as [server]:
            settings = worker_settings("rendezvous", server.endpoint, nodes, config)
            settings.update(min_nodes=nodes - 1, lease_ttl=config.recovery_lease_ttl)
            # The participant to kill has a process of its own, so the kill kills it alone.
            groups = [[0], *split(range(1, nodes), config.processes)]
            async with started_workers(groups, settings) as workers:
                outcome.update(opened(workers, server))
                for step in ("first_round", "all_rejoin"):
                    outcome[step] = await clocked_join(workers, server, nodes, timeout, ranked=True)
                    if outcome[step].get("failed"):
                        raise RunFailed(f"{step}: {outcome[step]['failed']}")
                outcome["after_kill"] = await after_kill(workers, server, nodes, timeout)
                outcome["etcd_peak_mib"] = etcd_peak_mib(server)
                if outcome["after_kill"].get("failed"):
                    raise RunFailed(f"after_kill: {outcome['after_kill']['failed']}")
    except Exception as error:  # reported, as a failed run is
        outcome["failed"] = f"{type(error).__name__}: {error}"
    return outcome


async def after_kill(workers: list[Worker], server: Any, nodes: int, timeout: float) -> Outcome:
    """SIGKILL the lone participant's process; figures until the survivors' round completes."""
    lone, survivors = workers[0], workers[1:]
    figures: Outcome = {}
    before = scrape(server)
    for worker in survivors:
        await worker.send({"op": "after_departure", "timeout": timeout})
    await asyncio.sleep(WATCH_SETTLE)
    killed = time.monotonic()
    lone.kill()
    try:
        replies = await asyncio.gather(
            *(worker.receive(timeout + REPLY_MARGIN) for worker in survivors)
        )
    finally:
        figures.update(server_figures(before, scrape(server), nodes - 1))
    figures.update(client_figures(replies, killed, nodes - 1))
    departures = sorted(o["departed_at"] - killed for r in replies for o in r["outcomes"])
    if departures:
        figures["departure_seen"] = {"first": departures[0], "last": departures[-1]}
    if not figures.get("failed"):
        check_ranks(replies, nodes - 1)
    return figures


# ------------------------------------------------------------------------------- the sweep

_MEDIANS: Final = (
    "half_done_seconds",
    "sent_bytes_per_join",
    "messages_per_join",
    "requests_per_join",
    "etcd_cpu",
    "client_cpu_per_participant",
    "refused",
    "late_start",
    "open_seconds",
    "connections",
    "etcd_open_mib",
    "etcd_peak_mib",
    "wall_seconds",
)
_RATIOS: Final = (
    "seconds",
    "sent_bytes_per_join",
    "messages_per_join",
    "etcd_cpu",
    "client_cpu_per_participant",
)


def summarize(runs: list[Outcome]) -> dict[str, Any]:
    """Medians over the runs that completed (errors over all); `runs` keeps every run."""
    done = [run for run in runs if not run.get("failed")]
    summary: dict[str, Any] = {
        "seconds": describe([run["seconds"] for run in done]) if done else None,
        "completed": len(done),
        "attempted": len(runs),
        "failures": [run["failed"] for run in runs if run.get("failed")],
    }
    for key in _MEDIANS:
        values = [run[key] for run in done if run.get(key) is not None]
        summary[key] = describe(values)["median"] if values else None
    summary["errors"] = _summed(run.get("errors", {}) for run in runs)
    summary["client_errors"] = _summed(run.get("client_errors", {}) for run in runs)
    summary["runs"] = runs
    return summary


def _summed(counts: Any) -> dict[str, float]:
    total: dict[str, float] = {}
    for each in counts:
        for key, value in each.items():
            total[key] = total.get(key, 0) + value
    return total


def ratios(by_name: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each of `RATIOS` whose contenders both ran (real ÷ floor, real ÷ shared), of medians from
    the same sweep."""
    result: dict[str, dict[str, float | None]] = {}
    for label, (top, bottom) in RATIOS.items():
        if top not in by_name or bottom not in by_name:
            continue
        result[label] = {}
        for key in _RATIOS:
            a, b = _median(by_name[top], key), _median(by_name[bottom], key)
            result[label][key] = None if a is None or b is None else ratio(a, b)
    return result


def _median(summary: dict[str, Any] | None, key: str) -> float | None:
    if summary is None or summary.get(key) is None:
        return None
    value = summary[key]
    return float(value["median"] if isinstance(value, dict) else value)


async def sweep(
    node_counts: Sequence[int],
    config: Config,
    *,
    rounds: int,
    names: Sequence[str] = CONTENDERS,
    on_each: Any = None,
) -> dict[str, Any]:
    """The contenders `names` at every N, interleaved; `on_each(results)` after each N."""
    results: dict[str, Any] = {
        "contenders": list(names),
        "processes": config.processes,
        "rounds": rounds,
        "lease_ttl": config.lease_ttl,
        "join_timeout": {str(nodes): config.timeout(nodes) for nodes in node_counts},
        "code": code_version(),
        "started_at": _now(),
        "load_average": {"before": load_average()},
        "nodes": {},
    }
    for nodes in node_counts:
        print(f"  real shape, N = {nodes:,}, {config.processes} processes", flush=True)
        runs = {name: _shown(name, nodes, config) for name in names}
        outcomes = await interleave(runs, rounds=rounds)
        by_name = {name: summarize(each) for name, each in outcomes.items()}
        results["nodes"][str(nodes)] = {**by_name, "ratios": ratios(by_name)}
        if on_each is not None:
            on_each(results)
    results["load_average"]["after"] = load_average()
    return results


def _shown(name: str, nodes: int, config: Config) -> Any:
    async def run_once() -> Outcome:
        outcome = await measure(name, nodes, config)
        shown = outcome["failed"] or f"{outcome['seconds']:.2f} s"
        print(f"    {name:<24} {shown} (load {outcome['load'][:1]})", flush=True)
        return outcome

    return run_once


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


async def run(*, quick: bool) -> dict[str, Any]:
    """The real shape as part of `scale.py`'s suite: small N in the quick run."""
    if quick:
        return await sweep(QUICK_NODES, Config(), rounds=1)
    results = await sweep(SUITE_NODES, Config(), rounds=3)
    results["recovery"] = await recover(RECOVERY_NODES, Config())
    return results


# ------------------------------------------------------------------------------- reporting


def table(data: dict[str, Any]) -> str:
    """Medians per N and contender, and the ratios (real ÷ floor, real ÷ shared)."""
    rows = []
    for nodes, by_name in data["nodes"].items():
        for name in data["contenders"]:
            s = by_name[name]
            seconds = s["seconds"]
            rows.append(
                [
                    f"{int(nodes):,}",
                    name,
                    None if seconds is None else seconds["median"],
                    f"{s['completed']}/{s['attempted']}",
                    s["sent_bytes_per_join"],
                    s["messages_per_join"],
                    s["etcd_cpu"],
                    _milli(s["client_cpu_per_participant"]),
                    s["etcd_peak_mib"],
                    _shown_counts(s["errors"]) or "none",
                ]
            )
        for label, r in by_name["ratios"].items():
            rows.append(
                [
                    f"{int(nodes):,}",
                    label,
                    r["seconds"],
                    "",
                    r["sent_bytes_per_join"],
                    r["messages_per_join"],
                    r["etcd_cpu"],
                    r["client_cpu_per_participant"],
                    None,
                    "",
                ]
            )
    headers = [
        "N",
        "contender",
        "seconds",
        "done",
        "etcd bytes sent/join",
        "etcd msgs/join",
        "etcd CPU s",
        "client CPU ms/participant",
        "etcd peak MiB",
        "errors by gRPC code",
    ]
    return markdown_table(headers, rows)


def _milli(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _shown_counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:,.0f}" for key, value in counts.items())


def recovery_table(recovery: dict[str, Any]) -> str:
    rows = []
    for step, what in (
        ("first_round", "first round"),
        ("all_rejoin", "(a) everybody joins again"),
        ("after_kill", "(b) one killed: from the kill"),
    ):
        s = recovery.get(step)
        if s is None:
            continue
        seen = s.get("departure_seen")
        rows.append(
            [
                what,
                s.get("seconds"),
                None if seen is None else f"{seen['first']:.2f}-{seen['last']:.2f}",
                s.get("messages_per_join"),
                s.get("etcd_cpu"),
                _shown_counts(s.get("errors", {})) or "none",
            ]
        )
    return markdown_table(
        ["step", "seconds", "departure seen after s", "etcd msgs/join", "etcd CPU s", "errors"],
        rows,
    )


def report(data: dict[str, Any]) -> str:
    parts = [table(data)] if data["nodes"] else []
    recovery = data.get("recovery")
    if recovery:
        parts.append(
            f"Recovery at N = {recovery['nodes']:,} (lease_ttl {recovery['lease_ttl']} s, "
            f"last_call_timeout {recovery['last_call_timeout']:g} s, min_nodes N-1):"
            + (f" FAILED: {recovery['failed']}" if recovery["failed"] else "")
        )
        parts.append(recovery_table(recovery))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=list(SWEEP_NODES))
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--join-timeout", type=float, default=None)
    parser.add_argument(
        "--recovery",
        type=int,
        default=None,
        metavar="N",
        help=f"0: no recovery (the default: {RECOVERY_NODES:,} if the real shape runs, else 0)",
    )
    parser.add_argument("--recovery-lease-ttl", type=int, default=RECOVERY_LEASE_TTL)
    parser.add_argument("--last-call-timeout", type=float, default=RECOVERY_LAST_CALL)
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=list(SHORT),
        default=list(SHORT),
        help="which to run, interleaved: "
        + ", ".join(f"{short} ({name})" for short, name in SHORT.items())
        + "; default: all three",
    )
    parser.add_argument(
        "--lease-ttl", type=int, default=rdzv.DEFAULT_LEASE_TTL, help="the rendezvous' lease TTL"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "realshape.json")
    args = parser.parse_args()
    if args.recovery is None:
        args.recovery = RECOVERY_NODES if "real" in args.contenders else 0
    if args.processes < 1 or any(nodes < 2 for nodes in [*args.nodes, args.recovery or 2]):
        parser.error("--processes must be at least 1, and every N at least 2")
    config = Config(
        processes=args.processes,
        join_timeout=args.join_timeout,
        lease_ttl=args.lease_ttl,
        recovery_lease_ttl=args.recovery_lease_ttl,
        last_call_timeout=args.last_call_timeout,
    )
    asyncio.run(_main(args, config))


async def _main(args: argparse.Namespace, config: Config) -> None:
    # Written after every N, so that a sweep cut short keeps what it measured.
    names = [name for name in CONTENDERS if name in {SHORT[c] for c in args.contenders}]
    data = await sweep(
        args.nodes,
        config,
        rounds=args.rounds,
        names=names,
        on_each=lambda d: write_json(args.output, d),
    )
    if args.recovery:
        print(f"  recovery, N = {args.recovery:,}", flush=True)
        data["recovery"] = await recover(args.recovery, config)
    data["finished_at"] = _now()
    data["load_average"]["after"] = load_average()
    write_json(args.output, data)
    print("\n" + report(data))
    print(f"\nwrote {args.output}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
