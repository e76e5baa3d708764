"""The self-checking value envelope, byte by byte (no etcd needed)."""

from __future__ import annotations

import pytest

from rdzv import RendezvousStateError
from rdzv._envelope import HEADER_SIZE, MAC_SIZE, MAGIC, decode, encode


def test_encoded_state_decodes_to_itself() -> None:
    """decode(encode(state)) gives the state back."""
    assert decode(encode(b"state", "/k"), "/k", 1) == b"state"


def test_every_encoding_is_unique() -> None:
    """Two writes of the same state store different bytes (their write ids differ)."""
    assert encode(b"same", "/k") != encode(b"same", "/k")


def test_header_starts_with_magic_and_version() -> None:
    """The value starts with b"RDZV" and format version 1, then carries the payload length."""
    value = encode(b"abc", "/k")
    assert value[:4] == MAGIC
    assert value[4] == 1
    assert int.from_bytes(value[16:20], "big") == 3
    assert len(value) == HEADER_SIZE + 3


def test_empty_state_is_allowed() -> None:
    """An empty state is a valid state."""
    assert decode(encode(b"", "/k"), "/k", 1) == b""


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
    value = mangle(encode(b"some state", "/prefix/job"))  # type: ignore[operator]
    with pytest.raises(RendezvousStateError, match=reason) as caught:
        decode(value, "/prefix/job", 42)
    assert str(caught.value).startswith("The state object is corrupt.")
    assert "'/prefix/job'" in str(caught.value)
    assert caught.value.token == 42


KEY = b"0123456789abcdef-shared-secret"


def test_signed_state_decodes_with_the_same_key() -> None:
    """A state signed with a state key decodes with that key."""
    value = encode(b"state", "/p/job", KEY)
    assert len(value) == HEADER_SIZE + len(b"state") + MAC_SIZE
    assert decode(value, "/p/job", 1, KEY) == b"state"


def test_signed_state_is_rejected_with_another_key() -> None:
    """A signature made with another key is rejected as corrupt."""
    value = encode(b"state", "/p/job", b"another key of sixteen+ bytes")
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(value, "/p/job", 1, KEY)


def test_signed_state_is_rejected_under_another_etcd_key() -> None:
    """A signed state copied to another run's key does not verify there."""
    value = encode(b"state", "/p/job-a", KEY)
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(value, "/p/job-b", 1, KEY)


def test_unsigned_state_is_rejected_when_a_key_is_required() -> None:
    """With a state key, a value without a signature is rejected."""
    with pytest.raises(RendezvousStateError, match="not signed"):
        decode(encode(b"state", "/p/job"), "/p/job", 1, KEY)


def test_signed_state_is_rejected_without_a_key() -> None:
    """Without a state key, a signed value cannot be checked, and is rejected."""
    with pytest.raises(RendezvousStateError, match="has none"):
        decode(encode(b"state", "/p/job", KEY), "/p/job", 1)


def test_forged_signature_with_a_valid_checksum_is_rejected() -> None:
    """Someone without the key who rewrites state and checksum still fails the signature."""
    import zlib

    value = bytearray(encode(b"state", "/p/job", KEY))
    value[24:29] = b"STATE"
    value[20:24] = zlib.crc32(bytes(value[24:]), zlib.crc32(bytes(value[:20]))).to_bytes(4, "big")
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(bytes(value), "/p/job", 1, KEY)
