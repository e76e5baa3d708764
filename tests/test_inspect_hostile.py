"""`rdzv inspect` and `rdzv watch` against hostile rendezvous states: bounded, one line, no crash.

Whoever can write the state key can write any pickle there. These tests write the attacks that
broke the old unpickler (a 4,301-digit int, BUILD on the unpickler's own classes, a 9-byte pickle
that allocated 2 GiB), the limits of the reader, and fuzzed pickles, and check that each is
refused on one printable line within bounded time and memory, and changes nothing for the next
state read. The number of fuzzed examples follows HYPOTHESIS_PROFILE ("ci" or "fuzz").
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import pickletools
import re
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

from rdzv import _envelope
from rdzv._etcd import KeyValue
from rdzv._inspect import (
    Inspection,
    NotATorchStateError,
    examine,
    load_torch_state,
    summary,
    to_json,
    to_text,
)
from rdzv._safe_pickle import PickledNode as _PickledNode
from rdzv._safe_pickle import PickledState as _PickledState
from support import RdzvProcess, overwrite_state, run_cli, torch_state

TORCH = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
PROTO4 = b"\x80\x04"
UTC = datetime.timezone.utc
MIB = 1024 * 1024
UNSAFE = r"^not a safe PyTorch rendezvous state: "

_EXAMPLES = {"ci": 300, "fuzz": 5000}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
_FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- pickles


def _text(value: str) -> bytes:
    """SHORT_BINUNICODE or BINUNICODE of `value`."""
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    """Push the global `module.name` (STACK_GLOBAL)."""
    return _text(module) + _text(name) + b"\x93"


def _slot_build(target: bytes, attribute: str, value: bytes) -> bytes:
    """A pickle that applies BUILD to `target` with the slot state `{attribute: value}`."""
    return PROTO4 + target + b"N}" + _text(attribute) + value + b"s\x86b."


LEGIT = pickle.dumps(torch_state())


def _key_value(payload: bytes) -> KeyValue:
    """`payload` as etcd would return it from the key "/k", in rdzv's envelope."""
    return KeyValue(
        key=b"/k",
        value=_envelope.encode(payload, "/k"),
        create_revision=1,
        mod_revision=2,
        version=1,
        lease=0,
    )


def _classes() -> dict[type, tuple[object, ...]]:
    """What the reader's stand-ins and the datetime classes are: names, bases, attributes."""
    return {
        cls: (cls.__name__, cls.__qualname__, cls.__module__, cls.__bases__, dict(vars(cls)))
        for cls in (
            _PickledState,
            _PickledNode,
            datetime.datetime,
            datetime.timezone,
            datetime.timedelta,
        )
    }


def _shown(inspection: Inspection) -> list[str]:
    """Everything `inspect` and `watch` print for `inspection`, in text and JSON."""
    return [
        summary(inspection),
        *to_text(inspection),
        json.dumps(to_json(inspection)),
        json.dumps(to_json(inspection), indent=2),
    ]


def _examined(payload: bytes, *, seconds: float = 10.0, mib: int | None = 64) -> Inspection:
    """`examine` and every output of `payload`, checked: in time, in memory, one printable line.

    The time bound only says "does not hang": it is loose (several times what an idle machine
    takes), because CI runs these under coverage on a loaded 2-core box.

    With `mib=None`, memory is not traced (tracemalloc makes allocations several times slower).
    """
    classes = _classes()
    if mib is not None:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        inspection = examine(_key_value(payload), "/k")
        lines = _shown(inspection)
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < seconds, f"{elapsed:.2f} s"
    assert mib is None or peak < mib * MIB, f"{peak / MIB:.1f} MiB"
    assert _classes() == classes
    assert all(line.isprintable() for text in lines for line in text.split("\n"))
    if inspection.error is not None:
        assert inspection.error.isprintable()
        assert inspection.torch is None
    return inspection


def _refused_as_unsafe(payload: bytes, reason: str, **bounds: Any) -> None:
    """`payload` is refused as unsafe for `reason`, within bounds, and a real state still reads."""
    inspection = _examined(payload, **bounds)
    assert inspection.kind == "unreadable"
    assert inspection.error is not None
    assert re.search(UNSAFE + f".*{reason}", inspection.error), inspection.error
    assert f"error: {inspection.error}" in summary(inspection)
    assert _examined(LEGIT).kind == "torch"


# ---------------------------------------------------------------------- real states


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_real_torch_state_reads_back(protocol: int) -> None:
    """A pickled torch `_RendezvousState` of protocol 4 or 5 reads back field by field."""
    deadline = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    state = torch_state(deadline=deadline, closed=True)
    state.redundancy_list.add(_NodeDesc("10.1.2.5", 7, 0))
    inspection = _examined(pickle.dumps(state, protocol=protocol))
    torch = inspection.torch
    assert torch is not None
    assert (torch.round, torch.complete, torch.closed, torch.deadline) == (2, True, True, deadline)
    assert [(str(node), rank) for node, rank in torch.participants.items()] == [
        ("10.1.2.3_4242_0", 0)
    ]
    assert [str(node) for node in torch.wait_list] == ["10.1.2.4_99_1"]
    assert [str(node) for node in torch.redundancy_list] == ["10.1.2.5_7_0"]
    assert len(torch.last_heartbeats) == 2


def test_a_real_state_of_10000_nodes_reads() -> None:
    """A state of 10,000 nodes (0.75 MiB) is far inside every limit, and reads in seconds."""
    state = _RendezvousState()
    now = datetime.datetime.now(UTC)
    for i in range(10_000):
        node = _NodeDesc(f"node-{i:05d}.cluster.example.com", 100_000 + i, 0)
        state.participants[node] = i
        state.last_heartbeats[node] = now
    inspection = _examined(pickle.dumps(state), seconds=30, mib=None)
    assert inspection.torch is not None
    assert len(inspection.torch.participants) == 10_000


@pytest.mark.parametrize("value", [2**127 - 1, -(2**127)])
def test_integers_of_128_bits_are_read(value: int) -> None:
    """An int that fits in 128 bits is read as it is."""
    inspection = _examined(pickle.dumps(torch_state(round=value)))
    assert inspection.torch is not None
    assert inspection.torch.round == value


# ------------------------------------------------------------------ the known attacks


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(torch_state(round=10**4300), id="round-of-4301-digits"),
        pytest.param(torch_state(round=-(10**100_000)), id="round-of-100001-digits"),
        pytest.param(torch_state(round=2**127), id="round-of-129-bits"),
        pytest.param(torch_state(participants={_NodeDesc("a", 10**5000, 0): 0}), id="pid"),
        pytest.param(torch_state(participants={_NodeDesc("a", 1, 0): 10**5000}), id="rank"),
    ],
)
def test_an_integer_over_128_bits_is_refused(state: _RendezvousState) -> None:
    """An int too long to print (or longer than 128 bits) is refused, and every output works."""
    _refused_as_unsafe(pickle.dumps(state), r"an integer of [\d,]+ bytes \(at most 16, 128 bits\)")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            _slot_build(_global(TORCH, "_NodeDesc"), "__name__", _text("\x1b]0;owned\x07\x1b[2J")),
            id="terminal-escapes-as-a-class-name",
        ),
        pytest.param(
            _slot_build(
                _global(TORCH, "_RendezvousState"),
                "__setstate__",
                _global("datetime", "timedelta"),
            ),
            id="setstate-of-the-state-class",
        ),
        pytest.param(
            PROTO4 + _global(TORCH, "_NodeDesc") + b"}" + _text("pid") + b"K\x01sb.",
            id="dict-state-on-the-node-class",
        ),
        pytest.param(
            _slot_build(_global("datetime", "datetime"), "max", b"N"), id="the-datetime-class"
        ),
        pytest.param(
            PROTO4 + _global("datetime", "timedelta") + b"K\x01\x85R}" + _text("x") + b"Nsb.",
            id="a-timedelta",
        ),
    ],
)
def test_build_on_anything_but_a_stand_in_instance_is_refused(payload: bytes) -> None:
    """BUILD on a class or a datetime is refused; no class changes; the next state reads."""
    _refused_as_unsafe(payload, r"it applies BUILD to a (class )?\S+, not to a node or state")


def test_a_class_name_with_escapes_never_reaches_the_terminal() -> None:
    """Renaming the node class to escapes, then naming it in an error, sends no escape out."""
    rename = _global(TORCH, "_NodeDesc") + b"N}" + _text("__name__") + _text("\x1b[2J") + b"s\x86b0"
    state = PROTO4 + rename + _global(TORCH, "_RendezvousState") + b")\x81}" + _text("round")
    payload = state + _global(TORCH, "_NodeDesc") + b")\x81sb."
    inspection = _examined(payload)
    assert inspection.error is not None
    assert "\x1b" not in inspection.error


@pytest.mark.parametrize("index", [600_001, 2**24, 2**27, 2**32 - 1])
def test_a_huge_memo_index_is_refused_without_allocating(index: int) -> None:
    """A 9-byte pickle with LONG_BINPUT 2**27 is refused at once, in well under 1 MiB."""
    payload = PROTO4 + b"Nr" + struct.pack("<I", index) + b"."
    assert len(payload) == 9
    _refused_as_unsafe(payload, f"it has the memo index {index:,}", mib=1)


# ----------------------------------------------------------------------- the limits


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(PROTO4 + b"\x8d" + struct.pack("<Q", 2**60), "a string of", id="str8"),
        pytest.param(PROTO4 + _text("x" * 4097) + b".", "a string of 4,097 bytes", id="str"),
        pytest.param(PROTO4 + b"B" + struct.pack("<I", 2**31), "a bytes object of", id="bytes"),
        pytest.param(PROTO4 + b"\x8b" + struct.pack("<i", 2**31 - 1), "an integer of", id="long4"),
        pytest.param(PROTO4 + b"c" + b"m" * 5000 + b"\nx\n.", "a global name longer", id="global"),
    ],
)
def test_long_strings_bytes_and_integers_are_refused_before_they_are_read(
    payload: bytes, reason: str
) -> None:
    """A length over the limit is refused from its declaration, before any of it is read."""
    _refused_as_unsafe(payload, reason, mib=1)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({f"k{i}": None for i in range(100_001)}, "a dict of more than 100,000 items"),
        ({f"k{i}" for i in range(100_001)}, "a set of more than 100,000 items"),
        ([None] * 100_001, "a list of more than 100,000 items"),
        ((None,) * 100_001, "it stacks more than 100,000 objects"),
    ],
    ids=["dict", "set", "list", "tuple"],
)
def test_a_container_of_more_than_100000_elements_is_refused(value: object, reason: str) -> None:
    """Dicts, sets, lists and tuples hold at most 100,000 elements."""
    _refused_as_unsafe(pickle.dumps(value), reason, seconds=30, mib=None)


def test_nesting_of_16_is_read_and_of_17_refused() -> None:
    """Containers nest at most 16 deep, and MARKs too."""
    nested: object = None
    for _ in range(16):
        nested = (nested,)
    assert "not a safe" not in str(_examined(pickle.dumps(nested)).error)
    _refused_as_unsafe(pickle.dumps((nested,)), "it nests objects more than 16 deep")
    _refused_as_unsafe(PROTO4 + b"N" + b"\x85" * 1_000_000 + b".", "more than 16 deep", seconds=30)
    _refused_as_unsafe(PROTO4 + b"(" * 17, "it nests MARKs more than 16 deep")


def test_a_container_cannot_grow_after_it_was_put_into_another() -> None:
    """Appending to a list inside a list (which would hide its nesting) is refused."""
    payload = PROTO4 + b"]\x94]\x94h\x00h\x01ah\x01]a."
    _refused_as_unsafe(payload, "it changes a list after putting it into another object")


def test_more_than_600000_opcodes_are_refused() -> None:
    """A pickle of 600,001 cheap opcodes is refused: the opcode count bounds the time."""
    payload = PROTO4 + b"N0" * 300_001 + b"N."
    _refused_as_unsafe(payload, "more than 600,000 opcodes", seconds=30, mib=None)


def test_a_payload_over_4_mib_is_refused_unread() -> None:
    """A state over 4 MiB is refused by its size alone."""
    _refused_as_unsafe(PROTO4 + b"N" * (4 * MIB), r"it is 4,194,306 bytes", seconds=30, mib=20)


def test_dict_keys_that_a_pickle_could_make_collide_are_refused() -> None:
    """Int keys (n and n + 2**61 - 1 hash alike) are refused: keys are strings and nodes only."""
    payload = pickle.dumps({i * (2**61 - 1): None for i in range(3)})
    with pytest.raises(NotATorchStateError, match="a dict key or set member is a int"):
        load_torch_state(payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pickle.dumps(5, protocol=0), id="INT-of-protocol-0"),
        pytest.param(PROTO4 + b"\x82\x01.", id="EXT1"),
        pytest.param(PROTO4 + b"Q.", id="BINPERSID"),
        pytest.param(PROTO4 + b"\x97.", id="NEXT_BUFFER"),
    ],
)
def test_opcodes_that_no_state_uses_are_refused_by_name(payload: bytes) -> None:
    """Opcodes of old protocols, extensions, persistent ids and buffers: not a state."""
    with pytest.raises(NotATorchStateError, match=r"it uses the pickle opcode [A-Z_0-9]+,"):
        load_torch_state(payload)


def _worst(name: str) -> bytes:
    """The pickles that take the most memory per byte, each of a kind (see _inspect's limits)."""
    node = _global(TORCH, "_NodeDesc") + b"\x94"
    return {
        "lists": PROTO4 + b"]\x940" * 250_000,
        "sets": PROTO4 + b"\x8f\x940" * 250_000,
        "memo": PROTO4 + b"N" + b"\x94" * 599_000,
        "nodes-in-a-set": PROTO4 + node + b"\x8f(" + b"h\x00)\x81" * 99_000 + b"\x90.",
        "nodes": PROTO4 + node + b"h\x00)\x81\x940" * 150_000,
        "tuples": PROTO4 + b"NNN\x87\x940" * 150_000,
    }[name]


# Reads a pickle from stdin in a fresh process; prints its error, seconds, and the growth of the
# process's resident memory (Linux: clear_refs resets the high-water mark VmHWM).
_MEASURE = """
import json, sys, time
from rdzv._inspect import NotATorchStateError, load_torch_state

def high_water():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

payload = sys.stdin.buffer.read()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before, started, error = high_water(), time.perf_counter(), None
try:
    load_torch_state(payload)
except NotATorchStateError as refused:
    error = str(refused)
seconds = time.perf_counter() - started
print(json.dumps({"error": error, "seconds": seconds, "mib": (high_water() - before) / 1024}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lists", "sets", "memo", "nodes-in-a-set", "nodes", "tuples"])
def test_the_worst_pickles_stay_under_64_mib(name: str) -> None:
    """The pickles that cost most memory per byte grow a process by less than 64 MiB."""
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURE],
        input=_worst(name),
        capture_output=True,
        timeout=60,
        check=True,
    )
    measured = json.loads(completed.stdout)
    assert measured["error"] is not None
    assert measured["mib"] < 64, measured
    assert measured["seconds"] < 30, measured  # "does not hang"; about 1.3 s on an idle box


# ------------------------------------------------------------------------------- fuzz

_NUMBERS = st.one_of(
    st.integers(0, 300),
    st.sampled_from([2**16 - 1, 2**24, 2**27, 2**31 - 1, 2**32 - 1, 2**60, 2**64 - 1]),
)
# pickletools' argument kinds: a fixed number of bytes, or a length of that many bytes first.
_FIXED = {"uint1": 1, "uint2": 2, "int4": 4, "uint4": 4, "uint8": 8, "float8": 8}
_LENGTH = {"long1": 1, "string1": 1, "bytes1": 1, "unicodestring1": 1, "long4": 4}
_LENGTH |= {"string4": 4, "bytes4": 4, "unicodestring4": 4}
_LENGTH |= {"bytes8": 8, "unicodestring8": 8, "bytearray8": 8}
_WORDS = ["datetime", "timedelta", "timezone", TORCH, "_NodeDesc", "_RendezvousState", "posix"]


@st.composite
def _opcode(draw: st.DrawFn) -> bytes:
    """One opcode of any kind, with an argument of its kind: sensible, or of any declared size."""
    op = draw(st.sampled_from(pickletools.opcodes))
    code: bytes = op.code.encode("latin-1")
    kind = op.arg.name if op.arg is not None else None
    if kind is None:
        return code
    if kind in _FIXED:
        size = _FIXED[kind]
        return code + (draw(_NUMBERS) % (1 << 8 * size)).to_bytes(size, "little")
    if kind in _LENGTH:
        size, data = _LENGTH[kind], draw(st.binary(max_size=24))
        length = draw(st.one_of(st.just(len(data)), _NUMBERS)) % (1 << 8 * size)
        return code + length.to_bytes(size, "little") + data
    count = 2 if kind == "stringnl_noescape_pair" else 1
    words = draw(st.lists(st.sampled_from(_WORDS) | st.text(max_size=8), min_size=2, max_size=2))
    return code + b"".join(w.encode("utf-8", "surrogatepass") + b"\n" for w in words[:count])


_BLOCKS = st.one_of(
    _opcode(),
    st.sampled_from(
        [
            _global(TORCH, "_NodeDesc"),
            _global(TORCH, "_RendezvousState"),
            _global("datetime", "datetime"),
            _global("datetime", "timedelta"),
            _global("datetime", "timezone"),
            _global("builtins", "eval"),
            b")\x81",  # NEWOBJ with no arguments
            b"N}" + _text("__name__") + _text("\x1b[2J") + b"s\x86b",  # BUILD with a slot state
            b"}" + _text("addr") + _text("\x1b[31mred") + b"sb",  # BUILD with a dict
            b"\x8a\x11" + b"\xff" * 17,  # LONG1 of 17 bytes
            b"\x94",
        ]
    ),
)


@st.composite
def _opcode_stream(draw: st.DrawFn) -> bytes:
    """PROTO, then opcodes and blocks of opcodes, then (mostly) STOP."""
    protocol = draw(st.integers(2, 5))
    body = b"".join(draw(st.lists(_BLOCKS, max_size=40)))
    return bytes([0x80, protocol]) + body + draw(st.sampled_from([b".", b"", b"b."]))


_INTS = st.integers(0, 2**16) | st.integers(-(2**63), 2**63 - 1)
_ROUNDS = _INTS | st.sampled_from([2**127 - 1, 2**127, -(2**127) - 1, 10**4300, 10**5000])
_TIMES = st.datetimes(
    timezones=st.none()
    | st.just(UTC)
    | st.builds(
        datetime.timezone,
        st.timedeltas(
            min_value=-datetime.timedelta(hours=23, minutes=59),
            max_value=datetime.timedelta(hours=23, minutes=59),
        ),
    )
)
_NODES = st.builds(_NodeDesc, st.text(max_size=12), _INTS, _INTS)


@st.composite
def _real_state(draw: st.DrawFn) -> bytes:
    """A pickled torch `_RendezvousState` of any protocol, with any values torch would pickle."""
    state = _RendezvousState()
    state.round = draw(_ROUNDS)
    state.complete, state.closed = draw(st.booleans()), draw(st.booleans())
    state.deadline = draw(st.none() | _TIMES)
    for node in draw(st.lists(_NODES, max_size=4)):
        state.participants[node] = draw(_INTS)
        state.last_heartbeats[node] = draw(_TIMES)
    state.wait_list.update(draw(st.lists(_NODES, max_size=3)))
    state.redundancy_list.update(draw(st.lists(_NODES, max_size=2)))
    return pickle.dumps(state, protocol=draw(st.sampled_from([4, 5, 2, 3])))


@st.composite
def _mutated_state(draw: st.DrawFn) -> bytes:
    """A real state with bytes changed, opcodes inserted, and slices cut out or repeated."""
    data = bytearray(draw(_real_state()))
    if data[2:3] == b"\x95" and draw(st.booleans()):  # FRAME
        del data[2:11]  # without the frame, a change of length leaves the rest readable
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["byte", "insert", "delete", "repeat"]))
        if change == "byte" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif change == "insert":
            data[at:at] = draw(_BLOCKS)
        elif change == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.mark.slow
@_FUZZ
@given(_opcode_stream())
def test_fuzz_opcode_streams(payload: bytes) -> None:
    """Random opcode streams: examine never raises, and stays within 1 s and 64 MiB."""
    _examined(payload)


@pytest.mark.slow
@_FUZZ
@given(_mutated_state())
def test_fuzz_mutated_torch_states(payload: bytes) -> None:
    """Real states, mutated: examine never raises, and stays within 1 s and 64 MiB."""
    _examined(payload)


@pytest.mark.slow
@_FUZZ
@given(_real_state())
def test_fuzz_real_torch_states(payload: bytes) -> None:
    """Real states of any protocol and values: read, or refused only for a reason they have."""
    inspection = _examined(payload)
    if inspection.error is not None:
        assert re.search(
            r"an integer of [\d,]+ bytes|refused global '(builtins|__builtin__)\.set'"
            r"|refused global '_codecs\.encode'",
            inspection.error,
        ), inspection.error
    elif payload[1] >= 4:
        assert inspection.torch is not None


# ------------------------------------------------------------------- end to end: etcd


HOSTILE = {
    "huge-int": pickle.dumps(torch_state(round=10**5000)),
    "build-on-a-class": _slot_build(
        _global(TORCH, "_RendezvousState"), "__setstate__", _global("datetime", "timedelta")
    ),
    "memo-index": PROTO4 + b"Nr" + struct.pack("<I", 2**27) + b".",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_inspect_reports_a_hostile_state_on_one_line_and_exits_1(
    etcd_endpoints: str, etcd_key_prefix: str, name: str, as_json: bool
) -> None:
    """inspect shows the envelope, says "not a safe ... state" on one line, and exits 1."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, HOSTILE[name])
    connection = ["--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix]
    outcome = run_cli("inspect", *(["--json"] if as_json else []), *connection, "--run-id", "job")
    assert outcome.exit_code == 1
    [line] = outcome.stderr.splitlines()
    assert re.match(r"rdzv inspect: not a safe PyTorch rendezvous state: at byte \d+, ", line)
    assert line.isprintable()
    if as_json:
        assert json.loads(outcome.stdout)["kind"] == "unreadable"
    else:
        assert "state         unreadable" in outcome.stdout
    # Nothing the hostile state did stays: a real state reads next, in the same process.
    overwrite_state(etcd_endpoints, etcd_key_prefix, LEGIT)
    assert run_cli("inspect", *connection, "--run-id", "job").exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_watch_shows_hostile_revisions_on_one_line_and_goes_on_watching(
    etcd_endpoints: str,
    etcd_key_prefix: str,
    rdzv_process: Callable[..., RdzvProcess],
    as_json: bool,
) -> None:
    """Each hostile revision is one line saying why; the real state after it shows as usual."""
    watch = rdzv_process(
        "watch",
        *(["--json"] if as_json else []),
        *("--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"),
    )
    assert watch.stderr.next().startswith("Watching ")
    revisions = [
        overwrite_state(etcd_endpoints, etcd_key_prefix, HOSTILE[name]) for name in HOSTILE
    ]
    legit = overwrite_state(etcd_endpoints, etcd_key_prefix, LEGIT)
    for revision in revisions:
        line = watch.stdout.next()
        assert line.isprintable()
        if as_json:
            record = json.loads(line)
            assert (record["revision"], record["kind"]) == (revision, "unreadable")
            assert re.match(UNSAFE, record["error"])
        else:
            assert re.fullmatch(
                rf"[\d:.]+  revision {revision}  size \d+  error: not a safe PyTorch rendezvous "
                r"state: at byte \d+, .+",
                line,
            )
    line = watch.stdout.next()
    if as_json:
        assert json.loads(line)["torch"]["round"] == 2
    else:
        assert re.fullmatch(rf"[\d:.]+  revision {legit}  size \d+  round 2  complete .+", line)
    assert watch.stop(signal.SIGTERM) == 0
