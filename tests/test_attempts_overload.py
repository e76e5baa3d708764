"""Overload: when etcd says it has too much to do, resends wait longer and spend a budget.

etcd 3.5 refuses a request it has no room for with code UNKNOWN and "etcdserver: too many
requests" (see `rdzv._etcd._classify.TOO_MANY_REQUESTS`); making a real etcd do that takes
thousands of connections. The tests at the driver's level therefore send real requests to a real
etcd through `drive`, and stand etcd's refusal, exactly as etcd sends it, in front of the first
attempts (as `support.LoseAnswers` stands a lost answer in front of a real transaction).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

import grpc
import pytest
from aetcd import rpc

import rdzv
from rdzv._etcd import _calls
from rdzv._etcd._attempts import (
    MAX_OVERLOAD_BACKOFF,
    OVERLOAD_BACKOFF,
    ResendBudget,
    _budgets,
    budget_of,
    drive,
    overload_backoff,
)
from rdzv._etcd._classify import (
    TIMED_OUT,
    TOO_MANY_REQUESTS,
    Kind,
    classify,
    overloaded,
    synthetic,
)
from rdzv._etcd._links import Link

pytestmark = pytest.mark.anyio

# What a call may take past its deadline: scheduling, a last backoff cut short.
MARGIN = 0.5


class Refusing:
    """A `send` for `drive`: etcd's answer `answer` to the first `refusals` attempts, then a Put."""

    def __init__(
        self,
        connection: rdzv.Connection,
        key: str,
        *,
        refusals: float,
        answer: tuple[grpc.StatusCode, str] = (grpc.StatusCode.UNKNOWN, TOO_MANY_REQUESTS),
    ) -> None:
        self._connection = connection
        self._key = key.encode()
        self._refusals = refusals
        self._answer = answer
        self.attempts = 0

    async def __call__(self, link: Link, timeout: float) -> int:
        """One attempt: refused, or a real Put of the key."""
        self.attempts += 1
        if self.attempts <= self._refusals:
            raise synthetic(*self._answer)
        request = rpc.PutRequest(key=self._key, value=b"taken")
        metadata = self._connection._links.metadata()
        response: Any = await _calls.unary(link.kv.Put(request, timeout=timeout, metadata=metadata))
        return int(response.header.revision)


async def _put(connection: rdzv.Connection, send: Refusing, deadline: float) -> int:
    return await drive(connection._links, send, what="write", deadline=deadline)


def test_etcds_refusal_is_an_overload() -> None:
    """etcd's "too many requests", sent with code UNKNOWN, is taken as a refusal for load."""
    refusal = synthetic(grpc.StatusCode.UNKNOWN, TOO_MANY_REQUESTS)
    assert classify(refusal) is Kind.BUSY
    assert overloaded(refusal)


def test_etcds_own_timeout_is_an_overload() -> None:
    """A proposal that etcd did not apply in time is an overload, and may still be applied."""
    timeout = synthetic(grpc.StatusCode.UNAVAILABLE, TIMED_OUT)
    assert classify(timeout) is Kind.TRANSIENT
    assert overloaded(timeout)


def test_a_connection_failure_is_no_overload() -> None:
    """A channel that cannot connect says nothing of etcd's load."""
    assert not overloaded(synthetic(grpc.StatusCode.UNAVAILABLE, "failed to connect"))


def test_overload_backoff_has_full_jitter() -> None:
    """The waits after an overload spread over the whole window, from near zero to its end."""
    random.seed(19)
    waits = [overload_backoff(2) for _ in range(400)]
    window = 2 * OVERLOAD_BACKOFF
    assert all(0 <= wait <= window for wait in waits)
    assert min(waits) < window / 10
    assert max(waits) > window * 0.9
    assert len(set(waits)) == len(waits)


def test_overload_backoff_grows_to_its_cap() -> None:
    """The window doubles with each overload of a call, up to its cap, even after very many."""
    random.seed(6)
    longest = {n: max(overload_backoff(n) for _ in range(200)) for n in (1, 3, 1000)}
    assert longest[1] <= OVERLOAD_BACKOFF < longest[3] <= MAX_OVERLOAD_BACKOFF
    assert longest[1000] <= MAX_OVERLOAD_BACKOFF


def test_budget_lets_a_burst_through_then_paces_resends() -> None:
    """A full budget lets `capacity` resends go at once; each later one waits its turn."""
    budget = ResendBudget(capacity=3, per_success=0.1, per_second=2)
    now = time.monotonic()
    turns = [budget.reserve(now, now + 60) for _ in range(5)]
    assert turns[:3] == [0.0, 0.0, 0.0]
    assert turns[3] == pytest.approx(0.5, abs=0.01)
    assert turns[4] == pytest.approx(1.0, abs=0.01)


def test_successes_refill_the_budget() -> None:
    """Ten successful calls pay for one resend, at a tenth of a token each."""
    budget = ResendBudget(capacity=1, per_success=0.1, per_second=1e-6)
    now = time.monotonic()
    assert budget.reserve(now, now + 60) == 0.0
    for _ in range(10):
        budget.succeeded()
    assert budget.reserve(now, now + 60) == pytest.approx(0.0, abs=1e-3)


def test_budget_promises_no_turn_past_the_limit() -> None:
    """A resend whose turn would come after its call's deadline gets none, and takes nothing."""
    budget = ResendBudget(capacity=1, per_success=0.1, per_second=1)
    now = time.monotonic()
    budget.reserve(now, now + 60)
    assert budget.reserve(now, now + 0.5) is None
    assert budget.reserve(now, now + 60) == pytest.approx(1.0, abs=0.01)


async def test_a_refused_call_is_sent_again_until_etcd_takes_it(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A write that etcd refuses twice for load is sent a third time, and lands."""
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=2)
    revision = await _put(connection, send, time.monotonic() + 10)
    assert send.attempts == 3
    assert (await connection.get(f"{etcd_key_prefix}/k".encode())) is not None
    assert revision > 0


async def test_resends_on_one_connection_stay_within_its_budget(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Thirty calls that etcd keeps refusing resend at most the budget's burst and its rate."""
    calls = 30
    keys = [f"{etcd_key_prefix}/{i}" for i in range(calls)]
    sends = [Refusing(connection, key, refusals=math.inf) for key in keys]
    started = time.monotonic()
    deadline = started + 2.0
    outcomes = await asyncio.gather(
        *(_put(connection, send, deadline) for send in sends), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(outcome, rdzv.RendezvousConnectionError) for outcome in outcomes)
    resends = sum(send.attempts for send in sends) - calls
    assert resends <= ResendBudget.CAPACITY + ResendBudget.PER_SECOND * elapsed + 1


async def test_a_call_whose_turn_is_far_off_ends_at_its_deadline(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """With the budget promised for seconds ahead, a refused call fails at its deadline."""
    budget = budget_of(connection._links)
    now = time.monotonic()
    while budget.reserve(now, now + 30) is not None:
        pass  # every turn of the next 30 s is promised to other resends
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=1)
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError, match="too many requests"):
        await _put(connection, send, started + 1.0)
    elapsed = time.monotonic() - started
    assert 1.0 - 0.05 <= elapsed < 1.0 + MARGIN
    assert send.attempts == 1


async def test_a_call_waits_for_its_turn_rather_than_failing(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """With the budget just spent, a refused call waits for the next token and then lands."""
    budget = budget_of(connection._links)
    now = time.monotonic()
    while (budget.reserve(now, now + 60) or 0.0) == 0.0:
        pass  # the last reservation promised the next token away
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=1)
    started = time.monotonic()
    await _put(connection, send, started + 10)
    assert send.attempts == 2
    # Its own turn comes a token after the one promised away.
    assert time.monotonic() - started >= 1 / ResendBudget.PER_SECOND


async def test_successful_calls_refill_the_connection_budget(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Each successful call on a connection adds a tenth of a token to its budget."""
    budget = _budgets[connection._links] = ResendBudget(per_second=1e-6)
    now = time.monotonic()
    while budget.reserve(now, now + 1) is not None:
        pass
    before = budget.tokens
    for i in range(10):
        await connection.put(f"{etcd_key_prefix}/{i}".encode(), b"v")
    assert budget.tokens == pytest.approx(before + 10 * ResendBudget.PER_SUCCESS, abs=1e-3)


async def test_connection_failures_spend_no_budget(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Resends after a connection failure (nothing reached etcd) keep the short backoff, free."""
    failure = (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=3, answer=failure)
    started = time.monotonic()
    await _put(connection, send, started + 10)
    assert send.attempts == 4
    assert connection._links not in _budgets
    # 25 + 50 + 100 ms at most, not the seconds of an overload's backoff.
    assert time.monotonic() - started < OVERLOAD_BACKOFF
