"""Reading a rendezvous state without trusting it, for `rdzv inspect` and `rdzv watch`.

PyTorch's `DynamicRendezvousHandler` stores its state as a pickle of `_RendezvousState`, which
anyone who can write to the key can replace with any bytes. `rdzv._safe_pickle` reads the pickle
without running anything; this module checks what it read field by field and turns it into
`TorchState`, then into a report of the key: its envelope, its lease and its state.

`examine` never raises on any stored value: what cannot be shown becomes `Inspection.error`, a
single line of printable characters. `summary`, `to_text` and `to_json` only format what
`examine` checked.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Any

from rdzv import _envelope
from rdzv._errors import RendezvousStateError
from rdzv._etcd import Connection, KeyValue
from rdzv._safe_pickle import (
    NotATorchStateError,
    PickledNode,
    UnsafeStateError,
    looks_like_pickle,
    name_of,
    not_a_state,
    printable,
    read_state,
    shown,
)

# The two errors are the reader's; they are named here too, since `load_torch_state` raises them.
__all__ = [
    "Inspection",
    "NodeDesc",
    "NotATorchStateError",
    "TorchState",
    "UnsafeStateError",
    "examine",
    "inspect_key",
    "load_torch_state",
    "summary",
    "to_json",
    "to_text",
]


@dataclasses.dataclass(frozen=True, order=True)
class NodeDesc:
    """A node of the rendezvous, as torch names it: `addr_pid_localid`."""

    addr: str
    pid: int
    local_id: int

    def __str__(self) -> str:
        return f"{printable(self.addr)}_{self.pid}_{self.local_id}"


@dataclasses.dataclass(frozen=True)
class TorchState:
    """The fields of a PyTorch `_RendezvousState`, checked."""

    round: int
    complete: bool
    deadline: datetime.datetime | None
    closed: bool
    participants: dict[NodeDesc, int]
    wait_list: frozenset[NodeDesc]
    redundancy_list: frozenset[NodeDesc]
    last_heartbeats: dict[NodeDesc, datetime.datetime]


def load_torch_state(payload: bytes) -> TorchState:
    """Decode a pickled PyTorch rendezvous state without running any code it names.

    Raises `NotATorchStateError` saying why, on one line, for any payload; `UnsafeStateError`,
    its subclass, for a pickle that exceeds a limit of the reader or targets its classes.
    """
    try:
        return _checked_state(read_state(payload))
    except NotATorchStateError:
        raise
    except Exception as error:  # not expected: a mistake of the reader or the checks
        raise not_a_state(
            f"the pickle cannot be read ({type(error).__name__}: {shown(str(error))})"
        ) from None


# ------------------------------------------------------------------------------ the checks


def _fail(field: str, expected: str, value: object) -> NotATorchStateError:
    return not_a_state(f"its {field} is a {name_of(value)}, not {expected}")


def _int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, "an int", value)
    return value


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "a bool", value)
    return value


def _time(field: str, value: object) -> datetime.datetime:
    if not isinstance(value, datetime.datetime):
        raise _fail(field, "a datetime", value)
    return value


def _node(field: str, value: object) -> NodeDesc:
    if not isinstance(value, PickledNode):
        raise _fail(field, "a node", value)
    fields = value.fields
    addr = fields.get("addr")
    if not isinstance(addr, str):
        raise _fail(f"{field}'s addr", "a str", addr)
    return NodeDesc(
        addr,
        _int(f"{field}'s pid", fields.get("pid")),
        _int(f"{field}'s id", fields.get("local_id")),
    )


def _nodes(field: str, value: object) -> frozenset[NodeDesc]:
    if not isinstance(value, set | frozenset):
        raise _fail(field, "a set", value)
    return frozenset(_node(f"a node of its {field}", item) for item in value)


def _node_map(field: str, value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _fail(field, "a dict", value)
    return value


def _checked_state(fields: dict[str, Any]) -> TorchState:
    deadline = fields.get("deadline")
    participants = _node_map("participants", fields.get("participants"))
    heartbeats = _node_map("last_heartbeats", fields.get("last_heartbeats"))
    return TorchState(
        round=_int("round", fields.get("round")),
        complete=_bool("complete", fields.get("complete")),
        deadline=None if deadline is None else _time("deadline", deadline),
        closed=_bool("closed", fields.get("closed")),
        participants={
            _node("participant", node): _int("rank", rank) for node, rank in participants.items()
        },
        wait_list=_nodes("wait_list", fields.get("wait_list")),
        # Older torch versions have no redundancy list.
        redundancy_list=_nodes("redundancy_list", fields.get("redundancy_list", set())),
        last_heartbeats={
            _node("heartbeat node", node): _time("heartbeat", at) for node, at in heartbeats.items()
        },
    )


# -------------------------------------------------------------------------------- a report


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What is known of the state at one key at one moment."""

    key: str
    revision: int
    create_revision: int
    version: int
    size: int
    read_at: datetime.datetime
    state_size: int | None = None
    signed: bool | None = None
    lease_id: int | None = None
    lease_seconds_left: int | None = None
    torch: TorchState | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        """`"torch"`, `"opaque"` (a state that is not a pickle), or `"unreadable"`."""
        if self.torch is not None:
            return "torch"
        return "unreadable" if self.error is not None else "opaque"


def examine(
    kv: KeyValue,
    key: str,
    *,
    state_key: bytes | None = None,
    read_at: datetime.datetime | None = None,
    lease_seconds_left: int | None = None,
) -> Inspection:
    """Describe the value `kv` read at `key`: its envelope, then its payload if it is a pickle."""
    inspection = Inspection(
        key=key,
        revision=kv.mod_revision,
        create_revision=kv.create_revision,
        version=kv.version,
        size=len(kv.value),
        read_at=read_at or datetime.datetime.now(datetime.timezone.utc),
        lease_id=kv.lease or None,
        lease_seconds_left=lease_seconds_left,
    )
    try:
        payload = _envelope.decode(kv, key, state_key)
    except RendezvousStateError as error:
        return dataclasses.replace(inspection, error=_one_line(str(error)))
    signed = bool(kv.value[5] & _envelope.FLAG_HMAC_SHA256)
    inspection = dataclasses.replace(inspection, state_size=len(payload), signed=signed)
    if not looks_like_pickle(payload):
        return inspection
    try:
        return dataclasses.replace(inspection, torch=load_torch_state(payload))
    except NotATorchStateError as error:  # load_torch_state raises nothing else
        return dataclasses.replace(inspection, error=_one_line(str(error)))


def _one_line(message: str) -> str:
    """`message` escaped: an error is shown on one line, and drives no terminal."""
    return printable(message)


async def inspect_key(
    connection: Connection, key: str, *, state_key: bytes | None = None
) -> Inspection | None:
    """Read the state at `key` and the time left on its lease; `None` if there is no state."""
    kv = await connection.get(key.encode())
    if kv is None:
        return None
    read_at = datetime.datetime.now(datetime.timezone.utc)
    seconds_left = await connection.lease_time_to_live(kv.lease) if kv.lease else None
    return examine(kv, key, state_key=state_key, read_at=read_at, lease_seconds_left=seconds_left)


# ---------------------------------------------------------------------------- presentation


def _age(inspection: Inspection, at: datetime.datetime) -> float:
    if at.tzinfo is None:  # torch writes aware UTC times; a naive one is taken as UTC
        at = at.replace(tzinfo=datetime.timezone.utc)
    return round((inspection.read_at - at).total_seconds(), 3)


def _node_json(
    inspection: Inspection, state: TorchState, node: NodeDesc, **extra: object
) -> dict[str, object]:
    heartbeat = state.last_heartbeats.get(node)
    return {
        "node": str(node),
        "addr": node.addr,
        "pid": node.pid,
        "local_id": node.local_id,
        **extra,
        "heartbeat_age": None if heartbeat is None else _age(inspection, heartbeat),
    }


def _by_rank(state: TorchState) -> list[tuple[NodeDesc, int]]:
    return sorted(state.participants.items(), key=lambda item: (item[1], item[0]))


def to_json(inspection: Inspection) -> dict[str, object]:
    """A JSON-ready description (see the CLI docs for its fields)."""
    lease: dict[str, object] | None = None
    if inspection.lease_id is not None:
        lease = {"id": inspection.lease_id, "seconds_left": inspection.lease_seconds_left}
    torch: dict[str, object] | None = None
    state = inspection.torch
    if state is not None:
        torch = {
            "round": state.round,
            "complete": state.complete,
            "closed": state.closed,
            "deadline": None if state.deadline is None else state.deadline.isoformat(),
            "participants": [
                _node_json(inspection, state, node, rank=rank) for node, rank in _by_rank(state)
            ],
            "wait_list": [_node_json(inspection, state, node) for node in sorted(state.wait_list)],
            "redundancy_list": [
                _node_json(inspection, state, node) for node in sorted(state.redundancy_list)
            ],
            "last_heartbeats": {
                str(node): _age(inspection, at)
                for node, at in sorted(state.last_heartbeats.items())
            },
        }
    return {
        "key": inspection.key,
        "revision": inspection.revision,
        "create_revision": inspection.create_revision,
        "version": inspection.version,
        "size": inspection.size,
        "state_size": inspection.state_size,
        "signed": inspection.signed,
        "lease": lease,
        "kind": inspection.kind,
        "torch": torch,
        "error": inspection.error,
    }


def _lease_text(inspection: Inspection) -> str:
    if inspection.lease_id is None:
        return "none (the state never expires)"
    left = inspection.lease_seconds_left
    if left is None:
        return f"{inspection.lease_id:x}"
    if left < 0:
        return f"{inspection.lease_id:x}, expired"
    return f"{left} s left (lease {inspection.lease_id:x})"


def _heartbeat_text(inspection: Inspection, state: TorchState, node: NodeDesc) -> str:
    heartbeat = state.last_heartbeats.get(node)
    if heartbeat is None:
        return "no heartbeat"
    return f"last heartbeat {_age(inspection, heartbeat):.1f} s ago"


def _node_lines(
    inspection: Inspection, state: TorchState, title: str, nodes: Iterable[NodeDesc]
) -> list[str]:
    listed = sorted(nodes)
    lines = [f"{title} ({len(listed)})" + (":" if listed else "")]
    width = max((len(str(node)) for node in listed), default=0)
    lines += [f"  {node!s:<{width}}  {_heartbeat_text(inspection, state, node)}" for node in listed]
    return lines


def to_text(inspection: Inspection) -> list[str]:
    """A human-readable description, one item per line."""
    lines = [
        f"key           {printable(inspection.key)}",
        f"revision      {inspection.revision} (created at {inspection.create_revision}, "
        f"version {inspection.version})",
    ]
    if inspection.state_size is None:
        lines.append(f"size          {inspection.size} bytes")
    else:
        signed = ", signed" if inspection.signed else ""
        lines.append(
            f"size          {inspection.size} bytes ({inspection.state_size}-byte state{signed})"
        )
    lines.append(f"lease         {_lease_text(inspection)}")
    state = inspection.torch
    if state is None:
        kind = {"opaque": "not a PyTorch rendezvous state", "unreadable": "unreadable"}
        lines.append(f"state         {kind[inspection.kind]}")
        return lines
    flags = ", ".join(
        ["complete" if state.complete else "not complete", "closed" if state.closed else "open"]
    )
    lines.append(f"state         PyTorch dynamic rendezvous, round {state.round}, {flags}")
    if state.deadline is not None:
        left = -_age(inspection, state.deadline)
        lines.append(f"deadline      {state.deadline.isoformat()} ({left:+.1f} s)")
    ranked = _by_rank(state)
    lines.append(f"participants ({len(ranked)})" + (":" if ranked else ""))
    width = max((len(str(node)) for node, _ in ranked), default=0)
    lines += [
        f"  rank {rank:<4} {node!s:<{width}}  {_heartbeat_text(inspection, state, node)}"
        for node, rank in ranked
    ]
    lines += _node_lines(inspection, state, "wait list", state.wait_list)
    lines += _node_lines(inspection, state, "redundancy list", state.redundancy_list)
    return lines


def summary(inspection: Inspection) -> str:
    """One line: the revision, the size and, for a torch state, its round and members."""
    line = f"revision {inspection.revision}  size {inspection.size}"
    state = inspection.torch
    if state is not None:
        line += (
            f"  round {state.round}"
            f"  {'complete' if state.complete else 'joining'}"
            f"{'  closed' if state.closed else ''}"
            f"  participants {len(state.participants)}"
            f"  waiting {len(state.wait_list)}"
            f"  redundant {len(state.redundancy_list)}"
        )
    elif inspection.error is not None:
        line += f"  error: {inspection.error}"
    return line
