"""`rdzv reset`: find, and delete, the rendezvous state (and optionally the store keys) of a job.

A job's keys, by run id `R`:

- the state of PyTorch's dynamic rendezvous (torchrun's `etcd-v3`): the one key
  `{key_prefix}/R`;
- the rounds of `rdzv.AsyncRendezvous`: every key under `{rounds_prefix}/R/`;
- its store keys (with `store_prefix`): torch's rendezvous names them
  `torch.rendezvous.R.{round}/...` under the store prefix (torchrun's `etcd-v3-rounds`:
  `R/round-{round}/...`), and rdzv's store keeps its write
  markers and queues for them, with the same names, under the store prefix followed by a NUL
  and `rdzv-.../`.

`plan` lists the keys; `delete` deletes exactly the listed ones, so that what was shown is what
goes (a key written since is left alone).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Final

import anyio

from rdzv._errors import RendezvousError
from rdzv._etcd import Connection
from rdzv._store import _MARKERS, _QUEUE_ITEMS, _QUEUES

__all__ = ["Group", "delete", "plan", "shown", "to_text"]

_CONCURRENT_DELETES: Final = 32
_SHOWN_KEYS: Final = 10
_ROUND: Final = re.compile(rb"\d+/")


@dataclasses.dataclass(frozen=True)
class Group:
    """Keys of one kind that a reset deletes."""

    what: str
    """What they are: `torch rendezvous state`, `rendezvous rounds`, `store`."""
    where: str
    """The key, or the prefix they are under."""
    keys: tuple[bytes, ...]


def shown(key: bytes) -> str:
    """A key for a terminal: control characters (the store's NUL) escaped."""
    text = key.decode(errors="backslashreplace")
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


async def _torch_state(connection: Connection, key_prefix: str, run_id: str) -> Group:
    key = f"{key_prefix}/{run_id}".encode()
    found = await connection.get(key)
    return Group("torch rendezvous state", key.decode(), (key,) if found else ())


async def _rounds(connection: Connection, rounds_prefix: str, run_id: str) -> Group:
    base = f"{rounds_prefix}/{run_id}/".encode()
    kvs, _ = await connection.range(base, prefix=True)
    return Group("rendezvous rounds", f"{base.decode()}*", tuple(kv.key for kv in kvs))


async def _store(connection: Connection, store_prefix: str, run_id: str) -> Group:
    keys: list[bytes] = []
    for area in ("", _MARKERS, _QUEUES, _QUEUE_ITEMS):
        for name in (
            f"torch.rendezvous.{run_id}.",  # torch's DynamicRendezvousHandler
            f"{run_id}/round-",  # torchrun's etcd-v3-rounds
        ):
            base = f"{store_prefix}{area}{name}".encode()
            kvs, _ = await connection.range(base, prefix=True)
            # Run id "job" must not take run id "job.2"'s keys: a round number follows the dot.
            keys += [kv.key for kv in kvs if _ROUND.match(kv.key, len(base))]
    where = f"{store_prefix}torch.rendezvous.{run_id}.*, {store_prefix}{run_id}/round-*"
    return Group("store", where, tuple(keys))


async def plan(
    connection: Connection,
    run_id: str,
    *,
    key_prefix: str,
    rounds_prefix: str,
    store_prefix: str | None,
) -> tuple[Group, ...]:
    """The keys of `run_id` that a reset deletes; the store's only with `store_prefix`."""
    groups = [
        await _torch_state(connection, key_prefix, run_id),
        await _rounds(connection, rounds_prefix, run_id),
    ]
    if store_prefix is not None:
        groups.append(await _store(connection, store_prefix, run_id))
    return tuple(groups)


async def delete(connection: Connection, groups: Sequence[Group]) -> int:
    """Delete the keys of `groups`, a few at a time; how many were still there.

    If etcd refuses or fails a delete, the others go on, and the first failure is raised,
    saying how many keys were deleted (a `RendezvousError`, as every other failure).
    """
    counts: list[int] = []
    failures: list[RendezvousError] = []
    limiter = anyio.CapacityLimiter(_CONCURRENT_DELETES)

    async def one(key: bytes) -> None:
        async with limiter:
            try:
                counts.append(await connection.delete(key))
            except RendezvousError as error:
                failures.append(error)

    async with anyio.create_task_group() as group:
        for key in [key for kind in groups for key in kind.keys]:
            group.start_soon(one, key)
    if failures:
        raise RendezvousError(
            f"{len(failures)} of {len(counts) + len(failures)} deletes failed "
            f"({sum(counts)} keys deleted); the first: {failures[0]}"
        ) from failures[0]
    return sum(counts)


def to_text(groups: Sequence[Group]) -> Iterator[str]:
    """The plan for a terminal: each group's count and where, then its first keys."""
    for group in groups:
        count = len(group.keys)
        yield f"{group.what}: {count} key{'' if count == 1 else 's'}  ({group.where})"
        for key in group.keys[:_SHOWN_KEYS]:
            yield f"  {shown(key)}"
        if count > _SHOWN_KEYS:
            yield f"  ... and {count - _SHOWN_KEYS} more"
