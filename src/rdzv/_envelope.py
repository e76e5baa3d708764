"""The self-checking envelope around every state value that rdzv stores in etcd.

Layout (big-endian), 24 header bytes then the payload::

    offset  size  field
    0       4     magic, b"RDZV"
    4       1     format version, 1
    5       1     flags: 0x01 = signed with a state key (HMAC-SHA256); others reserved
    6       2     reserved, 0
    8       8     write id: random bytes that make every write's value unique
    16      4     payload length
    20      4     CRC-32 (zlib) of bytes 0..19 followed by everything after byte 23
    24      n     payload: the state, as given to `set_state`
    24+n    32    with flag 0x01 only: HMAC-SHA256, under the state key, of the etcd key
                  (length-prefixed), bytes 0..19 and the payload

The write id lets a client whose write had an unknown outcome (the connection broke after the
request left) recognise its own value in etcd, even when another node wrote the same state.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from typing import NoReturn

from rdzv._errors import RendezvousStateError

MAGIC = b"RDZV"
FORMAT_VERSION = 1
FLAG_HMAC_SHA256 = 0x01
_KNOWN_FLAGS = FLAG_HMAC_SHA256
_HEADER = struct.Struct(">4sBBH8sI")
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _CRC.size
MAC_SIZE = 32
MIN_STATE_KEY_SIZE = 16


def validate_state_key(state_key: object) -> bytes | None:
    """Return `state_key` as bytes, or raise `ValueError` if it is too short to be a key."""
    if state_key is None:
        return None
    if not isinstance(state_key, bytes | bytearray) or len(state_key) < MIN_STATE_KEY_SIZE:
        raise ValueError(f"The state key must be at least {MIN_STATE_KEY_SIZE} bytes.")
    return bytes(state_key)


def _mac(
    state_key: bytes, key: str, header: bytes | memoryview, state: bytes | memoryview
) -> bytes:
    # The etcd key is part of what is signed, so a state cannot be replayed under another run.
    mac = hmac.new(state_key, digestmod=hashlib.sha256)
    name = key.encode()
    for part in (len(name).to_bytes(4, "big"), name, header, state):
        mac.update(part)
    return mac.digest()


def encode(state: bytes, key: str, state_key: bytes | None = None) -> bytes:
    """Wrap `state`, to be stored at `key`, in a new envelope with a fresh write id.

    With `state_key`, the envelope carries an HMAC-SHA256 of the key, the header and the state.
    """
    flags = FLAG_HMAC_SHA256 if state_key is not None else 0
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, 0, os.urandom(8), len(state))
    trailer = _mac(state_key, key, header, state) if state_key is not None else b""
    crc = zlib.crc32(trailer, zlib.crc32(state, zlib.crc32(header)))
    return b"".join((header, _CRC.pack(crc), state, trailer))


def decode(value: bytes, key: str, token: int, state_key: bytes | None = None) -> bytes:
    """Return the state inside `value`, or raise `RendezvousStateError` naming `key`.

    `token` is the value's etcd mod revision; the error carries it, so that a caller can overwrite
    the corrupt value on purpose with `set_state(new_state, error.token)`. With `state_key`, a
    value without a valid HMAC is rejected; without it, so is a value that has one.
    """
    if len(value) < HEADER_SIZE:
        _corrupt(
            key, token, f"it is {len(value)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    magic, version, flags, reserved, _write_id, length = _HEADER.unpack_from(value)
    if magic != MAGIC:
        _corrupt(key, token, "it was not written by rdzv (bad magic bytes)")
    if version != FORMAT_VERSION:
        _corrupt(key, token, f"its format version is {version}; this rdzv reads {FORMAT_VERSION}")
    if flags & ~_KNOWN_FLAGS or reserved:
        _corrupt(
            key, token, f"it has unknown flags 0x{flags:02x} or reserved bits 0x{reserved:04x}"
        )
    mac_size = MAC_SIZE if flags & FLAG_HMAC_SHA256 else 0
    actual = len(value) - HEADER_SIZE - mac_size
    if length != actual:
        _corrupt(key, token, f"its header says {length} payload bytes, but {actual} follow")
    (stored_crc,) = _CRC.unpack_from(value, _HEADER.size)
    view = memoryview(value)
    crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: _HEADER.size]))
    if crc != stored_crc:
        _corrupt(key, token, "its checksum does not match")
    state = view[HEADER_SIZE : HEADER_SIZE + length]
    if mac_size and state_key is None:
        _corrupt(key, token, "it is signed with a state key, and this backend has none")
    if state_key is not None:
        if not mac_size:
            _corrupt(key, token, "it is not signed, and this backend requires a state key")
        expected = _mac(state_key, key, view[: _HEADER.size], state)
        if not hmac.compare_digest(expected, view[HEADER_SIZE + length :]):
            _corrupt(key, token, "its signature does not match this backend's state key")
    return bytes(state)


def _corrupt(key: str, token: int, reason: str) -> NoReturn:
    raise RendezvousStateError(
        f"The state object is corrupt. The value at key '{key}' (revision {token}): {reason}.",
        token=token,
    )
