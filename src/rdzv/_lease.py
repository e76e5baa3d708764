"""`RollingLease`: one etcd lease of exactly `ttl` seconds, refreshed by every write sent on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from rdzv._errors import RendezvousError, RendezvousLeaseNotFoundError
from rdzv._etcd import Connection, LeaseKeeper, follow_lease, refresh_lease

T = TypeVar("T")

logger = logging.getLogger("rdzv.lease")

REFRESH_INTERVAL: Final = 0.1
"""A lease's keep-alives go out at most this often (seconds); the last write's at most this late.

Each keep-alive costs the client about as much CPU as a small request (a stream write and a
read through gRPC's completion queue): one per write made `set_state` 25-35% slower than raw
aetcd in the overhead benchmark. A fifth of etcd's 500 ms expiry check, this is within etcd's
own granularity.
"""


class RollingLease:
    """The lease of one writer's keys, so that each key expires `ttl` seconds after its last write.

    One lease of TTL `ttl` serves every write. With each write, a keep-alive for the lease goes
    out on the connection's shared keep-alive stream (`Connection.refresh_lease`), and its
    answer is not awaited: the write stays one round trip. Keep-alives go out at most once per
    `REFRESH_INTERVAL`: a write sent less than that after the last one gets its keep-alive when
    the interval ends, shared with the other writes within it. A new lease is granted (one
    extra round trip) only when the current one has expired (etcd answered a keep-alive with
    TTL 0, or a write with "lease not found"), or may expire before a write sent now and its
    keep-alive land; see "Races" below.

    Exactness: etcd refreshes a lease to expire `ttl` seconds after it receives a keep-alive
    (K), and attaches the key when it applies the write (W). K leaves with W, or at most
    `REFRESH_INTERVAL` after it, on another stream of the same connection, so the two reach
    etcd in either order:

    - K first: the lease is refreshed, then the key attached. The key expires `ttl` seconds
      after K, a moment (the gap between the arrivals of two messages sent together: well under
      a millisecond to a few, on a healthy connection) before `ttl` seconds after W.
    - W first: the key is attached to the lease, which is then refreshed. The key expires `ttl`
      seconds after K: that gap, plus up to `REFRESH_INTERVAL`, after `ttl` seconds after W.

    K is never sent before W is, so a key never expires sooner than `ttl` seconds after its
    last write was sent, and at most `REFRESH_INTERVAL` and that gap later than `ttl` seconds
    after it was applied, within etcd's own granularity: it looks for expired leases every
    500 ms, and deletes their keys through a raft round. `LeaseTimeToLive` never reports more
    than `ttl`, the TTL the lease was granted with, except where etcd itself raises it: its
    minimum TTL (1.5 election timeouts, 2 s with its default timings) and a new leader, which
    extends every lease by about an election timeout.

    Races: the order of K and W matters only if the lease's expiry falls between them. W first,
    then the expiry, then K: the key is written, then deleted with the lease, early, and K is
    answered with TTL 0. K first, answered with TTL 0, then W: W fails with "lease not found",
    nothing is written, and `run` writes again on a new lease; but if etcd has seen the lease
    expire and not yet revoked it (a few hundred milliseconds), W is applied, and the key
    deleted a moment later. So the lease must not be close to expiry when K and W leave. This
    process knows a lower bound of etcd's expiry of the lease (`LeaseKeeper.alive_until`: the
    time the last keep-alive that etcd answered was sent, plus `ttl`; at first, the time the
    grant was asked for, plus `ttl`), and uses the lease only while that bound lies more than a
    margin ahead: the read timeout (within which a write's retries end), or half of `ttl` if
    shorter. Otherwise it takes a new lease first. With writes at least every `ttl / 2` seconds
    (every keep-alive's answer moves the bound on), one lease serves them all.

    What remains: a write or keep-alive held up longer than that margin (a failover, a broken
    keep-alive stream). A write that lands late on an expired lease fails and is written
    again (or, in the moments before etcd revokes the lease, is applied and deleted with it);
    a keep-alive that lands late does not extend the lease, which then expires at the bound,
    at least the margin after the write was sent, and the next write takes a new lease.
    """

    def __init__(self, connection: Connection, ttl: int) -> None:
        self._connection = connection
        self._ttl = ttl
        # The write lands within the read timeout, its keep-alive leaves within the interval.
        self._margin = min(ttl / 2, max(connection.read_timeout, REFRESH_INTERVAL))
        self._keeper: LeaseKeeper | None = None
        self._lock = asyncio.Lock()
        self._refreshed_at = -math.inf  # when the last keep-alive was sent
        self._trailing: asyncio.TimerHandle | None = None  # the keep-alive due after a burst
        self._sending: set[asyncio.Task[None]] = set()

    def _usable(self, now: float) -> LeaseKeeper | None:
        keeper = self._keeper
        if keeper is not None and keeper.alive_until - now > self._margin and not keeper.expired:
            return keeper
        return None

    async def current(self, *, deadline: float | None = None) -> int:
        """The lease for a write sent now: refreshed on the way, or new.

        Call it just before sending the write: the keep-alive goes out with the write.
        """
        keeper = self._usable(time.monotonic())
        if keeper is None:
            async with self._lock:
                # The time the grant is asked for bounds the lease's start from below.
                requested_at = time.monotonic()
                keeper = self._usable(requested_at)
                if keeper is None:
                    lease_id = await self._connection.grant_lease(self._ttl, deadline=deadline)
                    keeper = follow_lease(
                        self._connection, lease_id, self._ttl, granted_at=requested_at
                    )
                    if self._keeper is not None:
                        self._keeper.release()  # its keys expire with it, on their own
                    self._keeper = keeper
        await self._refresh(keeper)
        return keeper.lease_id

    async def _refresh(self, keeper: LeaseKeeper) -> None:
        """Send a keep-alive for a write sent now, or have one sent when the interval ends."""
        now = time.monotonic()
        if now - self._refreshed_at >= REFRESH_INTERVAL:
            self._refreshed_at = now
            await refresh_lease(self._connection, keeper.lease_id)
        elif self._trailing is None:
            # One went out less than the interval ago, before this write: one more goes out
            # when the interval ends, for this write and any that follow within it.
            self._trailing = asyncio.get_running_loop().call_later(
                self._refreshed_at + REFRESH_INTERVAL - now, self._refresh_later
            )

    def _refresh_later(self) -> None:
        self._trailing = None
        if self._keeper is None:
            return
        self._refreshed_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._send(self._keeper.lease_id))
        self._sending.add(task)  # held until it ends: the loop keeps only weak references
        task.add_done_callback(self._sending.discard)

    async def _send(self, lease_id: int) -> None:
        with contextlib.suppress(RendezvousError):  # closed since: nothing to keep alive
            await refresh_lease(self._connection, lease_id)

    async def run(
        self, write: Callable[[int], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """Run `write(lease_id)`; once more with a new lease if etcd no longer has the lease."""
        lease_id = await self.current(deadline=deadline)
        try:
            return await write(lease_id)
        except RendezvousLeaseNotFoundError:
            # The lease expired or was revoked under us; etcd wrote nothing.
            logger.info(
                "Lease %x expired before a write on it landed; writing again on a new lease",
                lease_id,
                extra={"rdzv_lease": lease_id, "rdzv_ttl": self._ttl},
            )
            keeper = self._keeper
            if keeper is not None and keeper.lease_id == lease_id:
                keeper.release()
                self._keeper = None
            return await write(await self.current(deadline=deadline))
