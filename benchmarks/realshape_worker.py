"""One worker process of the real-shape benchmark (`realshape.py`): participants, each on a
connection of its own, as every torchrun agent is a process with its own connection; or, for
the shared shape, all on one connection that this process opens.

The parent writes one JSON line to stdin with the worker's settings, among them its `kind`:
`"rendezvous"` (an `rdzv.AsyncRendezvous` per participant, each on a connection of its own),
`"shared"` (the same participants, all on one connection) or `"floor"` (a connection per
participant, no rendezvous). The worker opens its connections and answers `{"event": "ready"}`
with how many it opened. Then each command is one JSON line in and one answer out:

- `{"op": "join", "at": T}`: at `time.monotonic() == T`, every participant joins (the
  rendezvous, on its own connection or the shared one) or grants a lease and puts one key on
  it (the floor). `time.monotonic` reads Linux's CLOCK_MONOTONIC, which every process of the
  machine shares, so the parent can give all workers one start time and compare the times
  they report.
- `{"op": "after_departure"}`: every participant waits until a member of its round is gone
  (`AsyncRendezvous.wait_for_departure`), then joins again.
- `{"op": "leave"}`: every participant leaves, then every connection closes, and the worker
  exits.

Every wait is bounded (`timeout` in the settings and in every command): a participant that fails or
runs out of time is reported with its error, never waited for forever. rdzv's log goes to
stderr, which the parent keeps in a file.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import rdzv

NODE_INFO_BYTES: Final = 64
# Opening a connection is a channel and one Status call; a few dozen at a time keep etcd's
# accept queue and this process's event loop from choking at thousands of connections.
OPENING_AT_ONCE: Final = 32
# Descriptors besides the connections' sockets: the interpreter, gRPC's own, the pipes.
SPARE_DESCRIPTORS: Final = 256

Message = dict[str, Any]

KINDS: Final = ("rendezvous", "shared", "floor")


@dataclasses.dataclass
class Participant:
    index: int
    connection: rdzv.Connection
    rendezvous: rdzv.AsyncRendezvous | None  # None for the floor
    membership: rdzv.Membership | None = None

    @property
    def info(self) -> bytes:
        return f"node-{self.index}".encode().ljust(NODE_INFO_BYTES, b".")


def raise_descriptor_limit(connections: int) -> None:
    """Let this process hold a socket per connection (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def open_participants(settings: Message) -> list[Participant]:
    """A participant per index: each on a connection of its own, or (`"shared"`) all on one."""
    if settings["kind"] not in KINDS:
        raise ValueError(f"unknown kind {settings['kind']!r}")
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def open_connection() -> rdzv.Connection:
        connection = rdzv.connect(
            settings["endpoints"], connect_timeout=settings["connect_timeout"]
        )
        async with gate:
            await connection.open()
        return connection

    shared = await open_connection() if settings["kind"] == "shared" else None

    async def open_one(index: int) -> Participant:
        connection = shared if shared is not None else await open_connection()
        return Participant(index, connection, make_rendezvous(settings, connection))

    return list(await asyncio.gather(*(open_one(index) for index in settings["indices"])))


def connections(participants: list[Participant]) -> list[rdzv.Connection]:
    """The participants' connections, each once (one for the shared shape)."""
    return list({id(p.connection): p.connection for p in participants}.values())


def make_rendezvous(settings: Message, connection: rdzv.Connection) -> rdzv.AsyncRendezvous | None:
    if settings["kind"] == "floor":
        return None
    return rdzv.AsyncRendezvous(
        connection,
        settings["run_id"],
        min_nodes=settings["min_nodes"],
        max_nodes=settings["max_nodes"],
        last_call_timeout=settings["last_call_timeout"],
        join_timeout=settings["timeout"],
        lease_ttl=settings["lease_ttl"],
    )


# --------------------------------------------------------------------------- what each does


async def join(participant: Participant, settings: Message) -> Message:
    if participant.rendezvous is None:
        return await floor(participant, settings)
    membership = await participant.rendezvous.join(participant.info)
    participant.membership = membership
    return {
        "member_id": membership.member_id,
        "rank": membership.rank,
        "world_size": membership.world_size,
        "round": membership.round,
        "done_at": time.monotonic(),
    }


async def floor(participant: Participant, settings: Message) -> Message:
    """The least a join can cost etcd: a lease, and one key on it."""
    connection = participant.connection
    lease = await connection.grant_lease(settings["lease_ttl"])
    key = f"/rdzv-floor/{settings['run_id']}/{participant.index}".encode()
    await connection.put(key, participant.info, lease=lease)
    return {"member_id": lease, "done_at": time.monotonic()}


async def rejoin_after_departure(participant: Participant, settings: Message) -> Message:
    assert participant.rendezvous is not None
    assert participant.membership is not None
    departed = await participant.rendezvous.wait_for_departure(
        participant.membership, timeout=settings["timeout"]
    )
    if not departed:
        raise TimeoutError("no departure seen")
    departed_at = time.monotonic()
    return {**await join(participant, settings), "departed_at": departed_at}


def error_kind(error: BaseException) -> str:
    """The error's class, and its gRPC code when it has one: how errors are counted."""
    code = getattr(error, "code", None)
    return f"{type(error).__name__}" + (f" {code}" if code else "")


async def every(
    participants: list[Participant],
    action: Callable[[Participant], Awaitable[Message]],
    timeout: float,
) -> Message:
    """`action` for every participant at once, each within `timeout`; outcomes and errors."""

    async def one(participant: Participant) -> Message:
        try:
            return await asyncio.wait_for(action(participant), timeout)
        except Exception as error:  # counted and reported, so the run fails with its reason
            return {"error": error_kind(error), "message": str(error)[:300]}

    cpu = time.process_time()
    outcomes = await asyncio.gather(*(one(p) for p in participants))
    errors = collections.Counter(o["error"] for o in outcomes if "error" in o)
    examples = {o["error"]: o["message"] for o in outcomes if "error" in o}
    return {
        "event": "done",
        "outcomes": [o for o in outcomes if "error" not in o],
        "errors": dict(errors),
        "error_examples": examples,
        # Every thread of the process: asyncio's, gRPC's.
        "cpu": time.process_time() - cpu,
    }


async def leave(participants: list[Participant], timeout: float) -> None:
    """Every participant leaves, then every connection closes: a shared connection closes only
    when all its participants are done with it."""

    async def one(participant: Participant) -> None:
        try:
            if participant.rendezvous is not None:
                await asyncio.wait_for(participant.rendezvous.leave(), timeout)
        except Exception:
            pass  # the server is thrown away after the run: what it keeps does not matter

    try:
        await asyncio.gather(*(one(p) for p in participants))
    finally:
        await asyncio.gather(*(c.aclose() for c in connections(participants)))


# ------------------------------------------------------------------------------ the protocol


def send(message: Message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def receive() -> Message | None:
    line = await asyncio.to_thread(sys.stdin.readline)
    return json.loads(line) if line.strip() else None  # None: the parent is gone


async def serve(settings: Message, participants: list[Participant]) -> None:
    while (command := await receive()) is not None:
        op, timeout = command["op"], float(command["timeout"])
        if op == "leave":
            await leave(participants, timeout)
            send({"event": "left"})
            return
        if op == "join":
            started = await wait_until(command["at"])
            answer = await every(participants, lambda p: join(p, settings), timeout)
            send({**answer, "late": started - command["at"]})
        elif op == "after_departure":
            answer = await every(
                participants, lambda p: rejoin_after_departure(p, settings), timeout
            )
            send(answer)
        else:
            send({"event": "failed", "reason": f"unknown command {op!r}"})
    await leave(participants, settings["timeout"])


async def wait_until(at: float) -> float:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    return time.monotonic()


async def main() -> None:
    settings = await receive()
    if settings is None:
        return
    raise_descriptor_limit(len(settings["indices"]))
    started = time.monotonic()
    try:
        participants = await open_participants(settings)
    except Exception as error:
        send({"event": "failed", "reason": f"opening connections: {error_kind(error)}: {error}"})
        return
    send(
        {
            "event": "ready",
            "open_seconds": time.monotonic() - started,
            "connections": len(connections(participants)),
        }
    )
    await serve(settings, participants)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main())
