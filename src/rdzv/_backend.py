"""`AsyncEtcdBackend`: PyTorch's rendezvous backend contract over etcd v3, on asyncio."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Final, Literal

from rdzv import _envelope
from rdzv._errors import (
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousLeaseNotFoundError,
    RendezvousOutcomeUnknownError,
)
from rdzv._etcd import (
    AGAIN,
    Again,
    Compare,
    Connection,
    Get,
    KeyValue,
    Put,
    TxnResult,
    first_change_after,
    follow_lease,
    read_deadline,
    settle,
)
from rdzv._lease import RollingLease
from rdzv._validation import (
    is_valid_token,
    validate_key_prefix,
    validate_run_id,
    validate_ttl,
    watch_start_revision,
)

DEFAULT_KEY_PREFIX: Final = "/torch/elastic/rendezvous"
DEFAULT_TTL: Final = 7200

Token = int
StateResult = tuple[bytes, Token]
SetStateResult = tuple[bytes, Token, bool]

_RETRY: Final = "retry"

logger = logging.getLogger("rdzv.backend")

# With a state key, how many tokens a backend remembers the position (`_envelope.Position`) of.
_POSITIONS_KEPT: Final = 16
# How long `_release` waits for etcd to revoke a lease that no write used (seconds, at most).
_REVOKE_TIMEOUT: Final = 2.0


class AsyncEtcdBackend:
    """The rendezvous state of one job, kept at `{key_prefix}/{run_id}` in etcd.

    Implements the contract of PyTorch's `RendezvousBackend` (`get_state`, `set_state` with
    compare-and-swap on a token) with one etcd round trip per call. The token is the key's etcd
    mod revision. The state lives on a lease of `ttl` seconds that every write refreshes: it
    disappears `ttl` seconds after the last write (see the docs for the exact bound).

    With `state_key` (at least 16 secret bytes shared by every node of the job), every value
    is signed with HMAC-SHA256 and a value without a valid signature is rejected as corrupt: who
    can write to etcd but lacks the key cannot inject a state.

    Any number of backends may share one `rdzv.Connection`.
    """

    def __init__(
        self,
        connection: Connection,
        run_id: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl: int = DEFAULT_TTL,
        state_key: bytes | None = None,
    ) -> None:
        self._connection = connection
        self._state_key = _envelope.validate_state_key(state_key)
        self._run_id = validate_run_id(run_id)
        self._key = f"{validate_key_prefix(key_prefix)}/{self._run_id}"
        self._key_bytes = self._key.encode()
        self._ttl = validate_ttl(ttl)
        self._lease = RollingLease(connection, self._ttl)
        # With a state key: token -> position of the value at that token, for the last few seen.
        self._positions: dict[Token, _envelope.Position] = {}
        # Whether a write was ever sent; the lease `prepare` granted before any was; the lease
        # `_release` revokes, which no write may use any more.
        self._written = False
        self._unused_lease: int | None = None
        self._revoked_lease: int | None = None

    def __repr__(self) -> str:
        return f"<rdzv.AsyncEtcdBackend key={self._key!r} ttl={self._ttl} on {self._connection!r}>"

    @property
    def name(self) -> Literal["etcd-v3"]:
        """The backend's name, as torchrun's `--rdzv-backend` knows it."""
        return "etcd-v3"

    @property
    def key(self) -> str:
        """The etcd key that holds the state."""
        return self._key

    @property
    def ttl(self) -> int:
        """Seconds without a write after which the state may expire."""
        return self._ttl

    @property
    def connection(self) -> Connection:
        """The connection this backend uses."""
        return self._connection

    async def prepare(self) -> None:
        """Take the state's lease and open the keep-alive stream now, not in the first write.

        Without it, the first `set_state` grants the lease and opens the connection's
        keep-alive stream inside its compare-and-swap, on top of its own round trip. This
        waits for etcd's answer to a keep-alive for the lease, for the connect timeout at most
        (writes do not need it). The state still expires `ttl` seconds after its last write:
        every write refreshes the lease, the first one too, and a first write so late that the
        lease is near its end (less than the read timeout, or `ttl / 2`, left) takes a new one.
        The synchronous facades and torchrun's backend call it as they are created. Raises
        `RendezvousConnectionError` if etcd grants no lease within the read timeout.
        """
        deadline = read_deadline(self._connection)
        lease_id = await self._lease.current(deadline=deadline)  # its keep-alive goes out
        if not self._written and self._revoked_lease is None:
            self._unused_lease = lease_id
        # A second keeper of the lease hears etcd's answer (the rolling lease's keeper is its
        # own); a stream that does not open is opened again in the background.
        keeper = follow_lease(self._connection, lease_id, self._ttl)
        try:
            await keeper.wait_answer(
                min(deadline - time.monotonic(), self._connection.connect_timeout)
            )
        finally:
            keeper.release()

    async def _prepare_or_defer(self) -> None:
        """`prepare`, for a facade's creation: if it fails, the first write does it, as before.

        The creation has already checked that etcd answers; the warm-up never fails it.
        """
        try:
            await self.prepare()
        except RendezvousError as error:
            logger.info(
                "Could not take the lease of the state at %r ahead of the first write (%s); "
                "the first write takes it",
                self._key,
                error,
                extra={"rdzv_key": self._key},
            )

    async def _release(self) -> None:
        """Revoke the lease `prepare` granted if no write was sent on it (the facade's close).

        A lease that a write used may hold the state, which outlives this backend: it is left
        to expire `ttl` seconds after the last write. Bounded by `_REVOKE_TIMEOUT`; a failure
        leaves the unused lease to expire on its own.
        """
        lease_id, self._unused_lease = self._unused_lease, None
        if lease_id is None:
            return
        self._revoked_lease = lease_id  # a write about to use it now takes a new lease instead
        deadline = time.monotonic() + min(_REVOKE_TIMEOUT, self._connection.read_timeout)
        try:
            await self._connection.revoke_lease(lease_id, deadline=deadline)
        except RendezvousError as error:
            logger.debug(
                "Could not revoke the unused lease %x (%s); it expires on its own",
                lease_id,
                error,
                extra={"rdzv_lease": lease_id},
            )

    async def get_state(self) -> StateResult | None:
        """Return the state and its token, or `None` if there is no state.

        Raises `RendezvousStateError` if the stored value is corrupt.
        """
        kv = await self._connection.get(self._key_bytes)
        return None if kv is None else (self._decode(kv), kv.mod_revision)

    async def set_state(self, state: bytes, token: object = None) -> SetStateResult | None:
        """Write `state` if `token` is still the state's token (compare-and-swap).

        Returns `(state, new_token, True)` when written. Otherwise nothing is written and it
        returns `(current_state, current_token, False)`, or `None` if a token was given and there
        is no state. A `None` token writes only if there is no state yet; a token that cannot be
        an etcd revision (a string, a bool, an int below 1 or above 2**63 - 1) never writes.
        """
        if not isinstance(state, bytes | bytearray | memoryview):
            raise TypeError(f"The state must be bytes, not {type(state).__name__}.")
        state = bytes(state)
        if token is None:
            expected = None
            condition = Compare.absent(self._key_bytes)
        elif isinstance(token, int) and is_valid_token(token):
            expected = token
            condition = Compare.mod_revision_is(self._key_bytes, token)
        else:
            current = await self.get_state()
            return None if current is None else (*current, False)
        deadline = read_deadline(self._connection)
        at = _envelope.CREATE
        if self._state_key is not None and expected is not None:
            # A signed value is bound to its place in the key's history: the next one after the
            # value at `token`, whose position this backend saw, or reads once.
            found = await self._position_at(expected, deadline)
            if not isinstance(found, _envelope.Position):
                return found  # the key is no longer at `token`: what the CAS would answer
            at = found.next()
        value = _envelope.encode(state, self._key, self._state_key, at=at)
        outcome = await self._write(state, value, condition, expected, deadline)
        if self._state_key is not None and outcome is not None and outcome[2]:
            # A create's value is the key's version 1, created at its own revision.
            written = at if at.version > 1 else _envelope.Position(outcome[1], 1)
            self._keep_position(outcome[1], written)
        return outcome

    async def _write(
        self,
        state: bytes,
        value: bytes,
        condition: Compare,
        expected: int | None,
        deadline: float,
    ) -> SetStateResult | None:
        """Compare-and-swap `value` in; resolve lost answers (see `_resolve_unknown_outcome`)."""

        async def send() -> TxnResult:
            return await self._lease.run(
                lambda lease: self._swap(value, condition, lease, deadline), deadline=deadline
            )

        async def resolve() -> SetStateResult | Again | None:
            found = await self._resolve_unknown_outcome(state, value, expected, deadline)
            return AGAIN if found == _RETRY else found  # the same bytes, sent again

        async def lost() -> SetStateResult | Again | None:
            logger.info(
                "A write of the state at %r lost its answer; finding out whether it landed",
                self._key,
                extra={"rdzv_key": self._key},
            )
            return await resolve()

        async def answered(result: TxnResult, after_lost: bool) -> SetStateResult | None:
            if result.succeeded or not after_lost:
                return self._outcome(state, result)
            # An earlier attempt under the same condition lost its answer; it may have landed
            # only since it was looked for, and be why this one failed.
            found = await resolve()
            if isinstance(found, Again):
                raise self._unresolved()
            return found

        return await settle(
            send,
            answered=answered,
            lost=lost,
            unresolved=lambda _: self._unresolved(),
            deadline=deadline,
        )

    async def _swap(
        self, value: bytes, condition: Compare, lease: int, deadline: float
    ) -> TxnResult:
        """One attempt of a compare-and-swap of `value`, on `lease`."""
        if lease == self._revoked_lease:
            # `_release` is revoking it: as if etcd had (the lease makes way for a new one).
            raise RendezvousLeaseNotFoundError(f"Lease {lease:x} was revoked.")
        self._written = True
        self._unused_lease = None  # it may hold the state from now on: never revoked
        return await self._connection.txn(
            [condition],
            [Put(self._key_bytes, value, lease)],
            [Get(self._key_bytes)],
            what=f"write the state at {self._key!r}",
            deadline=deadline,
        )

    async def _position_at(
        self, token: Token, deadline: float
    ) -> _envelope.Position | SetStateResult | None:
        """The position of the value at `token`; or, if the key has moved on, its state."""
        position = self._positions.get(token)
        if position is not None:
            return position
        kv = await self._connection.get(self._key_bytes, deadline=deadline)
        if kv is None or kv.mod_revision != token:
            return self._current(kv)
        return self._remember(kv)

    async def watch(self, token: object = None) -> AsyncGenerator[tuple[bytes | None, Token], None]:
        """Yield `(state, token)` for every change after `token` (from now if `None`).

        `state` is `None` when the state was deleted (or expired). Uses etcd's watch, resumes
        after a reconnect without losing a change, and raises `RendezvousWatchCompactedError` if
        etcd no longer holds the history after `token`. A token that no watch can start after
        (one that is not an etcd revision, or the last one, 2**63 - 1) raises `ValueError`.
        """
        start = watch_start_revision(token)
        changes = self._connection.watch(self._key_bytes, start_revision=start)
        try:
            async for event in changes:
                if event.deleted:
                    yield None, event.kv.mod_revision
                else:
                    yield self._decode(event.kv), event.kv.mod_revision
        finally:
            await changes.aclose()

    # ------------------------------------------------------------------------------- internals

    def _decode(self, kv: KeyValue) -> bytes:
        if self._state_key is not None:
            self._remember(kv)  # etcd's own metadata: true even if the value is corrupt
        return _envelope.decode(kv, self._key, self._state_key)

    def _current(self, kv: KeyValue | None) -> SetStateResult | None:
        return None if kv is None else (self._decode(kv), kv.mod_revision, False)

    def _outcome(self, state: bytes, result: TxnResult) -> SetStateResult | None:
        if result.succeeded:
            return state, result.revision, True
        current = result.ranges[0]
        return self._current(current[0] if current else None)

    def _remember(self, kv: KeyValue) -> _envelope.Position:
        position = _envelope.Position(kv.create_revision, kv.version)
        self._keep_position(kv.mod_revision, position)
        return position

    def _keep_position(self, token: Token, position: _envelope.Position) -> None:
        self._positions.pop(token, None)
        self._positions[token] = position
        if len(self._positions) > _POSITIONS_KEPT:
            del self._positions[next(iter(self._positions))]

    async def _resolve_unknown_outcome(
        self, state: bytes, value: bytes, token: int | None, deadline: float
    ) -> SetStateResult | Literal["retry"] | None:
        """Find out whether a write whose answer was lost landed, by `deadline`.

        Every written value carries a random write id, so finding our exact bytes in etcd
        proves that our write landed; a value without them is someone else's. Returns the
        outcome, or `"retry"` when the write has not landed and its condition still holds, so
        that the same compare-and-swap (the same bytes) may be sent again: whichever of the two
        lands, the other cannot, and both carry our write id.
        """
        try:
            found = await self._find_own_write(state, value, token, deadline)
        except (RendezvousCompactedError, RendezvousConnectionError) as error:
            # etcd no longer holds the history to tell, or did not answer in time.
            raise self._unresolved(error) from error
        if found == _RETRY:
            outcome, revision = "it has not landed, and its condition still holds", token
        elif found is None:
            outcome, revision = "it did not land, and the state is gone", None
        elif found[2]:
            outcome, revision = "it landed", found[1]
        else:
            outcome, revision = "it did not land: another write changed the state", found[1]
        logger.info(
            "The lost answer to a write of the state at %r is resolved: %s (revision %s)",
            self._key,
            outcome,
            revision,
            extra={"rdzv_key": self._key, "rdzv_revision": revision, "rdzv_outcome": outcome},
        )
        return found

    def _unresolved(self, cause: BaseException | None = None) -> RendezvousOutcomeUnknownError:
        logger.warning(
            "A write of the state at %r lost its answer, and rdzv could not find out in time "
            "whether it landed%s",
            self._key,
            "" if cause is None else f" ({cause})",
            extra={"rdzv_key": self._key, "rdzv_outcome": "unresolved"},
        )
        return RendezvousOutcomeUnknownError(
            f"A write to '{self._key}' may or may not have landed, and rdzv could not find out "
            "within the read timeout. Read the state again.",
            key=self._key,
        )

    async def _find_own_write(
        self, state: bytes, value: bytes, token: int | None, deadline: float
    ) -> SetStateResult | Literal["retry"] | None:
        get = self._connection.get
        kv = await get(self._key_bytes, deadline=deadline)
        if kv is not None and kv.value == value:
            return state, kv.mod_revision, True
        if token is None:
            if kv is None:
                return _RETRY
            # Someone else's value is there now: was ours the one that created the key?
            first = (
                kv
                if kv.version == 1
                else await get(self._key_bytes, revision=kv.create_revision, deadline=deadline)
            )
            if first is not None and first.value == value:
                return state, kv.create_revision, True
            return self._decode(kv), kv.mod_revision, False
        if kv is not None and kv.mod_revision == token:
            return _RETRY
        # The key changed after `token` (or was deleted since): a write conditioned on `token`
        # that landed is the first change after it.
        change = await first_change_after(
            self._connection, self._key_bytes, token, deadline=deadline
        )
        if not change.deleted and change.kv.value == value:
            return state, change.kv.mod_revision, True
        if kv is None:
            return None
        return self._decode(kv), kv.mod_revision, False
