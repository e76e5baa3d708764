"""The self-checking value envelope, byte by byte (no etcd needed)."""

from __future__ import annotations

import pytest

from rdzv import RendezvousStateError
from rdzv._envelope import HEADER_SIZE, MAGIC, decode, encode


def test_encoded_state_decodes_to_itself() -> None:
    """decode(encode(state)) gives the state back."""
    assert decode(encode(b"state"), "/k", 1) == b"state"


def test_every_encoding_is_unique() -> None:
    """Two writes of the same state store different bytes (their write ids differ)."""
    assert encode(b"same") != encode(b"same")


def test_header_starts_with_magic_and_version() -> None:
    """The value starts with b"RDZV" and format version 1, then carries the payload length."""
    value = encode(b"abc")
    assert value[:4] == MAGIC
    assert value[4] == 1
    assert int.from_bytes(value[16:20], "big") == 3
    assert len(value) == HEADER_SIZE + 3


def test_empty_state_is_allowed() -> None:
    """An empty state is a valid state."""
    assert decode(encode(b""), "/k", 1) == b""


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v: v[:10], "shorter than"),
        (lambda v: v[:-1], "payload bytes"),
        (lambda v: v + b"!", "payload bytes"),
        (lambda v: b"XXXX" + v[4:], "bad magic"),
        (lambda v: v[:4] + b"\x02" + v[5:], "format version is 2"),
        (lambda v: v[:5] + b"\x80" + v[6:], "unknown flags"),
        (lambda v: v[:-1] + bytes([v[-1] ^ 1]), "checksum"),
        (lambda v: v[:9] + bytes([v[9] ^ 0x10]) + v[10:], "checksum"),
    ],
)
def test_damaged_value_is_reported_corrupt(mangle: object, reason: str) -> None:
    """Truncated, extended, foreign or bit-flipped values raise RendezvousStateError."""
    value = mangle(encode(b"some state"))  # type: ignore[operator]
    with pytest.raises(RendezvousStateError, match=reason) as caught:
        decode(value, "/prefix/job", 42)
    assert str(caught.value).startswith("The state object is corrupt.")
    assert "'/prefix/job'" in str(caught.value)
    assert caught.value.token == 42
