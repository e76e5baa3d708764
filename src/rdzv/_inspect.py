"""Reading a rendezvous state without trusting it, for `rdzv inspect` and `rdzv watch`.

PyTorch's `DynamicRendezvousHandler` stores its state as a pickle of `_RendezvousState`, and
unpickling runs whatever code a pickle names. Here a pickle is read by `_RestrictedUnpickler`,
which resolves only the five globals such a state is made of, to local stand-ins (torch is never
imported) or to the standard library's `datetime` classes; any other global is refused before
anything is called. The stand-ins are then checked field by field and turned into `TorchState`.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, Final

from rdzv import _envelope
from rdzv._errors import RendezvousStateError
from rdzv._etcd import Connection, KeyValue

TORCH_MODULE: Final = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

# The first byte of every pickle of protocol 2 or later (the PROTO opcode); torch writes 4 or 5.
_PROTO: Final = 0x80


def printable(text: str) -> str:
    """`text` with control characters escaped, so that a hostile value cannot drive a terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class NotATorchStateError(ValueError):
    """The payload is a pickle, but not a PyTorch dynamic-rendezvous state (or a hostile one)."""


class _PickledState:
    """Stand-in for torch's `_RendezvousState`: unpickling fills its `__dict__`, nothing more."""


class _PickledNode:
    """Stand-in for torch's `_NodeDesc`: unpickling fills its `__dict__`, nothing more."""


# Everything a pickled `_RendezvousState` names (timezone.utc pickles as timezone(timedelta(0))).
_ALLOWED_GLOBALS: Final[Mapping[tuple[str, str], type]] = {
    (TORCH_MODULE, "_RendezvousState"): _PickledState,
    (TORCH_MODULE, "_NodeDesc"): _PickledNode,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a rendezvous state, and refuses the rest.

    A pickle can only call what a global resolves to, so refusing every other global before it
    is looked up means that no code named by the pickle ever runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global '{printable(module)}.{printable(name)}'"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


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


def looks_like_pickle(payload: bytes) -> bool:
    """Whether `payload` starts like a pickle of protocol 2 or later."""
    return len(payload) >= 2 and payload[0] == _PROTO and 2 <= payload[1] <= pickle.HIGHEST_PROTOCOL


def load_torch_state(payload: bytes) -> TorchState:
    """Decode a pickled PyTorch rendezvous state without running any code it names.

    Raises `NotATorchStateError` saying why, for a hostile pickle as for any other.
    """
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except pickle.UnpicklingError as error:
        raise NotATorchStateError(f"not a PyTorch rendezvous state: {error}") from None
    except Exception as error:  # a broken pickle fails in many ways; none of them runs code
        raise NotATorchStateError(
            f"not a PyTorch rendezvous state: the pickle is malformed ({type(error).__name__}: "
            f"{error})"
        ) from None
    if not isinstance(loaded, _PickledState):
        raise NotATorchStateError(
            f"not a PyTorch rendezvous state: the pickle holds a {type(loaded).__name__}"
        )
    return _checked_state(vars(loaded))


def _fail(field: str, expected: str, value: object) -> NotATorchStateError:
    return NotATorchStateError(
        f"not a PyTorch rendezvous state: its {field} is a {type(value).__name__}, not {expected}"
    )


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
    if not isinstance(value, _PickledNode):
        raise _fail(field, "a node", value)
    fields = vars(value)
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
        return dataclasses.replace(inspection, error=str(error))
    signed = bool(kv.value[5] & _envelope.FLAG_HMAC_SHA256)
    inspection = dataclasses.replace(inspection, state_size=len(payload), signed=signed)
    if not looks_like_pickle(payload):
        return inspection
    try:
        return dataclasses.replace(inspection, torch=load_torch_state(payload))
    except NotATorchStateError as error:
        return dataclasses.replace(inspection, error=str(error))


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
        f"key           {inspection.key}",
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
