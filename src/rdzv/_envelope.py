"""The self-checking envelope around every state value that rdzv stores in etcd.

Layout (big-endian), 24 header bytes then the payload::

    offset  size  field
    0       4     magic, b"RDZV"
    4       1     format version, 1
    5       1     flags, 0 (bits are reserved for compression and authentication)
    6       2     reserved, 0
    8       8     write id: random bytes that make every write's value unique
    16      4     payload length
    20      4     CRC-32 (zlib) of bytes 0..19 followed by the payload
    24      n     payload: the state, as given to `set_state`

The write id lets a client whose write had an unknown outcome (the connection broke after the
request left) recognise its own value in etcd, even when another node wrote the same state.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NoReturn

from rdzv._errors import RendezvousStateError

MAGIC = b"RDZV"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBBH8sI")
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _CRC.size
_KNOWN_FLAGS = 0


def encode(state: bytes) -> bytes:
    """Wrap `state` in a new envelope with a fresh write id."""
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, os.urandom(8), len(state))
    crc = zlib.crc32(state, zlib.crc32(header))
    return b"".join((header, _CRC.pack(crc), state))


def decode(value: bytes, key: str, token: int) -> bytes:
    """Return the state inside `value`, or raise `RendezvousStateError` naming `key`.

    `token` is the value's etcd mod revision; the error carries it, so that a caller can overwrite
    the corrupt value on purpose with `set_state(new_state, error.token)`.
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
    if length != len(value) - HEADER_SIZE:
        actual = len(value) - HEADER_SIZE
        _corrupt(key, token, f"its header says {length} payload bytes, but {actual} follow")
    (stored_crc,) = _CRC.unpack_from(value, _HEADER.size)
    view = memoryview(value)
    crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: _HEADER.size]))
    if crc != stored_crc:
        _corrupt(key, token, "its checksum does not match")
    return bytes(view[HEADER_SIZE:])


def _corrupt(key: str, token: int, reason: str) -> NoReturn:
    raise RendezvousStateError(
        f"The state object is corrupt. The value at key '{key}' (revision {token}): {reason}.",
        token=token,
    )
