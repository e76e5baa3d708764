"""One participant process of `test_rounds_chaos.py`: join, record the round, join again.

`python rounds_chaos_worker.py '<Config as JSON>'` connects to etcd through its own proxies and
loops forever: join a round, append what it got to its results file (JSON lines, flushed), then
either sleep a little or wait for a departure from its round, and join again. A failed join is
recorded too. It never leaves on purpose: the test kills it. A watchdog thread ends it at once
when its parent (the test) is gone or its deadline has passed, so a lost worker never lingers.

Every join carries the node info `s{slot}.i{incarnation}.j{join}`: the identity of the process
(its slot and incarnation, which survive its own re-leases) and the number of the join, so that
the test can tell whose every member of a round is, even members that never reported: after
each join the worker reads the round's members back (`read_members`), unless etcd is down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import sys
import threading
import time
from typing import IO, Any

import rdzv

# Seconds between the watchdog's looks at the parent and the deadline.
_WATCH_INTERVAL = 0.5
# Seconds to pause after a failed join or connection, so a dead etcd is not hammered.
_ERROR_PAUSE = 0.1


@dataclasses.dataclass(frozen=True)
class Config:
    """What a participant process is told, as one JSON argument."""

    endpoints: str
    key_prefix: str
    run_id: str
    slot: int
    incarnation: int
    min_nodes: int
    max_nodes: int
    last_call_timeout: float
    lease_ttl: int
    join_timeout: float
    read_timeout: float
    results: str
    seed: int
    deadline: float
    """`time.time()` after which the process exits, whatever it is doing."""
    pause: float
    """The longest random pause between a completed join and the next."""
    wait_share: float
    """The share of completed joins followed by `wait_for_departure` instead of a pause."""

    @property
    def identity(self) -> str:
        """The participant: its slot and incarnation, the same over its own re-leases."""
        return f"s{self.slot}.i{self.incarnation}"

    def to_json(self) -> str:
        """The config as the process's argument."""
        return json.dumps(dataclasses.asdict(self))


class Recorder:
    """Appends one flushed JSON line per event to the results file."""

    def __init__(self, config: Config, file: IO[str]) -> None:
        self._base = {"who": config.identity, "pid": os.getpid()}
        self._file = file

    def __call__(self, event: str, **fields: Any) -> None:
        """Write one record and flush it, so a SIGKILL loses at most the line being written."""
        self._file.write(json.dumps({**self._base, "event": event, **fields}) + "\n")
        self._file.flush()


def _watchdog(parent: int, deadline: float) -> None:
    """End the process at once when the parent is gone or the deadline has passed."""
    while os.getppid() == parent and time.time() < deadline:
        time.sleep(_WATCH_INTERVAL)
    os._exit(3)


async def _participate(
    connection: rdzv.Connection, config: Config, chooser: random.Random, record: Recorder
) -> None:
    """Join round after round on one connection, recording each outcome."""
    node = rdzv.AsyncRendezvous(
        connection,
        config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        last_call_timeout=config.last_call_timeout,
        join_timeout=config.join_timeout,
        lease_ttl=config.lease_ttl,
        key_prefix=config.key_prefix,
    )
    for join in range(1, sys.maxsize):
        info = f"{config.identity}.j{join}"
        started = time.time()
        try:
            membership = await node.join(info.encode())
        except rdzv.RendezvousError as error:
            record(
                "error",
                join=join,
                error=type(error).__name__,
                message=str(error)[:300],
                started=started,
                ended=time.time(),
            )
            await asyncio.sleep(_ERROR_PAUSE)
            continue
        ended = time.time()
        try:
            members: tuple[rdzv.Member, ...] | None = await node.read_members(membership)
        except rdzv.RendezvousError:
            members = None  # etcd is down: the round's other members read it
        decision = membership._decision
        record(
            "joined",
            join=join,
            member_id=membership.member_id,
            round=membership.round,
            rank=membership.rank,
            world_size=membership.world_size,
            decision=[decision.view_revision, decision.size, decision.gaps, decision.ids],
            members=None if members is None else [member.id for member in members],
            infos=None if members is None else [m.info.decode(errors="replace") for m in members],
            started=started,
            ended=ended,
        )
        if chooser.random() < config.wait_share:
            try:
                await node.wait_for_departure(membership, timeout=config.join_timeout / 2)
            except rdzv.RendezvousError:
                await asyncio.sleep(_ERROR_PAUSE)
        else:
            await asyncio.sleep(chooser.uniform(0, config.pause))


async def _run(config: Config, record: Recorder) -> None:
    """Connect (again after a failure) and participate until killed."""
    chooser = random.Random(config.seed)
    record("started", started=time.time())
    while True:
        try:
            async with rdzv.connect(
                config.endpoints, read_timeout=config.read_timeout
            ) as connection:
                await _participate(connection, config, chooser, record)
        except rdzv.RendezvousError as error:
            record("connect error", error=type(error).__name__, ended=time.time())
            await asyncio.sleep(_ERROR_PAUSE)


def main(argv: list[str]) -> None:
    """Run the participant that the JSON argument describes."""
    config = Config(**json.loads(argv[1]))
    threading.Thread(
        target=_watchdog, args=(os.getppid(), config.deadline), name="watchdog", daemon=True
    ).start()
    with open(config.results, "a", encoding="utf-8") as file:
        asyncio.run(_run(config, Recorder(config, file)))


if __name__ == "__main__":
    main(sys.argv)
