"""What `rdzv inspect` shows of an `AsyncRendezvous` (and `etcd-v3-rounds`): rounds and members.

Read in one transaction, so at one revision: whether the rendezvous is closed, the latest
completed round with its members in rank order, and the open round with the nodes waiting in
it. Everything shown comes from etcd, where anyone may write: node info is escaped, member
lists are cut at a limit, and a value rdzv did not write is reported, never trusted.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from rdzv._errors import RendezvousCompactedError, RendezvousStateError
from rdzv._etcd import Compare, Connection, Get, KeyValue
from rdzv._rendezvous._layout import Decision, Layout, Member, decode_decision, round_number
from rdzv._rendezvous._members import read_members

SHOWN_MEMBERS: Final = 50
"""The most members listed for a round; the counts are always complete."""

_INFO_SHOWN: Final = 120
_CONTROL_KEYS: Final = 16  # a round has five; more are somebody else's


@dataclasses.dataclass(frozen=True)
class RoundView:
    """One round: complete (members in rank order) or open (nodes waiting, in key order)."""

    number: int
    complete: bool
    count: int
    """How many members (complete) or waiting nodes (open) the round has."""
    members: tuple[Member, ...]
    """The first `SHOWN_MEMBERS` of them."""
    coordinator: str | None
    """The member id that decides the round (16 hex digits), if one holds the key."""
    departed: bool
    """A member of the complete round is gone (its members are about to re-rendezvous)."""
    decision: Decision | None = dataclasses.field(default=None, repr=False, compare=False)
    unreadable: bool = False
    """The complete round's members can no longer be read: etcd compacted their revision."""


@dataclasses.dataclass(frozen=True)
class RoundsView:
    """A rendezvous's rounds at one etcd revision."""

    base: str
    revision: int
    closed: bool
    latest: int
    """The latest completed round (0: none yet)."""
    rounds: tuple[RoundView, ...]
    error: str | None = None
    """Why part of the rendezvous could not be read (a value rdzv did not write)."""

    @property
    def exists(self) -> bool:
        """Whether any key of the rendezvous exists (a foreign one included)."""
        return (
            self.closed
            or self.latest > 0
            or self.error is not None
            or any(r.count or r.coordinator for r in self.rounds)
        )


async def view_rounds(connection: Connection, key_prefix: str, run_id: str) -> RoundsView:
    """The rounds of `run_id` under `key_prefix`, read at one revision."""
    layout = Layout(key_prefix, run_id)
    base = layout.base.decode(errors="backslashreplace")
    what = f"read the rounds of {run_id!r}"
    while True:
        first = await connection.txn([], [Get(layout.latest)], what=what)
        [latest_kvs] = first.ranges
        try:
            latest = round_number(latest_kvs[0].value if latest_kvs else None, key=layout.latest)
        except RendezvousStateError as foreign:
            is_closed = await connection.get(layout.closed) is not None
            return RoundsView(base, first.revision, is_closed, 0, (), error=str(foreign))
        numbers = [n for n in (latest, latest + 1) if n > 0]
        reads = [Get(layout.closed)]
        for number in numbers:
            reads += [
                Get(layout.control(number), prefix=True, limit=_CONTROL_KEYS),
                Get(layout.members(number), prefix=True, limit=SHOWN_MEMBERS),
            ]
        # Only if `latest` is still what the rounds to read were chosen by: one revision.
        unchanged = (
            Compare.mod_revision_is(layout.latest, latest_kvs[0].mod_revision)
            if latest_kvs
            else Compare.absent(layout.latest)
        )
        result = await connection.txn([unchanged], reads, what=what)
        if result.succeeded:
            break
    rounds: list[RoundView] = []
    error: str | None = None
    for index, number in enumerate(numbers):
        control = {kv.key.rsplit(b"/", 1)[-1]: kv for kv in result.ranges[1 + 2 * index]}
        waiting = result.ranges[2 + 2 * index], result.counts[2 + 2 * index]
        try:
            round_ = _round(layout, number, control, waiting)
            if round_.decision is not None:
                round_ = await _with_members(connection, layout, round_, round_.decision)
            rounds.append(round_)
        except RendezvousStateError as failure:
            error = str(failure)
    closed = bool(result.ranges[0])
    return RoundsView(base, result.revision, closed, latest, tuple(rounds), error)


def _round(
    layout: Layout,
    number: int,
    control: dict[bytes, KeyValue],
    waiting: tuple[tuple[KeyValue, ...], int],
) -> RoundView:
    coordinator = control.get(b"coordinator")
    shown_coordinator = _text(coordinator.value, 16) if coordinator is not None else None
    done = control.get(b"done")
    if done is None:
        kvs, count = waiting
        waiting_members = []
        for kv in kvs:
            member_id = layout.member_id(kv.key)
            if member_id is None:
                raise RendezvousStateError(
                    f"The key {kv.key!r} under {layout.members(number)!r} is not a member key: "
                    "another program wrote it."
                )
            waiting_members.append(Member(member_id, kv.value))
        return RoundView(number, False, count, tuple(waiting_members), shown_coordinator, False)
    decision = decode_decision(done.value, key=done.key)
    return RoundView(
        number, True, decision.size, (), shown_coordinator, b"departed" in control, decision
    )


async def _with_members(
    connection: Connection, layout: Layout, round_: RoundView, decision: Decision
) -> RoundView:
    """`round_` with its first members, read at the revision they were chosen at."""
    try:
        members = await read_members(connection, layout, decision)
    except RendezvousCompactedError:
        return dataclasses.replace(round_, unreadable=True)
    return dataclasses.replace(round_, members=members[:SHOWN_MEMBERS])


def _text(value: bytes, limit: int = _INFO_SHOWN) -> str:
    """Bytes from etcd as one printable line: control characters escaped, long values cut."""
    text = value[:limit].decode("utf-8", errors="backslashreplace")
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > limit else "")


def shown_info(info: bytes) -> str:
    """A node info (or any value from etcd) as `inspect` shows it: escaped, cut at 120 bytes."""
    return _text(info)


def to_text(view: RoundsView) -> list[str]:
    """The lines `rdzv inspect` prints for the rounds."""
    lines = [
        f"rounds under {_text(view.base.encode())} at revision {view.revision}: "
        f"{'closed' if view.closed else 'open'}, latest complete round {view.latest or 'none'}"
    ]
    for round_ in view.rounds:
        lines.append(_round_line(round_, closed=view.closed))
        for rank, member in enumerate(round_.members):
            who = f"rank {rank:<5}" if round_.complete else "waiting   "
            lines.append(f"  {who} member {member.id:016x}  {_text(member.info)}")
        if round_.unreadable:
            lines.append("  (etcd has compacted the revision its members were chosen at)")
        elif len(round_.members) < round_.count:
            lines.append(f"  ... and {round_.count - len(round_.members)} more")
    if view.error is not None:
        lines.append(f"not an rdzv rendezvous: {_text(view.error.encode(), 300)}")
    return lines


def members(count: int) -> str:
    """`1 member`, `2 members`."""
    return f"{count} member{'' if count == 1 else 's'}"


def _round_line(round_: RoundView, *, closed: bool) -> str:
    coordinator = f", coordinator {round_.coordinator}" if round_.coordinator else ""
    if round_.complete:
        departed = ", a member has left" if round_.departed else ""
        return f"round {round_.number}: complete, {members(round_.count)}{coordinator}{departed}"
    # The round after the latest is open to joins, unless the rendezvous is closed.
    state = "closed" if closed else "open"
    return f"round {round_.number}: {state}, {round_.count} waiting{coordinator}"


def to_json(view: RoundsView) -> dict[str, object]:
    """The rounds as one JSON object (node info as escaped text)."""
    return {
        "base": view.base,
        "revision": view.revision,
        "closed": view.closed,
        "latest": view.latest,
        "rounds": [
            {
                "round": r.number,
                "complete": r.complete,
                "count": r.count,
                "coordinator": r.coordinator,
                "departed": r.departed,
                "members": [
                    {"member_id": f"{m.id:016x}", "info": _text(m.info)} for m in r.members
                ],
            }
            for r in view.rounds
        ],
        "error": view.error,
    }
