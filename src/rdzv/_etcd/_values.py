"""Typed values for etcd's key-value API: keys, transaction conditions and operations, events.

They replace aetcd's operator-overloading transaction DSL, which cannot be typed, and are turned
into etcd's protobuf messages here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final, Literal

from aetcd import rpc


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """A key as etcd stores it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclasses.dataclass(frozen=True)
class Compare:
    """One condition of a transaction: `target(key) op operand`."""

    key: bytes
    target: Literal["mod_revision", "create_revision", "version", "value"]
    op: Literal["==", "!=", "<", ">"]
    operand: int | bytes
    range_end: bytes = b""
    """With a range end, the condition must hold for every key in [key, range_end)."""

    @classmethod
    def mod_revision_is(cls, key: bytes, revision: int) -> Compare:
        """The key was last written at `revision`."""
        return cls(key, "mod_revision", "==", revision)

    @classmethod
    def absent(cls, key: bytes) -> Compare:
        """The key does not exist."""
        return cls(key, "create_revision", "==", 0)

    @classmethod
    def value_is(cls, key: bytes, value: bytes) -> Compare:
        """The key exists and holds `value`."""
        return cls(key, "value", "==", value)

    @classmethod
    def prefix_empty(cls, prefix: bytes) -> Compare:
        """No key starts with `prefix`.

        etcd compares an empty range as one absent key (create revision 0), and every existing
        key has a create revision above 0: so the condition holds exactly when none exists.
        """
        return cls(prefix, "create_revision", "==", 0, range_end=prefix_end(prefix))


@dataclasses.dataclass(frozen=True)
class Put:
    """Write `value` at `key`, attached to `lease` (0 for none)."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Get:
    """Read `key` (or every key under the prefix `key`); with `count_only`, only count them.

    With a `limit`, at most that many keys (in key order); the count is still of them all.
    """

    key: bytes
    prefix: bool = False
    count_only: bool = False
    limit: int = 0


@dataclasses.dataclass(frozen=True)
class Delete:
    """Delete `key` (or every key under the prefix `key`)."""

    key: bytes
    prefix: bool = False


@dataclasses.dataclass(frozen=True)
class Nested:
    """A transaction inside a transaction: if every `compare` holds, `success`, else `failure`.

    It lets one round trip do a conditional write that the outer conditions do not decide,
    such as "join, and take the coordinator's key if nobody holds it".
    """

    compare: tuple[Compare, ...]
    success: tuple[Put | Get | Delete, ...]
    failure: tuple[Put | Get | Delete, ...] = ()


Operation = Put | Get | Delete | Nested


@dataclasses.dataclass(frozen=True)
class TxnResult:
    """What a transaction did.

    `revision` is etcd's revision after the transaction: the new mod revision of the keys that a
    successful write put. `ranges` holds, for each operation of the branch that ran, the keys a
    `Get` read (empty for `Put` and `Delete`), and `counts` how many keys each `Get` found (0
    for `Put` and `Delete`).
    """

    succeeded: bool
    revision: int
    ranges: tuple[tuple[KeyValue, ...], ...]
    counts: tuple[int, ...] = ()
    nested: tuple[bool, ...] = ()
    """For each operation, whether it is a `Nested` transaction whose conditions held."""


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One change of a watched key.

    For a deletion, `deleted` is true, `kv.value` is empty and `kv.mod_revision` is the revision
    of the deletion.
    """

    kv: KeyValue
    deleted: bool


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


_COMPARE_OPS: Final = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def txn_request(
    compare: Sequence[Compare], success: Sequence[Operation], failure: Sequence[Operation]
) -> Any:
    # Filled in place: handing protobuf a finished sub-message (RequestOp(request_put=put))
    # copies it, which costs milliseconds for a 1 MiB state.
    request = rpc.TxnRequest()
    for condition in compare:
        _fill_compare(request.compare.add(), condition)
    for branch, operations in ((request.success, success), (request.failure, failure)):
        for operation in operations:
            _fill_operation(branch.add(), operation)
    return request


def _fill_compare(message: Any, compare: Compare) -> None:
    message.key = compare.key
    message.range_end = compare.range_end
    message.result = _COMPARE_OPS[compare.op]
    if compare.target == "value":
        message.target = rpc.Compare.VALUE
        message.value = bytes(compare.operand)
    elif compare.target == "version":
        message.target = rpc.Compare.VERSION
        message.version = int(compare.operand)
    elif compare.target == "create_revision":
        message.target = rpc.Compare.CREATE
        message.create_revision = int(compare.operand)
    else:
        message.target = rpc.Compare.MOD
        message.mod_revision = int(compare.operand)


def fill_range(message: Any, key: bytes, *, prefix: bool = False, revision: int = 0) -> Any:
    message.key = key
    if prefix:
        message.range_end = prefix_end(key)
    message.revision = revision
    return message


def _fill_operation(message: Any, operation: Operation) -> None:
    if isinstance(operation, Put):
        message.request_put.key = operation.key
        message.request_put.value = operation.value
        message.request_put.lease = operation.lease
    elif isinstance(operation, Get):
        fill_range(message.request_range, operation.key, prefix=operation.prefix)
        message.request_range.count_only = operation.count_only
        message.request_range.limit = operation.limit
    elif isinstance(operation, Nested):
        nested = message.request_txn
        for condition in operation.compare:
            _fill_compare(nested.compare.add(), condition)
        for branch, operations in (
            (nested.success, operation.success),
            (nested.failure, operation.failure),
        ):
            for inner in operations:
                _fill_operation(branch.add(), inner)
    else:
        message.request_delete_range.key = operation.key
        if operation.prefix:
            message.request_delete_range.range_end = prefix_end(operation.key)


def key_value(message: Any) -> KeyValue:
    return KeyValue(
        key=message.key,
        value=message.value,
        create_revision=message.create_revision,
        mod_revision=message.mod_revision,
        version=message.version,
        lease=message.lease,
    )
