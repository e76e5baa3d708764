"""`RollingLease`: one etcd lease that serves every write of a `ttl`-long window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from rdzv._errors import RendezvousLeaseNotFoundError
from rdzv._etcd import Connection

T = TypeVar("T")


class RollingLease:
    """Leases for writes that must live at least `ttl` seconds after they are sent.

    A lease of `2 * ttl` seconds is used for the `ttl` seconds after it was requested, then
    replaced. So a key written with it expires between `ttl` and `2 * ttl` seconds after its
    last write, and a lease is granted (one extra round trip) at most once per `ttl` seconds.
    """

    def __init__(self, connection: Connection, ttl: int) -> None:
        self._connection = connection
        self._ttl = ttl
        self._lease_id: int | None = None
        self._requested_at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self, now: float) -> int | None:
        if self._lease_id is not None and now - self._requested_at < self._ttl:
            return self._lease_id
        return None

    async def current(self, *, deadline: float | None = None) -> int:
        """A lease id that outlives a write sent now by at least `ttl` seconds."""
        lease_id = self._fresh(time.monotonic())
        if lease_id is not None:
            return lease_id
        async with self._lock:
            # The time the request leaves bounds the lease's start from below.
            requested_at = time.monotonic()
            lease_id = self._fresh(requested_at)
            if lease_id is None:
                lease_id = await self._connection.grant_lease(2 * self._ttl, deadline=deadline)
                self._lease_id, self._requested_at = lease_id, requested_at
            return lease_id

    async def run(
        self, write: Callable[[int], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """Run `write(lease_id)`; once more with a new lease if etcd no longer has the lease."""
        lease_id = await self.current(deadline=deadline)
        try:
            return await write(lease_id)
        except RendezvousLeaseNotFoundError:
            # The lease expired or was revoked under us; etcd wrote nothing.
            if self._lease_id == lease_id:
                self._lease_id = None
            return await write(await self.current(deadline=deadline))
