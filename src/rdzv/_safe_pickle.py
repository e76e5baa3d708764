"""A pickle reader that runs nothing, for PyTorch's rendezvous state.

PyTorch's `DynamicRendezvousHandler` stores its state as a pickle of `_RendezvousState`, and
unpickling runs whatever code a pickle names. Whoever can write to the key can write any bytes
there, so rdzv never hands a state to `pickle`: `_Reader` interprets the pickle's opcodes itself.
It resolves only the five globals such a state is made of, to local stand-ins (torch is never
imported) or to the standard library's `datetime` classes, refuses any other global before
anything is called, and bounds everything a hostile pickle could make it spend (see "Limits"
below). `read_state` returns the state's fields as the pickle gave them; checking them is the
caller's job (`rdzv._inspect`).
"""

from __future__ import annotations

import datetime
import pickle
import pickletools
import struct
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Final

__all__ = [
    "MAX_STATE_BYTES",
    "TORCH_MODULE",
    "NotATorchStateError",
    "PickledNode",
    "PickledState",
    "UnsafeStateError",
    "looks_like_pickle",
    "name_of",
    "not_a_state",
    "printable",
    "read_state",
    "shown",
]

TORCH_MODULE: Final = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

# The first byte of every pickle of protocol 2 or later (the PROTO opcode); torch writes 4 or 5.
_PROTO: Final = 0x80

# ------------------------------------------------------------------------------------- limits
#
# What a hostile pickle could make the reader spend, and the bound on each. Real states are well
# inside them: one of 10,000 nodes is a 0.75 MiB pickle of 240,000 opcodes that the reader reads
# in about 0.25 s into 14 MiB of objects (21 MiB by the estimate below), nesting 3 deep, with no
# string longer than a host name. States of up to about 19,000 nodes (1.4 MiB, near etcd's
# default limit on a value, --max-request-bytes 1.5 MiB) fit; the worst hostile pickles measured
# take under 0.7 s and 41 MiB (tracemalloc) before they are refused.

# The largest state read at all: etcd's default limit on a value, with room for a raised one.
MAX_STATE_BYTES: Final = 4 * 1024 * 1024
# Opcodes per pickle: the bound on time (the reader runs one to two million a second).
_MAX_OPCODES: Final = 600_000
# Memo indices (pickle numbers memoized objects 0, 1, 2, ...: never past the opcode count).
_MAX_MEMO_INDEX: Final = _MAX_OPCODES
# Elements of one list, tuple, dict, set or stand-in, and items on the stack (all marks).
_MAX_ELEMENTS: Final = 100_000
# Bytes of one str (UTF-8) or bytes object, and of a GLOBAL's module or name.
_MAX_TEXT: Final = 4096
# Bytes of one LONG1/LONG4 integer: 128 bits, 39 digits (Python prints at most 4,300).
_MAX_INT_BYTES: Final = 16
# Nesting of containers and stand-ins, and of MARKs.
_MAX_DEPTH: Final = 16
# The memory that the reader's objects, memo and records may take, as `_Reader` estimates it.
_MAX_MEMORY: Final = 40 * 1024 * 1024
# Estimates in bytes, on top of `sys.getsizeof`: of an element in a container (its slot or hash
# entry, with room to grow), of a container's record in the reader, and of a memo entry (its int
# key and hash entry). Measured with tracemalloc, the worst hostile pickles take at most 1.35
# times the estimate, real states 0.7 times.
_ENTRY_COST: Final = 64
_CONTAINER_COST: Final = 128
_MEMO_COST: Final = 96


def printable(text: str) -> str:
    """`text` with control characters escaped, so that a hostile value cannot drive a terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def shown(text: str, limit: int = 100) -> str:
    """`text` escaped, and cut after `limit` characters, for an error message."""
    return printable(text[:limit]) + ("..." if len(text) > limit else "")


class NotATorchStateError(ValueError):
    """The payload is a pickle, but not a PyTorch dynamic-rendezvous state (or a hostile one)."""


class UnsafeStateError(NotATorchStateError):
    """The pickle tries to make the reader spend too much, or to change the reader's classes."""


def not_a_state(why: str) -> NotATorchStateError:
    """The error for a payload that is not a state, saying `why` on one line."""
    return NotATorchStateError(f"not a PyTorch rendezvous state: {why}")


class PickledState:
    """Stand-in for torch's `_RendezvousState`: the reader fills `fields`, nothing more."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, object] = {}


class PickledNode:
    """Stand-in for torch's `_NodeDesc`: the reader fills `fields`, nothing more."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, object] = {}


# Everything a pickled `_RendezvousState` names (timezone.utc pickles as timezone(timedelta(0))).
_ALLOWED_GLOBALS: Final[Mapping[tuple[str, str], type]] = {
    (TORCH_MODULE, "_RendezvousState"): PickledState,
    (TORCH_MODULE, "_NodeDesc"): PickledNode,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}
_DATETIME_CONSTRUCTORS: Final[Mapping[object, Callable[..., object]]] = {
    cls: cls for cls in (datetime.datetime, datetime.timezone, datetime.timedelta)
}
# What may be passed to a datetime class: what its pickle passes, and nothing that can hold more.
_DATETIME_ARGUMENTS: Final = (
    int,
    float,
    str,
    bytes,
    type(None),
    datetime.timezone,
    datetime.timedelta,
)
# The containers that can change after they are made.
_MUTABLE: Final = frozenset({list, dict, set, PickledState, PickledNode})


def name_of(value: object) -> str:
    """What `value` is, for a message: a stand-in by the name of what it stands for."""
    if isinstance(value, type):
        classes: dict[type, str] = {PickledNode: "_NodeDesc", PickledState: "_RendezvousState"}
        return f"class {printable(classes.get(value) or f'{value.__module__}.{value.__name__}')}"
    instances: dict[type, str] = {PickledNode: "node", PickledState: "state"}
    return printable(instances.get(type(value)) or type(value).__name__)


# ------------------------------------------------------------------------------ the reader
#
# Why an interpreter of our own rather than `pickle.Unpickler` with `find_class` overridden:
# - The C unpickler's memo is an array sized by the largest index a PUT names: a 9-byte pickle
#   with LONG_BINPUT 2**27 allocates 2 GiB before any hook runs. Its `load_*` methods cannot be
#   overridden, and it reads a LONG4 or BINUNICODE of any size.
# - Its BUILD sets attributes on whatever object is below it, classes included: a pickle could
#   change the stand-ins (their `__name__`, their `__setstate__`), and so every later state
#   read by this process (`rdzv watch`).
# - The pure-Python `pickle._Unpickler` is private, differs between Python versions, and also
#   reads each argument before any check could run.
# - A first pass with `pickletools.genops` would bound sizes, but not what the opcodes do (a BUILD
#   on a class, ints as dict keys that all hash alike), and it parses text ints unbounded.
# So `_Reader` reads the opcodes itself: only those that pickle's protocols 2 to 5 write for such
# a state; every length, index and count checked before anything is read or allocated; dict keys
# and set members only strings and stand-ins (whose hashes a pickle cannot choose); BUILD only
# on a stand-in instance, whose `fields` dict it fills: it never sets an attribute on anything.


class _Stop(Exception):
    """The STOP opcode: the pickle is complete."""


_Handler = Callable[["_Reader"], None]
_HANDLERS: dict[int, _Handler] = {}
_OPCODE_NAMES: Final = {ord(op.code): op.name for op in pickletools.opcodes}


def _opcode(name: str) -> Callable[[_Handler], _Handler]:
    code = next(code for code, known in _OPCODE_NAMES.items() if known == name)

    def register(handler: _Handler) -> _Handler:
        _HANDLERS[code] = handler
        return handler

    return register


class _Reader:
    """Reads one pickle into leaves, containers, datetimes and stand-ins, within the limits."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0
        self._at = 0  # where the current opcode starts, for messages
        self._stack: list[object] = []
        self._marks: list[list[object]] = []
        self._below_marks = 0  # items on the stacks saved by MARK
        self._memo: dict[int, object] = {}
        # id -> (container, nesting) for every container made; it holds them alive, so that an
        # id is never reused for another object while the reader runs.
        self._depths: dict[int, tuple[object, int]] = {}
        # ids of mutable containers that were put into another one: a pickler fills a container
        # before it puts it anywhere, so a change after that is refused (nesting stays exact).
        self._placed: set[int] = set()
        self._memory = 0

    # -------------------------------------------------------------------------- the loop

    def load(self) -> object:
        data, handlers = self._data, _HANDLERS
        for _ in range(_MAX_OPCODES):
            self._at = self._position
            if self._at >= len(data):
                raise not_a_state("the pickle is malformed (it ends before its STOP opcode)")
            code = data[self._at]
            self._position += 1
            handler = handlers.get(code)
            if handler is None:
                name = _OPCODE_NAMES.get(code, f"0x{code:02x}")
                raise not_a_state(f"it uses the pickle opcode {name}, which a state does not")
            try:
                handler(self)
            except _Stop:
                return self._stack.pop()
            # Checked after each opcode: one opcode adds at most _MAX_ELEMENTS entries.
            if self._memory > _MAX_MEMORY:
                raise self._unsafe(f"it would take more than {_MAX_MEMORY >> 20} MiB to read")
            if len(self._stack) + self._below_marks > _MAX_ELEMENTS:
                raise self._unsafe(f"it stacks more than {_MAX_ELEMENTS:,} objects")
        raise self._unsafe(f"it has more than {_MAX_OPCODES:,} opcodes")

    # ---------------------------------------------------------------- errors and accounting

    def _unsafe(self, why: str) -> UnsafeStateError:
        return UnsafeStateError(f"not a safe PyTorch rendezvous state: at byte {self._at}, {why}")

    def _malformed(self, why: str) -> NotATorchStateError:
        return not_a_state(f"the pickle is malformed at byte {self._at} ({why})")

    def _nesting(self, items: Collection[object], depth: int) -> int:
        """The nesting of a container of nesting `depth` that receives `items`, now placed."""
        depths, placed = self._depths, self._placed
        for item in items:
            known = depths.get(id(item))  # only containers are known; a leaf nests 0 deep
            if known is not None:
                depth = max(depth, known[1] + 1)
                if type(item) in _MUTABLE:
                    placed.add(id(item))
        if depth > _MAX_DEPTH:
            raise self._unsafe(f"it nests objects more than {_MAX_DEPTH} deep")
        self._memory += len(items) * _ENTRY_COST
        return depth

    def _made(self, container: object, items: Collection[object]) -> None:
        """Account for a new container holding `items`, and push it."""
        self._depths[id(container)] = (container, self._nesting(items, 1))
        self._memory += sys.getsizeof(container) + _CONTAINER_COST
        if isinstance(container, PickledState | PickledNode):
            self._memory += sys.getsizeof(container.fields)
        self._stack.append(container)

    def _grow(self, container: object, items: Collection[object]) -> None:
        """Account for `items` added to an existing `container`."""
        if id(container) in self._placed:
            raise self._unsafe(
                f"it changes a {name_of(container)} after putting it into another object"
            )
        self._depths[id(container)] = (
            container,
            self._nesting(items, self._depths[id(container)][1]),
        )

    def _key(self, key: object) -> object:
        # Strings hash with a per-process secret, stand-ins by identity: a pickle cannot choose
        # keys that collide (as ints can: n and n + 2**61 - 1 hash alike), so no insert is slow.
        if not isinstance(key, str | PickledState | PickledNode):
            raise not_a_state(
                f"at byte {self._at}, a dict key or set member is a {name_of(key)}, where a "
                "state has only strings and nodes"
            )
        return key

    # ------------------------------------------------------------------------- arguments

    def _take(self, size: int) -> bytes:
        end = self._position + size
        if end > len(self._data):
            raise self._malformed(f"{size} bytes of argument expected, {self._remaining()} remain")
        chunk = self._data[self._position : end]
        self._position = end
        return chunk

    def _remaining(self) -> int:
        return len(self._data) - self._position

    def _unsigned(self, size: int) -> int:
        return int.from_bytes(self._take(size), "little")

    def _length(self, size: int, what: str) -> int:
        length = self._unsigned(size)
        if length > _MAX_TEXT:
            raise self._unsafe(f"it has a {what} of {length:,} bytes (at most {_MAX_TEXT:,})")
        return length

    def _text(self, size: int) -> None:
        raw = self._take(self._length(size, "string"))
        try:
            text = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self._malformed("a string is not UTF-8") from None
        self._leaf(text)

    def _bytes(self, size: int) -> None:
        self._leaf(self._take(self._length(size, "bytes object")))

    def _long(self, size: int) -> None:
        length = int.from_bytes(self._take(size), "little", signed=True)
        if length < 0:
            raise self._malformed("an integer of negative length")
        if length > _MAX_INT_BYTES:
            raise self._unsafe(
                f"it has an integer of {length:,} bytes (at most {_MAX_INT_BYTES}, 128 bits)"
            )
        self._leaf(int.from_bytes(self._take(length), "little", signed=True))

    def _line(self) -> str:
        end = self._data.find(b"\n", self._position, self._position + _MAX_TEXT + 1)
        if end < 0:
            if self._remaining() > _MAX_TEXT:
                raise self._unsafe(f"it has a global name longer than {_MAX_TEXT:,} bytes")
            raise self._malformed("a global name does not end")
        raw = self._take(end - self._position + 1)[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._malformed("a global name is not UTF-8") from None

    # ------------------------------------------------------------------------- the stack

    def _leaf(self, value: object) -> None:
        self._memory += sys.getsizeof(value)
        self._stack.append(value)

    def _pop(self) -> object:
        if not self._stack:
            raise self._malformed("an opcode needs more objects than are on the stack")
        return self._stack.pop()

    def _top(self) -> object:
        if not self._stack:
            raise self._malformed("an opcode needs an object and the stack is empty")
        return self._stack[-1]

    def _pop_mark(self) -> list[object]:
        if not self._marks:
            raise self._malformed("an opcode needs a MARK and there is none")
        items = self._stack
        self._stack = self._marks.pop()
        self._below_marks -= len(self._stack)
        return items

    def _pop_many(self, count: int) -> list[object]:
        if len(self._stack) < count:
            raise self._malformed("an opcode needs more objects than are on the stack")
        items = self._stack[len(self._stack) - count :]
        del self._stack[len(self._stack) - count :]
        return items

    def _memo_put(self, index: int) -> None:
        if index > _MAX_MEMO_INDEX:
            raise self._unsafe(f"it has the memo index {index:,} (at most {_MAX_MEMO_INDEX:,})")
        if index not in self._memo:
            self._memory += _MEMO_COST
        self._memo[index] = self._top()

    def _memo_get(self, index: int) -> None:
        try:
            self._stack.append(self._memo[index])
        except KeyError:
            raise self._malformed(f"memo index {index} was never set") from None

    # ------------------------------------------------------------------- calls and BUILD

    def _global(self, module: object, name: object) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self._malformed("a global's module and name are not strings")
        try:
            found = _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise not_a_state(f"refused global '{shown(module)}.{shown(name)}'") from None
        self._stack.append(found)

    def _call(self, callee: object, args: object, kwargs: object) -> None:
        """REDUCE, NEWOBJ and NEWOBJ_EX: make a stand-in, or call a datetime class."""
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self._malformed("a call's arguments are not a tuple and a dict")
        if callee is PickledState or callee is PickledNode:
            if args or kwargs:
                raise self._malformed(f"a {name_of(callee)} is called with arguments")
            self._made(callee(), ())
            return
        constructor: Callable[..., object] | None = _DATETIME_CONSTRUCTORS.get(callee)
        if constructor is None:
            raise self._malformed(f"a {name_of(callee)} is called")
        values = [*args, *kwargs.values()]
        if not all(type(value) in _DATETIME_ARGUMENTS for value in values):
            raise self._malformed("a datetime is made of something other than numbers and text")
        try:
            made = constructor(*args, **kwargs)
            if isinstance(made, datetime.datetime):
                # Made from its pickled bytes, a datetime is not checked (hour 24 passes), and
                # fails later, in arithmetic: make it again from its fields, which checks them.
                made = made.replace(tzinfo=None).replace(tzinfo=made.tzinfo, fold=made.fold)
        except (TypeError, ValueError, OverflowError) as error:
            raise self._malformed(f"{type(error).__name__}: {shown(str(error))}") from None
        self._leaf(made)

    def _build(self, state: object, target: object) -> None:
        if not isinstance(target, PickledState | PickledNode):
            # Also the classes themselves: the reader never sets an attribute on any class.
            raise self._unsafe(f"it applies BUILD to a {name_of(target)}, not to a node or state")
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise not_a_state(
                f"at byte {self._at}, a node or state is built from a {name_of(state)}, not from "
                "a dict of named fields"
            )
        self._grow(target, state.values())
        target.fields.update(state)


# ------------------------------------------------------------------------ opcode handlers
# Each reads its argument (checked first), then changes the stack. Names as in pickletools.


@_opcode("PROTO")
def _op_proto(reader: _Reader) -> None:
    if not 2 <= reader._unsigned(1) <= pickle.HIGHEST_PROTOCOL:
        raise reader._malformed("an unknown pickle protocol")


@_opcode("FRAME")
def _op_frame(reader: _Reader) -> None:
    # Frames only group opcodes for buffered reading; the whole pickle is in memory here.
    if reader._unsigned(8) > reader._remaining():
        raise reader._malformed("a frame is longer than the pickle")


@_opcode("STOP")
def _op_stop(reader: _Reader) -> None:
    reader._top()
    raise _Stop


@_opcode("MARK")
def _op_mark(reader: _Reader) -> None:
    if len(reader._marks) >= _MAX_DEPTH:
        raise reader._unsafe(f"it nests MARKs more than {_MAX_DEPTH} deep")
    reader._below_marks += len(reader._stack)
    reader._marks.append(reader._stack)
    reader._stack = []


@_opcode("POP")
def _op_pop(reader: _Reader) -> None:
    if reader._stack:
        reader._stack.pop()
    else:
        reader._pop_mark()


@_opcode("POP_MARK")
def _op_pop_mark(reader: _Reader) -> None:
    reader._pop_mark()


@_opcode("NONE")
def _op_none(reader: _Reader) -> None:
    reader._stack.append(None)


@_opcode("NEWTRUE")
def _op_true(reader: _Reader) -> None:
    reader._stack.append(True)


@_opcode("NEWFALSE")
def _op_false(reader: _Reader) -> None:
    reader._stack.append(False)


@_opcode("BININT")
def _op_binint(reader: _Reader) -> None:
    reader._leaf(int.from_bytes(reader._take(4), "little", signed=True))


@_opcode("BININT1")
def _op_binint1(reader: _Reader) -> None:
    reader._leaf(reader._unsigned(1))


@_opcode("BININT2")
def _op_binint2(reader: _Reader) -> None:
    reader._leaf(reader._unsigned(2))


@_opcode("LONG1")
def _op_long1(reader: _Reader) -> None:
    reader._long(1)


@_opcode("LONG4")
def _op_long4(reader: _Reader) -> None:
    reader._long(4)


@_opcode("BINFLOAT")
def _op_binfloat(reader: _Reader) -> None:
    reader._leaf(struct.unpack(">d", reader._take(8))[0])


@_opcode("SHORT_BINUNICODE")
def _op_short_binunicode(reader: _Reader) -> None:
    reader._text(1)


@_opcode("BINUNICODE")
def _op_binunicode(reader: _Reader) -> None:
    reader._text(4)


@_opcode("BINUNICODE8")
def _op_binunicode8(reader: _Reader) -> None:
    reader._text(8)


@_opcode("SHORT_BINBYTES")
def _op_short_binbytes(reader: _Reader) -> None:
    reader._bytes(1)


@_opcode("BINBYTES")
def _op_binbytes(reader: _Reader) -> None:
    reader._bytes(4)


@_opcode("BINBYTES8")
def _op_binbytes8(reader: _Reader) -> None:
    reader._bytes(8)


@_opcode("EMPTY_TUPLE")
def _op_empty_tuple(reader: _Reader) -> None:
    reader._stack.append(())  # one shared object, which holds nothing: a leaf


@_opcode("TUPLE1")
def _op_tuple1(reader: _Reader) -> None:
    items = reader._pop_many(1)
    reader._made(tuple(items), items)


@_opcode("TUPLE2")
def _op_tuple2(reader: _Reader) -> None:
    items = reader._pop_many(2)
    reader._made(tuple(items), items)


@_opcode("TUPLE3")
def _op_tuple3(reader: _Reader) -> None:
    items = reader._pop_many(3)
    reader._made(tuple(items), items)


@_opcode("TUPLE")
def _op_tuple(reader: _Reader) -> None:
    items = reader._pop_mark()
    reader._made(tuple(items), items)


@_opcode("EMPTY_LIST")
def _op_empty_list(reader: _Reader) -> None:
    reader._made([], ())


@_opcode("LIST")
def _op_list(reader: _Reader) -> None:
    items = reader._pop_mark()
    reader._made(list(items), items)


def _extend_list(reader: _Reader, items: list[object]) -> None:
    target = reader._top()
    if not isinstance(target, list):
        raise reader._malformed(f"APPEND to a {name_of(target)}")
    if len(target) + len(items) > _MAX_ELEMENTS:
        raise reader._unsafe(f"it has a list of more than {_MAX_ELEMENTS:,} items")
    reader._grow(target, items)
    target.extend(items)


@_opcode("APPEND")
def _op_append(reader: _Reader) -> None:
    _extend_list(reader, [reader._pop()])


@_opcode("APPENDS")
def _op_appends(reader: _Reader) -> None:
    _extend_list(reader, reader._pop_mark())


@_opcode("EMPTY_DICT")
def _op_empty_dict(reader: _Reader) -> None:
    reader._made({}, ())


def _pairs(reader: _Reader, items: list[object]) -> dict[object, object]:
    if len(items) % 2:
        raise reader._malformed("a dict's items are not pairs")
    return {reader._key(items[i]): items[i + 1] for i in range(0, len(items), 2)}


@_opcode("DICT")
def _op_dict(reader: _Reader) -> None:
    items = reader._pop_mark()
    pairs = _pairs(reader, items)
    reader._made(pairs, items)


def _update_dict(reader: _Reader, items: list[object]) -> None:
    pairs = _pairs(reader, items)
    target = reader._top()
    if not isinstance(target, dict):
        raise reader._malformed(f"SETITEM on a {name_of(target)}")
    if len(target) + len(pairs) > _MAX_ELEMENTS:
        raise reader._unsafe(f"it has a dict of more than {_MAX_ELEMENTS:,} items")
    reader._grow(target, items)
    target.update(pairs)


@_opcode("SETITEM")
def _op_setitem(reader: _Reader) -> None:
    _update_dict(reader, reader._pop_many(2))


@_opcode("SETITEMS")
def _op_setitems(reader: _Reader) -> None:
    _update_dict(reader, reader._pop_mark())


@_opcode("EMPTY_SET")
def _op_empty_set(reader: _Reader) -> None:
    reader._made(set(), ())


@_opcode("ADDITEMS")
def _op_additems(reader: _Reader) -> None:
    items = [reader._key(item) for item in reader._pop_mark()]
    target = reader._top()
    if not isinstance(target, set):
        raise reader._malformed(f"ADDITEMS to a {name_of(target)}")
    if len(target) + len(items) > _MAX_ELEMENTS:
        raise reader._unsafe(f"it has a set of more than {_MAX_ELEMENTS:,} items")
    reader._grow(target, items)
    target.update(items)


@_opcode("FROZENSET")
def _op_frozenset(reader: _Reader) -> None:
    items = [reader._key(item) for item in reader._pop_mark()]
    reader._made(frozenset(items), items)


@_opcode("MEMOIZE")
def _op_memoize(reader: _Reader) -> None:
    reader._memo_put(len(reader._memo))


@_opcode("BINPUT")
def _op_binput(reader: _Reader) -> None:
    reader._memo_put(reader._unsigned(1))


@_opcode("LONG_BINPUT")
def _op_long_binput(reader: _Reader) -> None:
    reader._memo_put(reader._unsigned(4))


@_opcode("BINGET")
def _op_binget(reader: _Reader) -> None:
    reader._memo_get(reader._unsigned(1))


@_opcode("LONG_BINGET")
def _op_long_binget(reader: _Reader) -> None:
    reader._memo_get(reader._unsigned(4))


@_opcode("GLOBAL")
def _op_global(reader: _Reader) -> None:
    module = reader._line()
    reader._global(module, reader._line())


@_opcode("STACK_GLOBAL")
def _op_stack_global(reader: _Reader) -> None:
    module, name = reader._pop_many(2)
    reader._global(module, name)


@_opcode("REDUCE")
def _op_reduce(reader: _Reader) -> None:
    callee, args = reader._pop_many(2)
    reader._call(callee, args, {})


@_opcode("NEWOBJ")
def _op_newobj(reader: _Reader) -> None:
    callee, args = reader._pop_many(2)
    reader._call(callee, args, {})


@_opcode("NEWOBJ_EX")
def _op_newobj_ex(reader: _Reader) -> None:
    callee, args, kwargs = reader._pop_many(3)
    if isinstance(kwargs, dict) and not all(isinstance(key, str) for key in kwargs):
        raise reader._malformed("a keyword argument's name is not a string")
    reader._call(callee, args, kwargs)


@_opcode("BUILD")
def _op_build(reader: _Reader) -> None:
    state = reader._pop()
    reader._build(state, reader._top())


def looks_like_pickle(payload: bytes) -> bool:
    """Whether `payload` starts like a pickle of protocol 2 or later."""
    return len(payload) >= 2 and payload[0] == _PROTO and 2 <= payload[1] <= pickle.HIGHEST_PROTOCOL


def read_state(payload: bytes) -> dict[str, object]:
    """The fields of the `_RendezvousState` that `payload` pickles, read without running anything.

    Raises `NotATorchStateError` saying why, on one line, for a payload that is not such a
    pickle; `UnsafeStateError`, its subclass, for one that exceeds a limit of the reader or
    targets its classes.
    """
    if len(payload) > MAX_STATE_BYTES:
        raise UnsafeStateError(
            f"not a safe PyTorch rendezvous state: it is {len(payload):,} bytes "
            f"(at most {MAX_STATE_BYTES:,})"
        )
    loaded = _Reader(payload).load()
    if not isinstance(loaded, PickledState):
        raise not_a_state(f"the pickle holds a {name_of(loaded)}")
    return loaded.fields
