"""Where a rendezvous keeps what in etcd, and how a round's membership is written down.

Under `{key_prefix}/{run_id}/`:

- `closed`: present once the rendezvous is closed; no join succeeds after it.
- `latest`: the number of the latest completed round, in decimal (absent: none yet).
- `round/{n}/m/{member}`: one key per participant of round `n`, holding its node info, on the
  participant's own lease. `{member}` is the lease id in hex, which etcd makes unique.
- `round/{n}/m`: the round's arrivals counter. Every join puts it in the join's transaction,
  so its etcd `version` after the put is the join's arrival number, 1, 2, 3, ... in the order
  etcd applied the joins (the order of the member keys' create revisions).
- `round/{n}/c/`: the round's control keys, the only ones that participants watch:
  `coordinator` (the member id of the one participant that decides completion, on its lease),
  `done` (the round's `Decision`, written once, when the round completes), `size` (how many
  members the round has), `departed` (written when a member of the completed round is gone)
  and `closed` (written by `close()` into the round that was open when the rendezvous closed).

A round's `done` is small whatever the round's size: the size, the revision at which the
coordinator chose the members, and the arrival numbers below the last member that are not
members (nodes that left before completion, copies of a join sent twice). From its own arrival
number a node computes its rank; nobody receives the whole membership. Whoever wants it (`rdzv
inspect`, `AsyncRendezvous.read_members`) reads the member keys as they were at that revision,
and applies the same rule as the coordinator: the keys named after the lease they are on, in
the order of their create revisions, the first `size` of them.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import struct
from collections.abc import Iterable
from typing import Final

from rdzv._errors import RendezvousStateError
from rdzv._etcd import KeyValue

_MAGIC: Final = b"rdzv-round\x02"
# round, size, view revision, first revision, coordinator id, coordinator is a member, kind,
# number of entries
_HEADER: Final = struct.Struct(">QIQQQBBI")
_ENTRY: Final = struct.Struct(">Q")
_BY_ARRIVAL: Final = 0  # the entries are the arrival numbers that are not members
_BY_ID: Final = 1  # the entries are the member ids, in rank order

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

    def arrivals(self, number: int) -> bytes:
        """The arrivals counter of round `number`; as a prefix, it covers the member keys too."""
        return self.round(number) + b"m"

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


def is_member_key(layout: Layout, kv: KeyValue) -> bool:
    """Whether `kv`, under a round's member prefix, is a participant's: named after its lease."""
    return layout.member_id(kv.key) == kv.lease != 0


def choose(
    layout: Layout, kvs: Iterable[KeyValue], size: int, *, first_revision: int = 0
) -> list[KeyValue]:
    """The members of a round: the first `size` participants' keys, in arrival order.

    `first_revision`: keys created before it are not candidates.
    """
    candidates = sorted(
        (kv for kv in kvs if kv.create_revision >= first_revision and is_member_key(layout, kv)),
        key=lambda kv: kv.create_revision,
    )
    return candidates[:size]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a round's `done` says: who the members are, in a few bytes for any size.

    With `gaps` (arrival numbers, ascending), the members are the round's arrivals in order,
    skipping `gaps`, the first `size` of them: a node that arrived `k`-th has rank `k - 1 -
    (gaps below k)`. With `ids` (when the coordinator could not number every member's
    arrival: see `Coordinator`), the members are those ids in rank order.
    """

    number: int
    size: int
    view_revision: int
    """The etcd revision of the member keys the coordinator chose from."""
    first_revision: int
    """With `gaps`: the revision of the round's first arrival; keys created before it are
    not participants' (no join counted them)."""
    coordinator: int
    """The member id of the coordinator that completed the round."""
    coordinator_is_member: bool
    gaps: tuple[int, ...] | None = None
    ids: tuple[int, ...] | None = None

    def rank(self, member_id: int, arrival: int | None) -> int | None:
        """The rank of the node `member_id` whose join arrived `arrival`-th; None: not a member.

        Raises `LookupError` if the rank depends on an arrival number the node does not know.
        """
        if self.ids is not None:
            return self._ranks.get(member_id)
        assert self.gaps is not None
        if arrival is None:
            raise LookupError("the arrival number is needed")
        index = bisect.bisect_left(self.gaps, arrival)
        if index < len(self.gaps) and self.gaps[index] == arrival:
            return None
        rank = arrival - 1 - index
        return rank if rank < self.size else None

    @functools.cached_property
    def _ranks(self) -> dict[int, int]:
        """The rank of each listed id, computed once (a connection's waiters share `self`)."""
        return {member_id: rank for rank, member_id in enumerate(self.ids or ())}


def encode_decision(decision: Decision) -> bytes:
    """The value of a round's `done` key."""
    kind, entries = (
        (_BY_ID, decision.ids) if decision.ids is not None else (_BY_ARRIVAL, decision.gaps)
    )
    assert entries is not None
    header = _HEADER.pack(
        decision.number,
        decision.size,
        decision.view_revision,
        decision.first_revision,
        decision.coordinator,
        decision.coordinator_is_member,
        kind,
        len(entries),
    )
    return b"".join([_MAGIC, header, *(_ENTRY.pack(entry) for entry in entries)])


def decode_decision(value: bytes, *, key: bytes) -> Decision:
    """The `Decision` of a `done` value; `RendezvousStateError` for anything rdzv did not write."""
    try:
        if not value.startswith(_MAGIC):
            raise ValueError("no rdzv round header")
        offset = len(_MAGIC)
        number, size, view, first, coordinator, is_member, kind, count = _HEADER.unpack_from(
            value, offset
        )
        offset += _HEADER.size
        if len(value) - offset != count * _ENTRY.size:
            raise ValueError("its length does not match its number of entries")
        entries = tuple(entry for (entry,) in _ENTRY.iter_unpack(value[offset:]))
        if kind == _BY_ID and count != size:
            raise ValueError("its size and its list of members differ")
        if kind == _BY_ARRIVAL and list(entries) != sorted(set(entries)):
            raise ValueError("its arrival numbers are not ascending")
        if kind not in (_BY_ID, _BY_ARRIVAL) or is_member > 1:
            raise ValueError("an unknown kind of entries")
    except (ValueError, struct.error) as error:
        raise RendezvousStateError(
            f"The round decision at {key!r} is malformed ({error}): another program wrote it."
        ) from error
    return Decision(
        number,
        size,
        view,
        first,
        coordinator,
        bool(is_member),
        gaps=entries if kind == _BY_ARRIVAL else None,
        ids=entries if kind == _BY_ID else None,
    )
