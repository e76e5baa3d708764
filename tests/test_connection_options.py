"""`rdzv.ConnectionOptions`: every connection option, its default and its check, in one place."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import rdzv
from rdzv._etcd import DEFAULT_READ_TIMEOUT, ConnectionKeywords, Endpoint
from rdzv._portal import shared_connections


def test_the_options_hold_resolved_values() -> None:
    """Endpoints, protocol and timeouts are resolved once, when the options are made."""
    options = rdzv.ConnectionOptions("https://a:1,b", read_timeout=5)
    assert options.endpoints == (Endpoint("a", 1), Endpoint("b", 2379))
    assert options.protocol == "https"
    assert options.read_timeout == 5.0
    assert options.connect_timeout == rdzv.ConnectionOptions("a").connect_timeout


def test_options_written_differently_are_equal() -> None:
    """A scheme prefix and an explicit protocol make equal options."""
    assert rdzv.ConnectionOptions("http://a:2379") == rdzv.ConnectionOptions("a", protocol="HTTP")


def test_the_password_is_not_shown() -> None:
    """The repr of the options shows the user but never the password."""
    options = rdzv.ConnectionOptions("a", username="alice", password="s3cret")
    assert "alice" in repr(options)
    assert "s3cret" not in repr(options)


def test_replace_makes_new_checked_options() -> None:
    """`dataclasses.replace` keeps the resolved endpoints and checks the new value."""
    options = rdzv.ConnectionOptions("[::1]:2380,b")
    shorter = dataclasses.replace(options, read_timeout=3)
    assert (shorter.endpoints, shorter.read_timeout) == (options.endpoints, 3.0)
    with pytest.raises(ValueError, match="read_timeout"):
        dataclasses.replace(options, read_timeout=-1)


@pytest.mark.parametrize(
    ("keywords", "named"),
    [
        ({"read_timeout": 0}, "read_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"protocol": "ftp"}, "protocol"),
        ({"username": "alice"}, "username and a password"),
        ({"username": "", "password": "x"}, "username"),
    ],
)
def test_each_bad_option_is_a_value_error_naming_it(keywords: dict[str, Any], named: str) -> None:
    """A bad option is a ValueError, at construction, that names it."""
    with pytest.raises(ValueError, match=named):
        rdzv.ConnectionOptions("a", **keywords)


def test_the_keywords_type_lists_exactly_the_options() -> None:
    """`ConnectionKeywords`, which functions that pass options on take, cannot drift from them."""
    parameters = inspect.signature(rdzv.ConnectionOptions).parameters
    assert set(ConnectionKeywords.__annotations__) == set(parameters) - {"endpoints"}
    assert parameters["read_timeout"].default == DEFAULT_READ_TIMEOUT


@pytest.mark.parametrize(
    "make",
    [
        rdzv.connect,
        rdzv.Connection,
        lambda options, **keywords: rdzv.EtcdBackend(options, "job", **keywords),
        lambda options, **keywords: rdzv.Rendezvous(
            options, "job", min_nodes=1, max_nodes=1, **keywords
        ),
    ],
    ids=["connect", "Connection", "EtcdBackend", "Rendezvous"],
)
def test_options_and_keywords_together_are_refused(make: Callable[..., object]) -> None:
    """Options given both as an object and as keywords are a ValueError, not a silent pick."""
    with pytest.raises(ValueError, match="not both"):
        make(rdzv.ConnectionOptions("a"), read_timeout=3)


def test_a_connection_keeps_its_options() -> None:
    """`connect` with keywords makes the options, and the connection shows them."""
    connection = rdzv.connect("a:1", read_timeout=7, max_in_flight=3)
    assert connection.options == rdzv.ConnectionOptions("a:1", read_timeout=7, max_in_flight=3)
    assert connection.read_timeout == 7.0


def test_a_facade_made_from_options_shares_with_one_made_from_keywords(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Equal options, as an object or as keywords, give facades one shared connection."""
    options = rdzv.ConnectionOptions(etcd_endpoints, read_timeout=9)
    with (
        rdzv.EtcdBackend(options, "job", key_prefix=etcd_key_prefix) as first,
        rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=etcd_key_prefix, read_timeout=9) as two,
    ):
        assert first.connection is two.connection
        assert [users for _, users in shared_connections()] == [2]
