"""Overload: when etcd says it has too much to do, resends wait longer, in a growing window.

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


async def test_a_refused_call_is_sent_again_until_etcd_takes_it(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A write that etcd refuses twice for load is sent a third time, and lands."""
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=2)
    revision = await _put(connection, send, time.monotonic() + 10)
    assert send.attempts == 3
    assert (await connection.get(f"{etcd_key_prefix}/k".encode())) is not None
    assert revision > 0


async def test_a_refused_call_ends_at_its_deadline(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A call that etcd keeps refusing fails at its deadline, naming the refusal."""
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=math.inf)
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError, match="too many requests"):
        await _put(connection, send, started + 1.0)
    elapsed = time.monotonic() - started
    assert 1.0 - 0.05 <= elapsed < 1.0 + MARGIN


async def test_many_refused_calls_on_one_connection_resend_within_their_windows(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Thirty refused calls sharing a connection each wait a window, none a turn behind others."""
    sends = [Refusing(connection, f"{etcd_key_prefix}/{i}", refusals=1) for i in range(30)]
    started = time.monotonic()
    await asyncio.gather(*(_put(connection, send, started + 30) for send in sends))
    assert all(send.attempts == 2 for send in sends)
    # A first window is OVERLOAD_BACKOFF; a budget of 10 at once, then 5 a second, took 4 s.
    assert time.monotonic() - started < OVERLOAD_BACKOFF + 1.5


async def test_connection_failures_keep_the_short_backoff(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """Resends after a connection failure (nothing reached etcd) keep the short backoff, free."""
    failure = (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    send = Refusing(connection, f"{etcd_key_prefix}/k", refusals=3, answer=failure)
    started = time.monotonic()
    await _put(connection, send, started + 10)
    assert send.attempts == 4
    # 25 + 50 + 100 ms at most, not the seconds of an overload's backoff.
    assert time.monotonic() - started < OVERLOAD_BACKOFF
