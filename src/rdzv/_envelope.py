"""The self-checking envelope around every state value that rdzv stores in etcd.

Layout (big-endian), 24 header bytes then the payload::

    offset  size  field
    0       4     magic, b"RDZV"
    4       1     format version, 1
    5       1     flags: 0x02 = signed with a state key (HMAC-SHA256, bound to the value's place
                  in the key's history); 0x01 is retired (see below); others reserved
    6       2     reserved, 0
    8       8     write id: random bytes that make every write's value unique
    16      4     payload length
    20      4     CRC-32 (zlib) of bytes 0..19 followed by everything after byte 23
    24      n     payload: the state, as given to `set_state`
    24+n    8     with flag 0x02 only: the key's create revision the value was written for, or 0
                  for a value that creates the key
    32+n    8     with flag 0x02 only: the key's version the value was written for (1 creates it)
    40+n    32    with flag 0x02 only: HMAC-SHA256, under the state key, of the etcd key
                  (length-prefixed), bytes 0..19, and everything from byte 24 up to the HMAC

The write id lets a client whose write had an unknown outcome (the connection broke after the
request left) recognise its own value in etcd, even when another node wrote the same state.

A signature covers the value's position, etcd's (create revision, version) of the key, so that
an older signed value of the same key put back later sits at a position it was not signed for
and is rejected. A writer knows the position before writing: a compare-and-swap on a token keeps
the create revision of the value at that token and adds one to its version; a create has version
1 and a create revision that is its own, still unknown revision, so it is signed with 0 there.
That leaves one replay open, which no signature can close: after the key is deleted (or
expires), the value that created an earlier incarnation of it verifies again as the first value
of the new one. Flag 0x01 marked signatures without the position, written by rdzv before this
layout (never released); such values are rejected, and the bit is never reused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
import zlib
from typing import Final, NamedTuple, NoReturn, Protocol

from rdzv._errors import RendezvousForeignStateError, RendezvousStateError

MAGIC = b"RDZV"
FORMAT_VERSION = 1
FLAG_HMAC_SHA256 = 0x02
# Signed without the position (rdzv before the position was signed, never released): rejected.
_RETIRED_FLAG_HMAC_SHA256 = 0x01
_KNOWN_FLAGS = FLAG_HMAC_SHA256
_HEADER = struct.Struct(">4sBBH8sI")
_CRC = struct.Struct(">I")
_POSITION = struct.Struct(">QQ")
HEADER_SIZE = _HEADER.size + _CRC.size
MAC_SIZE = 32
SIGNATURE_SIZE = _POSITION.size + MAC_SIZE
MIN_STATE_KEY_SIZE = 16


class Position(NamedTuple):
    """Where a value sits in its etcd key's history: the key's create revision and version.

    etcd gives every incarnation of a key its own create revision (the revision of the write
    that created it, never reused) and counts the writes to it in `version`, 1 for the create.
    """

    create_revision: int
    version: int

    def next(self) -> Position:
        """Where a compare-and-swap on the value at this position puts the new value."""
        return Position(self.create_revision, self.version + 1)


# Where a create puts its value: version 1, at a create revision not known until it is written.
CREATE: Final = Position(0, 1)


class StoredValue(Protocol):
    """A value as read from etcd, with its place in the key's history (a `KeyValue` is one)."""

    @property
    def value(self) -> bytes:
        """The stored bytes."""

    @property
    def mod_revision(self) -> int:
        """The revision of the write that stored them: the state's token."""

    @property
    def create_revision(self) -> int:
        """The revision of the write that created the key."""

    @property
    def version(self) -> int:
        """How many times the key was written since it was created (1 for the create)."""


def validate_state_key(state_key: object) -> bytes | None:
    """Return `state_key` as bytes, or raise `ValueError` if it is too short to be a key."""
    if state_key is None:
        return None
    if not isinstance(state_key, bytes | bytearray) or len(state_key) < MIN_STATE_KEY_SIZE:
        raise ValueError(f"The state key must be at least {MIN_STATE_KEY_SIZE} bytes.")
    return bytes(state_key)


def _signed_position(position: Position) -> bytes:
    # A create's own create revision is unknown to its writer: the first version is signed as 0.
    create_revision = 0 if position.version == 1 else position.create_revision
    return _POSITION.pack(create_revision, position.version)


def _mac(
    state_key: bytes,
    key: str,
    header: bytes | memoryview,
    state: bytes | memoryview,
    position: bytes | memoryview,
) -> bytes:
    # The etcd key is signed, so a state cannot be replayed under another run; so is the
    # position, so it cannot be replayed at another place in the same key's history.
    mac = hmac.new(state_key, digestmod=hashlib.sha256)
    name = key.encode()
    for part in (len(name).to_bytes(4, "big"), name, header, state, position):
        mac.update(part)
    return mac.digest()


def encode(
    state: bytes, key: str, state_key: bytes | None = None, *, at: Position = CREATE
) -> bytes:
    """Wrap `state`, to be stored at `key`, in a new envelope with a fresh write id.

    With `state_key`, the envelope carries the position `at` (where the value will be once
    written: `CREATE`, or `Position.next()` of the value a compare-and-swap replaces) and an
    HMAC-SHA256 of the key, the header, the state and that position. Without it, `at` is unused.
    """
    flags = FLAG_HMAC_SHA256 if state_key is not None else 0
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, 0, os.urandom(8), len(state))
    trailer = b""
    if state_key is not None:
        position = _signed_position(at)
        trailer = position + _mac(state_key, key, header, state, position)
    crc = zlib.crc32(trailer, zlib.crc32(state, zlib.crc32(header)))
    return b"".join((header, _CRC.pack(crc), state, trailer))


def decode(stored: StoredValue, key: str, state_key: bytes | None = None) -> bytes:
    """Return the state inside `stored`, read at `key`, or raise `RendezvousStateError`.

    The error names `key` and carries the value's token (`stored.mod_revision`), so that a caller
    can overwrite the corrupt value on purpose with `set_state(new_state, error.token)`. With
    `state_key`, a value is rejected unless its HMAC is valid and it was signed for the position
    where etcd holds it (`stored.create_revision` and `stored.version`); without `state_key`, a
    signed value is rejected. A value that is no envelope at all (it does not start with the
    magic bytes) raises the subclass `RendezvousForeignStateError`, saying what it looks like.
    """
    value, token = stored.value, stored.mod_revision
    if not value.startswith(MAGIC[: len(value)] if value else b"\x00"):
        _foreign(key, token, value)
    if len(value) < HEADER_SIZE:
        _corrupt(
            key, token, f"it is {len(value)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    _magic, version, flags, reserved, _write_id, length = _HEADER.unpack_from(value)
    if version != FORMAT_VERSION:
        _corrupt(key, token, f"its format version is {version}; this rdzv reads {FORMAT_VERSION}")
    if flags == _RETIRED_FLAG_HMAC_SHA256 and not reserved:
        _corrupt(
            key,
            token,
            "its signature (flag 0x01, from an unreleased rdzv) does not cover its place in "
            "the key's history, and this rdzv no longer accepts such signatures",
        )
    if flags & ~_KNOWN_FLAGS or reserved:
        _corrupt(
            key, token, f"it has unknown flags 0x{flags:02x} or reserved bits 0x{reserved:04x}"
        )
    signature_size = SIGNATURE_SIZE if flags & FLAG_HMAC_SHA256 else 0
    actual = len(value) - HEADER_SIZE - signature_size
    if length != actual:
        _corrupt(key, token, f"its header says {length} payload bytes, but {actual} follow")
    (stored_crc,) = _CRC.unpack_from(value, _HEADER.size)
    view = memoryview(value)
    crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: _HEADER.size]))
    if crc != stored_crc:
        _corrupt(key, token, "its checksum does not match")
    state = view[HEADER_SIZE : HEADER_SIZE + length]
    if signature_size and state_key is None:
        _corrupt(key, token, "it is signed with a state key, and this backend has none")
    if state_key is not None:
        if not signature_size:
            _corrupt(key, token, "it is not signed, and this backend requires a state key")
        signed_at = bytes(view[HEADER_SIZE + length : len(value) - MAC_SIZE])
        expected = _mac(state_key, key, view[: _HEADER.size], state, signed_at)
        if not hmac.compare_digest(expected, view[len(value) - MAC_SIZE :]):
            _corrupt(key, token, "its signature does not match this backend's state key")
        # The signature is genuine, so the position it covers is where its writer put it.
        found = Position(stored.create_revision, stored.version)
        if signed_at != _signed_position(found):
            signed_for = Position(*_POSITION.unpack(signed_at))
            _corrupt(
                key,
                token,
                f"it was signed as {_describe(signed_for)}, but it is {_describe(found)}: "
                "an older value was put back in its place",
            )
    return bytes(state)


def _describe(position: Position) -> str:
    if position.version == 1:
        return "the value that creates the key"
    return f"version {position.version} of the key created at revision {position.create_revision}"


def _corrupt(key: str, token: int, reason: str) -> NoReturn:
    raise RendezvousStateError(
        f"The state object is corrupt. The value at key '{key}' (revision {token}): {reason}.",
        token=token,
    )


def _foreign(key: str, token: int, value: bytes) -> NoReturn:
    looks_like = looks_like_what(value)
    raise RendezvousForeignStateError(
        f"The state object is not an rdzv state. The value at key '{key}' (revision {token}) "
        f"has no rdzv envelope: {_FOREIGN_DESCRIPTIONS[looks_like].format(size=len(value))}. "
        "Another program or rendezvous backend writes to this key: give this job its own key "
        "prefix or run id, or, if the value is not needed, overwrite it with "
        f"set_state(state, {token}).",
        looks_like=looks_like,
        token=token,
    )


_FOREIGN_DESCRIPTIONS: Final = {
    "empty": "it is empty",
    "torch-etcd-v2": "it looks like the state of PyTorch's etcd-v2 rendezvous backend (the "
    "base64 text of a pickle)",
    "pickle": "it looks like a Python pickle",
    "json": "it looks like JSON (as PyTorch's older etcd rendezvous stores)",
    "text": "it is {size} bytes of text",
    "unknown": "it is {size} bytes that rdzv does not recognise",
}

# A pickle of protocol 2 or later starts with the PROTO opcode and its protocol number.
_PICKLE_PROTOCOLS: Final = range(2, 6)


def looks_like_what(value: bytes) -> str:
    """What a value without rdzv's envelope seems to be (see `RendezvousForeignStateError`).

    A guess from its first bytes and its syntax, for an error message: nothing is unpickled.
    """
    if not value:
        return "empty"
    if _is_pickle(value):
        return "pickle"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    try:
        if _is_pickle(base64.b64decode(text.strip(), validate=True)):
            return "torch-etcd-v2"
    except (binascii.Error, ValueError):
        pass
    try:
        if isinstance(json.loads(text), dict | list):
            return "json"
    except ValueError:
        pass
    return "text" if all(c.isprintable() or c.isspace() for c in text) else "unknown"


def _is_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and data[1] in _PICKLE_PROTOCOLS
