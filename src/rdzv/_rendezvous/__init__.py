"""The scalable rendezvous: one key per node on its own lease, one watched key per round.

- `_layout`: the keys, and the encoding of a round's membership;
- `_control`: the per-connection mirror of a round's control keys that participants wait on;
- `_coordinator`: the one participant per round that decides completion and reports departures;
- `_participant`: `AsyncRendezvous`, what a node calls.
"""

from __future__ import annotations

from rdzv._rendezvous._layout import Member
from rdzv._rendezvous._participant import (
    DEFAULT_LEASE_TTL,
    DEFAULT_ROUNDS_PREFIX,
    MAX_NODE_INFO,
    MAX_NODES,
    AsyncRendezvous,
    Membership,
)

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_ROUNDS_PREFIX",
    "MAX_NODES",
    "MAX_NODE_INFO",
    "AsyncRendezvous",
    "Member",
    "Membership",
]
