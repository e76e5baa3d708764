"""The self-checking value envelope, byte by byte (no etcd needed)."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from rdzv import RendezvousForeignStateError, RendezvousStateError
from rdzv._envelope import (
    CREATE,
    HEADER_SIZE,
    MAGIC,
    SIGNATURE_SIZE,
    Position,
    decode,
    encode,
)
from rdzv._etcd import KeyValue


def stored(
    value: bytes, *, mod_revision: int = 1, create_revision: int = 1, version: int = 1
) -> KeyValue:
    """`value` as etcd would hand it back: by default the key's first version, at revision 1."""
    return KeyValue(b"/k", value, create_revision, mod_revision, version, 0)


def test_encoded_state_decodes_to_itself() -> None:
    """decode(encode(state)) gives the state back."""
    assert decode(stored(encode(b"state", "/k")), "/k") == b"state"


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
    assert decode(stored(encode(b"", "/k")), "/k") == b""


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v: v[:10], "shorter than"),
        (lambda v: v[:-1], "payload bytes"),
        (lambda v: v + b"!", "payload bytes"),
        (lambda v: b"RD", "shorter than"),
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
        decode(stored(value, mod_revision=42), "/prefix/job")
    assert str(caught.value).startswith("The state object is corrupt.")
    assert "'/prefix/job'" in str(caught.value)
    assert caught.value.token == 42


KEY = b"0123456789abcdef-shared-secret"


def _recrc(value: bytearray) -> bytes:
    """`value` with its checksum made right again, as anyone can without the state key."""
    value[20:24] = zlib.crc32(bytes(value[24:]), zlib.crc32(bytes(value[:20]))).to_bytes(4, "big")
    return bytes(value)


def test_signed_state_decodes_with_the_same_key() -> None:
    """A state signed with a state key decodes with that key."""
    value = encode(b"state", "/p/job", KEY)
    assert len(value) == HEADER_SIZE + len(b"state") + SIGNATURE_SIZE
    assert value[5] == 0x02
    assert decode(stored(value), "/p/job", KEY) == b"state"


def test_signed_state_is_rejected_with_another_key() -> None:
    """A signature made with another key is rejected as corrupt."""
    value = encode(b"state", "/p/job", b"another key of sixteen+ bytes")
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(stored(value), "/p/job", KEY)


def test_signed_state_is_rejected_under_another_etcd_key() -> None:
    """A signed state copied to another run's key does not verify there."""
    value = encode(b"state", "/p/job-a", KEY)
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(stored(value), "/p/job-b", KEY)


def test_unsigned_state_is_rejected_when_a_key_is_required() -> None:
    """With a state key, a value without a signature is rejected."""
    with pytest.raises(RendezvousStateError, match="not signed"):
        decode(stored(encode(b"state", "/p/job")), "/p/job", KEY)


def test_signed_state_is_rejected_without_a_key() -> None:
    """Without a state key, a signed value cannot be checked, and is rejected."""
    with pytest.raises(RendezvousStateError, match="has none"):
        decode(stored(encode(b"state", "/p/job", KEY)), "/p/job")


def test_forged_signature_with_a_valid_checksum_is_rejected() -> None:
    """Someone without the key who rewrites state and checksum still fails the signature."""
    value = bytearray(encode(b"state", "/p/job", KEY))
    value[24:29] = b"STATE"
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(stored(_recrc(value)), "/p/job", KEY)


def test_signed_update_decodes_at_the_next_version_of_the_same_key() -> None:
    """A value signed to replace version 3 of a key decodes as version 4 of that key."""
    value = encode(b"round 4", "/p/job", KEY, at=Position(7, 3).next())
    at_version_4 = stored(value, mod_revision=20, create_revision=7, version=4)
    assert decode(at_version_4, "/p/job", KEY) == b"round 4"


def test_signed_value_put_back_at_a_later_version_is_rejected() -> None:
    """A value signed for version 2 is rejected at version 8 of the same key: a replay."""
    value = encode(b"round 2", "/p/job", KEY, at=Position(7, 2))
    with pytest.raises(RendezvousStateError, match="put back") as caught:
        decode(stored(value, mod_revision=30, create_revision=7, version=8), "/p/job", KEY)
    assert "signed as version 2 of the key created at revision 7, but it is version 8" in str(
        caught.value
    )
    assert caught.value.token == 30


def test_signed_value_put_back_in_a_new_incarnation_of_the_key_is_rejected() -> None:
    """A value signed for version 3 is rejected at version 3 of a key created anew."""
    value = encode(b"round 3", "/p/job", KEY, at=Position(7, 3))
    with pytest.raises(RendezvousStateError, match="created at revision 7, but it is version 3"):
        decode(stored(value, mod_revision=60, create_revision=50, version=3), "/p/job", KEY)


def test_first_value_put_back_at_a_later_version_is_rejected() -> None:
    """The value that created the key is rejected once the key has later versions."""
    value = encode(b"round 1", "/p/job", KEY, at=CREATE)
    with pytest.raises(RendezvousStateError, match="signed as the value that creates the key"):
        decode(stored(value, mod_revision=30, create_revision=7, version=2), "/p/job", KEY)


def test_first_value_verifies_as_the_first_version_of_any_incarnation() -> None:
    """The value that created a key verifies as the first version of a recreated key too."""
    value = encode(b"round 1", "/p/job", KEY, at=CREATE)
    assert decode(stored(value, mod_revision=7, create_revision=7), "/p/job", KEY) == b"round 1"
    recreated = stored(value, mod_revision=99, create_revision=99)
    assert decode(recreated, "/p/job", KEY) == b"round 1"


def test_rewritten_position_fails_the_signature() -> None:
    """Someone without the key who rewrites the signed position (and the checksum) is caught."""
    value = bytearray(encode(b"round 2", "/p/job", KEY, at=Position(7, 2)))
    value[-40:-32] = (8).to_bytes(8, "big")
    at_version_8 = stored(_recrc(value), mod_revision=30, create_revision=7, version=8)
    with pytest.raises(RendezvousStateError, match="signature does not match"):
        decode(at_version_8, "/p/job", KEY)


def test_signature_without_a_position_is_rejected() -> None:
    """A value signed in the retired layout (flag 0x01, no position) is rejected, named as such."""
    value = bytearray(encode(b"state", "/p/job", KEY))
    value[5] = 0x01
    with pytest.raises(RendezvousStateError, match=r"flag 0x01.*no longer accepts"):
        decode(stored(_recrc(value)), "/p/job", KEY)


# --------------------------------------------------------------------- not an rdzv state


@pytest.mark.parametrize(
    ("value", "looks_like", "said"),
    [
        (base64.b64encode(pickle.dumps({"round": 1})), "torch-etcd-v2", "etcd-v2"),
        (pickle.dumps({"round": 1}), "pickle", "Python pickle"),
        (json.dumps({"status": "setup"}).encode(), "json", "JSON"),
        (b"written by someone else", "text", "23 bytes of text"),
        (b"", "empty", "it is empty"),
        (bytes(range(256)), "unknown", "256 bytes that rdzv does not recognise"),
    ],
)
def test_value_without_an_envelope_is_not_an_rdzv_state(
    value: bytes, looks_like: str, said: str
) -> None:
    """A value that rdzv did not write is reported as not an rdzv state, saying what it is."""
    with pytest.raises(RendezvousForeignStateError) as caught:
        decode(stored(value, mod_revision=42), "/prefix/job")
    message = str(caught.value)
    assert message.startswith("The state object is not an rdzv state.")
    assert "corrupt" not in message
    assert said in message
    assert "'/prefix/job'" in message
    assert (caught.value.looks_like, caught.value.token) == (looks_like, 42)


def test_foreign_value_message_says_how_to_overwrite_it() -> None:
    """The message names the token that set_state takes to overwrite the foreign value."""
    with pytest.raises(RendezvousForeignStateError, match=r"set_state\(state, 42\)"):
        decode(stored(b"{}", mod_revision=42), "/prefix/job")


def test_envelope_with_damaged_magic_is_not_an_rdzv_state() -> None:
    """An envelope whose magic bytes are damaged no longer reads as rdzv's at all."""
    value = b"XXXX" + encode(b"some state", "/prefix/job")[4:]
    with pytest.raises(RendezvousForeignStateError):
        decode(stored(value), "/prefix/job")


def test_damaged_envelope_is_corrupt_not_foreign() -> None:
    """An envelope that fails its checks is a corrupt rdzv state, not a foreign value."""
    value = encode(b"some state", "/prefix/job")[:-1]
    with pytest.raises(RendezvousStateError) as caught:
        decode(stored(value), "/prefix/job")
    assert not isinstance(caught.value, RendezvousForeignStateError)
