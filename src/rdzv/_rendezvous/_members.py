"""A completed round's members, read on demand: nobody is sent them when the round completes.

The coordinator chose them from the member keys as they were at the decision's view revision,
so reading the keys at that revision (one read, whatever happened since) and applying the same
rule gives the same members in the same order. Once etcd has compacted that revision the
members cannot be read any more: `RendezvousCompactedError`.
"""

from __future__ import annotations

from rdzv._errors import RendezvousStateError
from rdzv._etcd import Connection, KeyValue
from rdzv._rendezvous._layout import Decision, Layout, Member, choose


async def read_members(
    connection: Connection, layout: Layout, decision: Decision
) -> tuple[Member, ...]:
    """The members of the round `decision` completed, in rank order, with their node info."""
    kvs = await member_keys(connection, layout, decision)
    return tuple(Member(kv.lease, kv.value) for kv in kvs)


async def member_keys(connection: Connection, layout: Layout, decision: Decision) -> list[KeyValue]:
    """The member keys of the round `decision` completed, as the coordinator chose them."""
    prefix = layout.members(decision.number)
    kvs, _ = await connection.range(prefix, prefix=True, revision=decision.view_revision)
    if decision.ids is not None:
        by_id = {kv.lease: kv for kv in kvs if layout.member_id(kv.key) == kv.lease != 0}
        chosen = [by_id.get(member_id) for member_id in decision.ids]
        found = [kv for kv in chosen if kv is not None]
    else:
        found = choose(layout, kvs, decision.size, first_revision=decision.first_revision)
    if len(found) != decision.size:
        raise RendezvousStateError(
            f"Round {decision.number} has {decision.size} members, but {len(found)} of their "
            f"keys were under {prefix!r} at revision {decision.view_revision}: another program "
            "wrote or deleted keys of this rendezvous."
        )
    return found


def keys_of(layout: Layout, decision: Decision) -> set[bytes] | None:
    """The member keys of `decision`'s round when it lists them (None: read them)."""
    if decision.ids is None:
        return None
    return {layout.member(decision.number, member_id) for member_id in decision.ids}
