"""The process shape: one OS process and one handler per node, as torchrun runs its agents.

`rendezvous.py`'s threads shape puts many nodes in a few processes. Here each node is a
process of its own (`processes_worker.py`): a fresh `python` that imports torch's rendezvous
and rdzv, makes one handler with `rendezvous.py`'s `NodeFactory` of its contender (torch's
`DynamicRendezvousHandler` over etcd-v2, etcd-v3 or c10d, or rdzv's etcd-v3-rounds handler),
with its own connection, and calls `next_rendezvous()` when told to. The contenders take turns,
a group of N new processes each, in a new random order each repetition (`harness.interleave`).

**Cold and warm** (`min_nodes == max_nodes == N`, `rendezvous.HANDLER_SETTINGS`, as the threads
shape). A group of N new processes starts; every process imports, then makes its handler. The
clock starts at one instant T, 0.5 s after the last process said its handler exists: every
process sleeps until T (CLOCK_MONOTONIC, which the processes share) and calls
`next_rendezvous()`; the clock stops when the last process has its rank. That is the *cold*
round: a job's first rendezvous, each process's first. Every handler is then shut down, and the
same processes make a new handler each (a new run id) and do a second round the same way: the
*warm* round. Measured per round: seconds; the client CPU per node (`time.process_time()` of
each node process, user + sys of every thread, from T until its rank, averaged over the N);
etcd's own count of the requests it received from just before T until the last rank (its
`/metrics`, as `rendezvous.py` counts them), per node; the backend calls and lost
compare-and-swaps of torch's handler. Apart, the creation: each process's start-up (from its
spawn until it has imported torch and rdzv, and its CPU time until then) and the making of each
handler (`create_handler` or `create_rounds_handler`: seconds and CPU seconds).

**Recovery** (issue 19; N = 32 processes, `min_nodes = N - 1`, `max_nodes = N`): a group
starts, makes its handlers and completes a first round as above; then (a) every node calls
`next_rendezvous()` again at one instant T (what torchrun's agent does after a worker failure):
seconds from T until every node has its new rank; (b) at the next instant T, 0.5 s after (a)
completed, the process that (a) ranked last is SIGKILLed and the N - 1 survivors call
`next_rendezvous()`: seconds from T (the kill) until every survivor has its rank in a round of
N - 1. Every contender keeps torch's defaults (`RECOVERY_SETTINGS`) but `join_timeout`, 120 s,
which bounds each step: a step not done by then is reported as not done.

    python benchmarks/processes.py                  # threads and processes at N = 32, 64; recovery
    python benchmarks/processes.py --nodes 8 --repeats 1 --recovery 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import rendezvous
from contenders import C10D, V2
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
from rendezvous import HANDLER_SETTINGS, HANDLERS, JOIN_TIMEOUT, ROUNDS, V3
from servers import Servers, requests_between, server_requests

NODES: Final = (32, 64)
# The quick run (CI) starts one process per contender, a round of one: each process imports
# torch, about 2.5 s of CPU, so that a group of N costs N times that before its first round.
QUICK_NODES: Final = (1,)
REPEATS: Final = 3
RECOVERY_NODES: Final = 32
# The bound on each recovery step, and the recovery handlers' join_timeout.
RECOVERY_WAIT: Final = 120
# torch's defaults (`RendezvousParameters`, `DynamicRendezvousHandler`, `c10d` and `etcd-v2`
# backends; rdzv's handlers take the same), but `join_timeout` (600 s).
RECOVERY_SETTINGS: Final = {**HANDLER_SETTINGS, "join_timeout": str(RECOVERY_WAIT)}
_WORKER: Final = str(Path(__file__).resolve().with_name("processes_worker.py"))
# Long enough for every node to read its join command before the start.
START_DELAY: Final = 0.5
# N processes importing torch at once on a small machine take a while (about 2 s of CPU each).
STARTUP_TIMEOUT: Final = 900.0
CREATE_TIMEOUT: Final = 120.0
SHUTDOWN_TIMEOUT: Final = 90.0
# Beyond a node's own bound (its join timeout), before the parent gives up on it.
REPLY_MARGIN: Final = 60.0

COLD: Final = "cold"
WARM: Final = "warm"
VARIANTS: Final = (COLD, WARM)
FIRST: Final = "first round"
REJOIN: Final = "(a) all rejoin"
KILLED: Final = "(b) one killed"
STEPS: Final = (FIRST, REJOIN, KILLED)

Message = dict[str, Any]
Outcome = dict[str, Any]


class RunFailed(Exception):
    """A group that cannot go on; its message is the reason reported."""


# ------------------------------------------------------------------------------ node processes


@dataclasses.dataclass
class Node:
    """One node process."""

    process: asyncio.subprocess.Process
    log: Path  # its stderr
    spawned: float  # time.monotonic() just before it was started
    rank: int | None = None  # in the last round it completed

    @classmethod
    async def start(cls, log: Path) -> Node:
        spawned = time.monotonic()
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                _WORKER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        return cls(process, log, spawned)

    async def send(self, message: Message) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def receive(self, timeout: float) -> Message:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            reason = f"node {self.process.pid} did not answer within {timeout:g} s"
            raise RunFailed(reason) from None
        if not line:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            raise RunFailed(
                f"node {self.process.pid} exited ({self.process.returncode}): {self.tail()}"
            )
        message: Message = json.loads(line)
        if message.get("event") == "failed":
            raise RunFailed(f"node {self.process.pid}: {message['reason']}")
        return message

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(nothing on stderr)"

    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()  # SIGKILL


@contextlib.asynccontextmanager
async def started_nodes(
    servers: Servers, name: str, count: int, outcome: Outcome
) -> AsyncIterator[list[Node]]:
    """`count` new node processes of contender `name`, once each has imported torch and rdzv;
    their start-up goes into `outcome`. Afterwards they exit (or are killed)."""
    settings = {
        "contender": name,
        "etcd": servers.etcd_endpoint,
        "c10d": servers.c10d.endpoint,
    }
    with tempfile.TemporaryDirectory(prefix="rdzv-processes-") as directory:
        nodes: list[Node] = []
        try:
            for number in range(count):
                node = await Node.start(Path(directory, f"node-{number}.log"))
                nodes.append(node)
                await node.send(settings)
            started = await asyncio.gather(*(node.receive(STARTUP_TIMEOUT) for node in nodes))
            now = time.monotonic()
            outcome["startup"] = {
                # Until the last has imported, from the first's spawn: N imports of torch at once.
                "all_seconds": now - nodes[0].spawned,
                "cpu_per_process": describe([message["cpu"] for message in started]),
            }
            yield nodes
        finally:
            await _stop(nodes)


async def _stop(nodes: list[Node]) -> None:
    """Tell every live node to exit, then kill whatever is left."""
    for node in nodes:
        if node.alive():
            with contextlib.suppress(Exception):
                await node.send({"op": "exit"})
    for node in nodes:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.process.wait(), 10)
        node.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.process.wait(), 10)


async def command(nodes: list[Node], message: Message, timeout: float) -> list[Message]:
    """Send `message` to every node; their answers, each within `timeout`."""
    for node in nodes:
        await node.send(message)
    return list(await asyncio.gather(*(node.receive(timeout) for node in nodes)))


async def create(
    nodes: list[Node], run_id: str, *, min_nodes: int, settings: dict[str, str]
) -> Outcome:
    """Every node makes its handler for `run_id`; what that cost, per node."""
    answers = await command(
        nodes,
        {
            "op": "create",
            "run_id": run_id,
            "nodes": len(nodes),
            "min_nodes": min_nodes,
            "settings": settings,
        },
        CREATE_TIMEOUT,
    )
    return {
        "creation_seconds": describe([answer["seconds"] for answer in answers]),
        "creation_cpu": describe([answer["cpu"] for answer in answers]),
    }


async def shutdown(nodes: list[Node]) -> None:
    await command(nodes, {"op": "shutdown"}, SHUTDOWN_TIMEOUT)


async def clocked_join(
    servers: Servers,
    name: str,
    nodes: list[Node],
    timeout: float,
    *,
    kill: Node | None = None,
) -> Outcome:
    """Every node of `nodes` calls `next_rendezvous()` at one instant T (and `kill` is
    SIGKILLed at T); the round's figures, from T until the last node has its rank."""
    before = server_requests(servers.etcd)
    at = time.monotonic() + START_DELAY
    for node in nodes:
        await node.send({"op": "join", "at": at})
    if kill is not None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        kill.kill()
    answers = await asyncio.gather(*(node.receive(timeout + REPLY_MARGIN) for node in nodes))
    received = requests_between(before, server_requests(servers.etcd))
    done = [answer for answer in answers if not answer.get("timed_out")]
    complete = len(done) == len(nodes)
    if complete:
        ranks = sorted(answer["rank"] for answer in done)
        sizes = {answer["world_size"] for answer in done}
        if ranks != list(range(len(nodes))) or sizes != {len(nodes)}:
            raise RunFailed(f"{name}: a bad rendezvous: ranks {ranks}, world sizes {sizes}")
        for node, answer in zip(nodes, answers, strict=True):
            node.rank = answer["rank"]
    cpu = [answer["cpu"] for answer in answers]
    calls = [answer["calls"] for answer in answers if "calls" in answer]
    requests = None if name == C10D else received["v3"] + received["v2"]
    return {
        "seconds": max(answer["at"] for answer in done) - at if complete else None,
        "joined": len(done),
        "nodes": len(nodes),
        # How late the last node called next_rendezvous() (the machine's scheduling).
        "late_start": max(answer["started"] for answer in answers) - at,
        "client_cpu_per_node": sum(cpu) / len(nodes),
        "client_cpu_max": max(cpu),
        "etcd_requests": requests,
        "etcd_requests_per_node": None if requests is None else requests / len(nodes),
        "backend_calls": sum(c["get_state"] + c["set_state"] for c in calls) if calls else None,
        "conflicts": sum(c["lost"] for c in calls) if calls else None,
    }


def _run_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------ the two measurements


async def shape(servers: Servers, name: str, count: int) -> Outcome:
    """One group of `count` new processes of `name`: a cold round, then a warm one."""
    outcome: Outcome = {"load": load_average(), "failed": None}
    try:
        async with started_nodes(servers, name, count, outcome) as nodes:
            for variant in VARIANTS:
                figures = await create(
                    nodes, _run_id("proc"), min_nodes=count, settings=HANDLER_SETTINGS
                )
                figures.update(await clocked_join(servers, name, nodes, JOIN_TIMEOUT))
                outcome[variant] = figures
                await shutdown(nodes)
    except RunFailed as error:  # reported; the next run goes on
        outcome["failed"] = str(error)
    return outcome


async def recovery(servers: Servers, name: str, count: int) -> Outcome:
    """A first round of `count` new processes of `name`, then (a) and (b)."""
    outcome: Outcome = {"load": load_average(), "failed": None}
    try:
        async with started_nodes(servers, name, count, outcome) as nodes:
            made = await create(
                nodes, _run_id("recovery"), min_nodes=count - 1, settings=RECOVERY_SETTINGS
            )
            outcome.update(made)
            for step in (FIRST, REJOIN):
                outcome[step] = await clocked_join(servers, name, nodes, RECOVERY_WAIT)
                if outcome[step]["seconds"] is None:
                    raise RunFailed(f"{step}: not done within {RECOVERY_WAIT} s")
            victim = max(nodes, key=lambda node: node.rank or 0)
            survivors = [node for node in nodes if node is not victim]
            outcome["killed_rank"] = victim.rank
            outcome[KILLED] = await clocked_join(
                servers, name, survivors, RECOVERY_WAIT, kill=victim
            )
            await shutdown(survivors)
    except RunFailed as error:
        outcome["failed"] = str(error)
    return outcome


async def run(
    servers: Servers,
    *,
    quick: bool,
    names: Sequence[str] = HANDLERS,
    nodes: Sequence[int] | None = None,
    repeats: int | None = None,
    recovery_nodes: int | None = None,
) -> dict[str, Any]:
    """The process shape at each N of `nodes` (cold and warm), then the recovery at
    `recovery_nodes` (0: none); the quick run does the shape at N = 1 once, no recovery."""
    started = time.perf_counter()
    node_counts = tuple(nodes) if nodes is not None else QUICK_NODES if quick else NODES
    repeats = repeats if repeats is not None else 1 if quick else REPEATS
    if recovery_nodes is None:
        recovery_nodes = 0 if quick else RECOVERY_NODES
    results: dict[str, Any] = {
        "contenders": list(names),
        "code": code_version(),
        "repeats": repeats,
        "join_timeout": JOIN_TIMEOUT,
        "handler_settings": HANDLER_SETTINGS,
        "start_delay": START_DELAY,
        "nodes": {},
        "load_average": {"before": load_average()},
    }
    for count in node_counts:
        print(f"  processes: N = {count:>3}", flush=True)
        runs = {name: _bound(shape, servers, name, count) for name in names}
        outcomes = await interleave(runs, rounds=repeats)
        results["nodes"][str(count)] = {
            name: _shape_summary(each) for name, each in outcomes.items()
        }
    results["load_average"]["after_shape"] = load_average()
    if recovery_nodes:
        print(f"  recovery: N = {recovery_nodes}", flush=True)
        runs = {name: _bound(recovery, servers, name, recovery_nodes) for name in names}
        outcomes = await interleave(runs, rounds=repeats)
        results["recovery"] = {
            "nodes": recovery_nodes,
            "settings": RECOVERY_SETTINGS,
            "wait": RECOVERY_WAIT,
            "contenders": {name: _recovery_summary(each) for name, each in outcomes.items()},
        }
    results["load_average"]["after"] = load_average()
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _bound(measure: Any, servers: Servers, name: str, count: int) -> Any:
    async def run() -> Outcome:
        return await measure(servers, name, count)

    return run


# ------------------------------------------------------------------------------- summaries


def _median(outcomes: list[Outcome], key: str) -> float | None:
    values = [o[key] for o in outcomes if o.get(key) is not None]
    return describe(values)["median"] if values else None


def _round_summary(rounds: list[Outcome]) -> dict[str, Any]:
    finished = [o["seconds"] for o in rounds if o["seconds"] is not None]
    return {
        "seconds": describe(finished) if finished else None,
        "completed": len(finished),
        **{
            key: _median(rounds, key)
            for key in (
                "client_cpu_per_node",
                "client_cpu_max",
                "etcd_requests_per_node",
                "backend_calls",
                "conflicts",
                "late_start",
            )
        },
        "creation_seconds": _median([o["creation_seconds"] for o in rounds], "median"),
        "creation_cpu": _median([o["creation_cpu"] for o in rounds], "median"),
    }


def _shape_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    started = [o["startup"] for o in outcomes if "startup" in o]
    summary: dict[str, Any] = {
        "attempted": len(outcomes),
        "failed": [o["failed"] for o in outcomes if o["failed"]],
        "startup_seconds": _median(started, "all_seconds"),
        "startup_cpu_per_process": _median([s["cpu_per_process"] for s in started], "median"),
        "runs": outcomes,
    }
    for variant in VARIANTS:
        rounds = [o[variant] for o in outcomes if variant in o]
        summary[variant] = _round_summary(rounds) if rounds else None
    return summary


def _recovery_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "attempted": len(outcomes),
        "failed": [o["failed"] for o in outcomes if o["failed"]],
        "killed_ranks": [o.get("killed_rank") for o in outcomes],
        "runs": outcomes,
    }
    for step in STEPS:
        steps = [o[step] for o in outcomes if step in o]
        finished = [s["seconds"] for s in steps if s["seconds"] is not None]
        summary[step] = {
            "seconds": describe(finished) if finished else None,
            "completed": len(finished),
            "attempted": len(steps),
            "client_cpu_per_node": _median(steps, "client_cpu_per_node"),
            "etcd_requests_per_node": _median(steps, "etcd_requests_per_node"),
        }
    return summary


# -------------------------------------------------------------------------------- reporting


def _milli(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def seconds_of(processes: dict[str, Any], name: str, nodes: int, variant: str) -> float | None:
    """The median seconds of `name`'s completed `variant` rounds at `nodes`, if any."""
    summary = processes["nodes"].get(str(nodes), {}).get(name)
    if summary is None or summary[variant] is None or summary[variant]["seconds"] is None:
        return None
    return float(summary[variant]["seconds"]["median"])


def table(processes: dict[str, Any]) -> str:
    """Per N, contender and round (cold, warm): seconds, client CPU and etcd requests per node,
    backend calls and lost compare-and-swaps, and what making the handlers cost (medians)."""
    rows = []
    for nodes, by_name in processes["nodes"].items():
        for name in processes["contenders"]:
            summary = by_name[name]
            for variant in VARIANTS:
                s = summary[variant]
                if s is None:
                    rows.append([int(nodes), name, variant, None, None, "0", *[None] * 5])
                    continue
                seconds = s["seconds"]
                rows.append(
                    [
                        int(nodes),
                        name,
                        variant,
                        None if seconds is None else seconds["median"],
                        None if seconds is None else f"{seconds['p10']:.2f}-{seconds['p90']:.2f}",
                        f"{s['completed']}/{summary['attempted']}",
                        _milli(s["client_cpu_per_node"]),
                        s["etcd_requests_per_node"],
                        s["backend_calls"],
                        s["conflicts"],
                        f"{_milli(s['creation_seconds']):.0f} ({_milli(s['creation_cpu']):.0f})"
                        if s["creation_seconds"] is not None
                        else None,
                    ]
                )
    return markdown_table(
        [
            "N",
            "contender",
            "round",
            "seconds",
            "p10-p90",
            "done",
            "client CPU ms/node",
            "etcd requests/node",
            "backend calls",
            "lost CAS",
            "handler made in ms (CPU ms)",
        ],
        rows,
    )


def startup_table(processes: dict[str, Any]) -> str:
    """Each group's start-up: N new processes importing torch and rdzv at once."""
    rows = []
    for nodes, by_name in processes["nodes"].items():
        for name in processes["contenders"]:
            s = by_name[name]
            rows.append([int(nodes), name, s["startup_seconds"], s["startup_cpu_per_process"]])
    return markdown_table(
        ["N", "contender", "all N started, s", "CPU s per process until started"], rows
    )


def comparison_table(data: dict[str, Any]) -> str:
    """Seconds per contender in each shape of the same run, and two ratios of medians.

    `data` is the rendezvous suite's results: the threads shape's, with the process shape's
    under "processes"."""
    processes = data["processes"]
    rows = []
    for nodes in processes["nodes"]:
        shapes: list[tuple[str, dict[str, float | None]]] = []
        if nodes in data.get("nodes", {}):
            shapes.append(
                (
                    "threads",
                    {n: rendezvous.seconds_of(data, n, int(nodes)) for n in HANDLERS},
                )
            )
        for variant in VARIANTS:
            shapes.append(
                (
                    f"processes, {variant}",
                    {n: seconds_of(processes, n, int(nodes), variant) for n in HANDLERS},
                )
            )
        for label, seconds in shapes:
            v2, v3, c10d, rounds = (seconds.get(n) for n in (V2, V3, C10D, ROUNDS))
            rows.append(
                [
                    int(nodes),
                    label,
                    v2,
                    v3,
                    c10d,
                    rounds,
                    None if v2 is None or v3 is None else ratio(v3, v2),
                    None if c10d is None or rounds is None else ratio(rounds, c10d),
                ]
            )
    return markdown_table(
        [
            "N",
            "shape",
            "etcd-v2 s",
            "etcd-v3 s",
            "c10d s",
            "etcd-v3-rounds s",
            "etcd-v3 ÷ etcd-v2",
            "etcd-v3-rounds ÷ c10d",
        ],
        rows,
    )


def goals(processes: dict[str, Any]) -> list[list[object]]:
    """The figures users compare against (not asserted): [what, measured, goal]."""
    rows: list[list[object]] = []
    for nodes, variant, goal in ((32, COLD, 1.05), (64, WARM, 1.1)):
        v2 = seconds_of(processes, V2, nodes, variant)
        v3 = seconds_of(processes, V3, nodes, variant)
        measured = None if v2 is None or v3 is None else f"{v3:.2f} s ÷ {v2:.2f} s = {v3 / v2:.2f}x"
        rows.append([f"etcd-v3 ÷ etcd-v2, N={nodes}, {variant}", measured, f"<= {goal}x"])
    for nodes, by_name in processes["nodes"].items():
        rounds, c10d = (_cold_cpu(by_name.get(name)) for name in (ROUNDS, C10D))
        measured = None if rounds is None else f"{rounds * 1000:.1f} ms"
        if measured is not None and c10d is not None:
            measured += f" (c10d: {c10d * 1000:.1f} ms)"
        rows.append([f"etcd-v3-rounds client CPU per node, N={nodes}, cold", measured, "<= 12 ms"])
    return rows


def _cold_cpu(summary: dict[str, Any] | None) -> float | None:
    if summary is None or summary[COLD] is None:
        return None
    cpu = summary[COLD]["client_cpu_per_node"]
    return None if cpu is None else float(cpu)


def goals_table(processes: dict[str, Any]) -> str:
    return markdown_table(["figure", "measured (medians)", "compared with"], goals(processes))


def recovery_table(processes: dict[str, Any]) -> str:
    """Per contender and step (the first round, (a), (b)): seconds (median, p10-p90), and the
    client CPU and etcd requests per node (medians)."""
    recovered = processes.get("recovery")
    if recovered is None:
        return "(no recovery in this run)"
    rows = []
    for name, summary in recovered["contenders"].items():
        for step in STEPS:
            s = summary[step]
            seconds = s["seconds"]
            rows.append(
                [
                    name,
                    step,
                    None if seconds is None else seconds["median"],
                    None if seconds is None else f"{seconds['p10']:.2f}-{seconds['p90']:.2f}",
                    f"{s['completed']}/{summary['attempted']}",
                    _milli(s["client_cpu_per_node"]),
                    s["etcd_requests_per_node"],
                ]
            )
    return markdown_table(
        [
            "contender",
            "step",
            "seconds",
            "p10-p90",
            "done",
            "client CPU ms/node",
            "etcd requests/node",
        ],
        rows,
    )


def report(data: dict[str, Any]) -> str:
    """Every table of the process shape and the recovery, for the rendezvous suite."""
    processes = data.get("processes")
    if processes is None:
        return ""
    load = processes["load_average"]
    parts = [
        f"Process shape (one process and one handler per node; medians of "
        f"{processes['repeats']} groups per contender and N, interleaved; code "
        f"{processes['code']}; load average {load['before']} before, {load['after']} after; "
        f"{processes.get('seconds', 0):.0f} s):",
        table(processes),
        "Start-up of each group (medians):",
        startup_table(processes),
        "Seconds in each shape, same run (medians):",
        comparison_table(data),
        "Compared with (not asserted):",
        goals_table(processes),
    ]
    if "recovery" in processes:
        recovered = processes["recovery"]
        parts += [
            f"Recovery at N = {recovered['nodes']} processes (min_nodes N-1; each step bounded "
            f"by {recovered['wait']} s):",
            recovery_table(processes),
        ]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------ command line


async def _main(args: argparse.Namespace) -> None:
    from servers import start_servers

    started = time.perf_counter()
    with start_servers() as servers:
        data: dict[str, Any] = {"load_average_start": load_average()}
        if args.threads:
            print("threads shape", flush=True)
            data.update(
                await rendezvous.run(
                    servers,
                    quick=False,
                    names=HANDLERS,
                    nodes=args.nodes,
                )
            )
        print("process shape", flush=True)
        data["processes"] = await run(
            servers,
            quick=False,
            nodes=args.nodes,
            repeats=args.repeats,
            recovery_nodes=args.recovery,
        )
    if args.code:
        data["code"] = data["processes"]["code"] = args.code
    data["seconds"] = round(time.perf_counter() - started, 1)
    data["load_average_end"] = load_average()
    write_json(args.output, data)
    if args.threads:
        print("\n" + rendezvous.table(data))
    print("\n" + report(data))
    print(f"\nwrote {args.output} ({data['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=list(NODES))
    parser.add_argument("--repeats", type=int, default=REPEATS, help="groups per contender and N")
    parser.add_argument(
        "--recovery", type=int, default=RECOVERY_NODES, help="N of the recovery (0: none)"
    )
    parser.add_argument(
        "--no-threads",
        dest="threads",
        action="store_false",
        help="leave out the threads shape at the same N",
    )
    parser.add_argument(
        "--code",
        help="what the results file says was measured (by default the commit of the rdzv that "
        "`import rdzv` finds, as `harness.code_version` tells it)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "rendezvous-processes.json", help="results file"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
