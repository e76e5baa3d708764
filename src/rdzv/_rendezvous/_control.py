"""A mirror of one round's control keys, shared by every participant on a connection.

Participants wait for changes of their round's few control keys (coordinator, done, departed,
closed). However many participants one connection carries (the demo runs 10,000), the
connection reads those keys once and watches them with one watch; each change wakes the
participants, which look at the mirror. A round's `done` is decoded once per connection too.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from rdzv._errors import RendezvousError, RendezvousWatchCompactedError
from rdzv._etcd import Connection, KeyValue
from rdzv._rendezvous._layout import Decision, decode_decision

T = TypeVar("T")

Seen = tuple[tuple[KeyValue, ...], int]
"""The control keys as read at a revision: `(keys, revision)`."""


class RoundControl:
    """What the control keys of one round hold, as this connection last saw them.

    Attributes:
        keys: the control keys that exist, by key.
        coordinators: every coordinator value seen, so that a waiter can tell whether a
            coordinator that is gone was a member.
    """

    def __init__(self, connection: Connection, prefix: bytes) -> None:
        self._connection = connection
        self.prefix = prefix
        self.keys: dict[bytes, KeyValue] = {}
        self.coordinators: set[bytes] = set()
        self._changed = asyncio.Condition()
        self._failure: RendezvousError | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._users = 0
        self._decoded: tuple[KeyValue, Decision] | None = None
        self.version = 0
        """How many changes the mirror has applied."""
        self.revision = 0
        """The etcd revision up to which the mirror is known to be current."""
        self.election_version = -1
        """`version` when a local participant last tried to become coordinator."""
        self.election = asyncio.Lock()
        """Held by the one local participant that tries to become coordinator."""

    def newer(self, version: int) -> bool | None:
        """True if the mirror changed since it was at `version` (for `wait_for`)."""
        return True if self.version > version else None

    def get(self, name: bytes) -> KeyValue | None:
        """The control key `name` (`b"done"`, ...) if it exists."""
        return self.keys.get(self.prefix + name)

    def decision(self, done: KeyValue) -> Decision:
        """The `Decision` of `done`, decoded once."""
        if self._decoded is None or self._decoded[0] is not done:
            self._decoded = (done, decode_decision(done.value, key=done.key))
        return self._decoded[1]

    async def wait_for(self, predicate: Callable[[], T | None]) -> T:
        """Wait until `predicate()` returns something other than `None`, and return it.

        It is checked now and after every change of the keys. Raises the watch's error if the
        mirror cannot follow etcd any more.
        """
        async with self._changed:
            while True:
                if self._failure is not None:
                    raise self._failure
                result = predicate()
                if result is not None:
                    return result
                await self._changed.wait()

    async def changed(self) -> None:
        """Wake everybody waiting: something they wait for besides the keys has happened."""
        async with self._changed:
            self._changed.notify_all()

    async def _start(self, seen: Seen | None) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(seen))
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure

    async def _follow(self, seen: Seen | None) -> None:
        try:
            while True:
                if seen is None:
                    seen = await self._connection.range(self.prefix, prefix=True)
                kvs, revision = seen
                seen = None
                self._reset(kvs)
                self.revision = max(self.revision, revision)
                self._ready.set()
                async with self._changed:
                    self._changed.notify_all()
                changes = self._connection.watch(
                    self.prefix, start_revision=revision + 1, prefix=True
                )
                try:
                    async for event in changes:
                        self._apply(event.kv, deleted=event.deleted)
                        async with self._changed:
                            self._changed.notify_all()
                except RendezvousWatchCompactedError:
                    continue  # etcd no longer holds what we missed: read the keys again
                finally:
                    await changes.aclose()
        except RendezvousError as error:
            self._failure = error
            self._ready.set()
            async with self._changed:
                self._changed.notify_all()

    def _reset(self, kvs: tuple[KeyValue, ...]) -> None:
        self.version += 1
        self.keys = {}
        for kv in kvs:
            self._apply(kv, deleted=False)

    def _apply(self, kv: KeyValue, *, deleted: bool) -> None:
        self.version += 1
        self.revision = max(self.revision, kv.mod_revision)
        if deleted:
            self.keys.pop(kv.key, None)
        else:
            self.keys[kv.key] = kv
            if kv.key == self.prefix + b"coordinator":
                self.coordinators.add(kv.value)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_mirrors: weakref.WeakKeyDictionary[Connection, dict[bytes, RoundControl]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def round_control(
    connection: Connection, prefix: bytes, *, seen: Seen | None = None
) -> AsyncIterator[RoundControl]:
    """The connection's mirror of the control keys under `prefix`, while the block runs.

    The first user starts it (one read, one watch); the last one stops it. `seen`, the keys
    as a transaction of the caller read them, saves the first user the read: the watch
    starts after its revision.
    """
    mirrors = _mirrors.setdefault(connection, {})
    control = mirrors.get(prefix)
    if control is None or control._failure is not None:
        control = mirrors[prefix] = RoundControl(connection, prefix)
    control._users += 1
    try:
        if control._task is None:
            await control._start(seen)
        else:
            await control._ready.wait()
            if control._failure is not None:
                raise control._failure
        yield control
    finally:
        control._users -= 1
        if control._users == 0:
            if mirrors.get(prefix) is control:
                del mirrors[prefix]
            await control._stop()
