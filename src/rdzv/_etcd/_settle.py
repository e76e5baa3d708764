"""The settling driver: the one place that resends or resolves a write whose answer was lost.

The attempt driver (`_attempts.drive`) never sends a write twice: once a write may have reached
etcd and no answer came back, it raises `RendezvousOutcomeUnknownError`. `settle` runs a write
on to its known outcome, above it, within one deadline for the whole public call: it sends the
write; after a lost answer it asks the write's own evidence what happened (`lost`), and after
an answer what the answer means (`answered`). Each returns the outcome, or `AGAIN` to send the
write (or its next plan) once more. A resend after a lost answer first waits the attempt
driver's backoff; a new attempt after an answer goes at once, planned on what that answer read
(a compare-and-swap that lost a race).

Each kind of write keeps only what is its own: its request, and its evidence. The state's
envelope carries a write id (`AsyncEtcdBackend`); a store write puts its write id at the key's
marker (`AsyncEtcdStore`); a join finds its member key, and its arrival at the key's create
revision; closing and completing a round are refused once an earlier copy landed, and the
refusal says so; a write that is the same however often it lands is simply sent again.

The driver keeps the rule: an acknowledged write is in etcd exactly once, and a write whose
answer was lost is resolved, never guessed. Once an answer was lost, every failure to find out
(etcd silent until the deadline, or its history compacted) ends the call with the write's
`RendezvousOutcomeUnknownError` (`unresolved`), never with an error that says nothing was
written.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from rdzv._errors import (
    RendezvousCompactedError,
    RendezvousConnectionError,
    RendezvousOutcomeUnknownError,
)
from rdzv._etcd._attempts import INITIAL_BACKOFF, backoff

A = TypeVar("A")
T = TypeVar("T")


class Again(enum.Enum):
    """What `answered` or `lost` returns to have the write sent again."""

    AGAIN = enum.auto()


AGAIN: Final = Again.AGAIN

Unresolved = Callable[[RendezvousOutcomeUnknownError], RendezvousOutcomeUnknownError]
"""The error of a write whose lost answer could not be resolved, from the driver's error for it."""


async def resend() -> Again:
    """`lost` of a write that may land twice, or whose next copy is refused if one landed."""
    return AGAIN


async def answer_itself(answer: A, after_lost: bool) -> A:
    """`answered` of a write whose answer is its outcome (one that may land twice)."""
    return answer


def as_lost(lost: RendezvousOutcomeUnknownError) -> RendezvousOutcomeUnknownError:
    """`unresolved` by default: the attempt driver's error for the last lost answer."""
    return lost


async def settle(
    send: Callable[[], Awaitable[A]],
    *,
    answered: Callable[[A, bool], Awaitable[T | Again]],
    deadline: float,
    lost: Callable[[], Awaitable[T | Again]] = resend,
    unresolved: Unresolved = as_lost,
) -> T:
    """Send a write until its outcome is known, by `deadline`, and return that outcome.

    `send()` sends one attempt (each of its requests ends by `deadline`) and returns etcd's
    answer, or raises `RendezvousOutcomeUnknownError` if the answer was lost.
    `answered(answer, after_lost)` says what an answer means; `after_lost` says whether an
    earlier attempt's answer was lost (that attempt may have landed, or may land yet).
    `lost()` says what a lost answer means, from the write's evidence. `unresolved` makes the
    error raised when a lost answer cannot be resolved in time.
    """
    last_lost: RendezvousOutcomeUnknownError | None = None
    delay = INITIAL_BACKOFF
    while True:
        just_lost: RendezvousOutcomeUnknownError | None = None
        try:
            answer = await send()
        except RendezvousOutcomeUnknownError as error:
            last_lost = just_lost = error
            step = lost()
        except RendezvousConnectionError as error:
            if last_lost is None:
                raise  # every earlier attempt was answered: none landed unseen
            raise unresolved(last_lost) from error
        else:
            step = answered(answer, last_lost is not None)
        result = await _resolving(step, last_lost, unresolved)
        if not isinstance(result, Again):
            return result
        if just_lost is not None:
            # The copy whose answer was lost may still be on its way: give it a moment (the
            # resend then finds it, or is refused by it), and never resend in a tight loop.
            if time.monotonic() >= deadline:
                raise unresolved(just_lost)
            delay = await backoff(delay, deadline)


async def _resolving(
    step: Awaitable[T],
    lost: RendezvousOutcomeUnknownError | None,
    unresolved: Unresolved,
) -> T:
    """`step`; after a lost answer, a failure to read the evidence is `unresolved`."""
    try:
        return await step
    except RendezvousOutcomeUnknownError:
        raise  # the write's evidence has said so itself
    except (RendezvousCompactedError, RendezvousConnectionError) as error:
        if lost is None:
            raise
        raise unresolved(lost) from error
