"""Where a rendezvous keeps what in etcd, and how a round's membership is written down.

Under `{key_prefix}/{run_id}/`:

- `closed`: present once the rendezvous is closed; no join succeeds after it.
- `latest`: the number of the latest completed round, in decimal (absent: none yet).
- `round/{n}/m/{member}`: one key per participant of round `n`, holding its node info, on the
  participant's own lease. `{member}` is the lease id in hex, which etcd makes unique.
- `round/{n}/c/`: the round's control keys, the only ones that participants watch:
  `coordinator` (the member id of the one participant that decides completion, on its lease),
  `done` (the membership, written once, when the round completes), `size` (how many members
  `done` lists, for readers who do not want the whole membership), `departed` (written when a
  member of the completed round is gone) and `closed` (written by `close()` into the round that
  was open when the rendezvous closed).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Final

from rdzv._errors import RendezvousStateError

_MAGIC: Final = b"rdzv-round\x01"
_HEADER: Final = struct.Struct(">QI")  # round, member count
_ENTRY: Final = struct.Struct(">QH")  # member id, info length

MEMBERSHIP_BUDGET: Final = 1_000_000
"""Bytes that one round's membership may take in etcd: under etcd's default request limit
(1.5 MiB), with room for the rest of the transaction that writes it."""

ENTRY_OVERHEAD: Final = _ENTRY.size

_MEMBER_NAME_LENGTH: Final = 16
_HEX_DIGITS: Final = b"0123456789abcdef"


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a completed round."""

    id: int
    """The member's id: the etcd lease id its key lives on, unique in the cluster."""
    info: bytes
    """The node info the member joined with."""


class Layout:
    """The etcd keys of one rendezvous."""

    def __init__(self, key_prefix: str, run_id: str) -> None:
        self.base = f"{key_prefix}/{run_id}/".encode()
        self.closed = self.base + b"closed"
        self.latest = self.base + b"latest"

    def round(self, number: int) -> bytes:
        """The prefix of every key of round `number`."""
        return self.base + b"round/%d/" % number

    def members(self, number: int) -> bytes:
        """The prefix of the member keys of round `number`."""
        return self.round(number) + b"m/"

    def member(self, number: int, member_id: int) -> bytes:
        """The key of member `member_id` in round `number`."""
        return self.members(number) + member_name(member_id)

    def control(self, number: int) -> bytes:
        """The prefix of the control keys of round `number`."""
        return self.round(number) + b"c/"

    def coordinator(self, number: int) -> bytes:
        """Who decides when round `number` completes."""
        return self.control(number) + b"coordinator"

    def done(self, number: int) -> bytes:
        """The membership of round `number`, once it completed."""
        return self.control(number) + b"done"

    def size(self, number: int) -> bytes:
        """How many members completed round `number` has (a small copy of `done`'s count)."""
        return self.control(number) + b"size"

    def departed(self, number: int) -> bytes:
        """Present once a member of completed round `number` is gone."""
        return self.control(number) + b"departed"

    def closed_in(self, number: int) -> bytes:
        """Present if the rendezvous closed while round `number` was open."""
        return self.control(number) + b"closed"

    def member_id(self, key: bytes) -> int | None:
        """The member id of a member key; None if its name is not one that rdzv writes."""
        return parse_member_name(key.rsplit(b"/", 1)[-1])


def member_name(member_id: int) -> bytes:
    """How a member id appears in keys and in the coordinator key: 16 hex digits."""
    return b"%0*x" % (_MEMBER_NAME_LENGTH, member_id)


def parse_member_name(name: bytes) -> int | None:
    """The member id that `member_name` wrote as `name`; None for any other name."""
    if len(name) != _MEMBER_NAME_LENGTH or name.strip(_HEX_DIGITS):
        return None
    return int(name, 16)


def round_number(value: bytes | None, *, key: bytes) -> int:
    """The number stored at `latest` or `size` (0 if absent); a foreign value is an error.

    rdzv writes a positive number in its canonical decimal form: `0`, `01` or `007` come from
    another program, and accepting them would make a join compare against a value that the
    key does not hold, and so fail for ever.
    """
    if value is None:
        return 0
    if not value.isdigit() or len(value) > 19 or value.startswith(b"0"):
        raise RendezvousStateError(
            f"The key {key!r} holds {value[:40]!r}, not a round number: another program wrote "
            "it, or it is not a rendezvous of rdzv. Choose another run id or delete the key."
        )
    return int(value)


def encode_membership(number: int, members: Sequence[Member]) -> bytes:
    """The value of a round's `done` key."""
    parts = [_MAGIC, _HEADER.pack(number, len(members))]
    for member in members:
        parts.append(_ENTRY.pack(member.id, len(member.info)))
        parts.append(member.info)
    return b"".join(parts)


def decode_membership(value: bytes, *, key: bytes) -> tuple[int, tuple[Member, ...]]:
    """The round number and members (in rank order) of a `done` value.

    Raises `RendezvousStateError` for anything `encode_membership` did not write.
    """
    try:
        if not value.startswith(_MAGIC):
            raise ValueError("no rdzv membership header")
        offset = len(_MAGIC)
        number, count = _HEADER.unpack_from(value, offset)
        offset += _HEADER.size
        if count * _ENTRY.size > len(value) - offset:
            raise ValueError("more members than the value holds")
        members = []
        for _ in range(count):
            member_id, length = _ENTRY.unpack_from(value, offset)
            offset += _ENTRY.size
            info = value[offset : offset + length]
            if len(info) != length:
                raise ValueError("a member's info is cut short")
            offset += length
            members.append(Member(member_id, info))
        if offset != len(value):
            raise ValueError("bytes after the last member")
    except (ValueError, struct.error) as error:
        raise RendezvousStateError(
            f"The round membership at {key!r} is malformed ({error}): another program wrote it."
        ) from error
    return number, tuple(members)
