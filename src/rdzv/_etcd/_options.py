"""How to reach etcd: the one place where each connection option, its default and its check live.

`ConnectionOptions` is resolved and validated once, when it is made; `Connection`, `connect`,
the facades, torchrun's `--rdzv-conf` and the CLI all build one or take one. A function that
passes the options on takes them as `**options: Unpack[ConnectionKeywords]` and hands them to
`as_options`, so that adding an option is a change here and in the places that read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypedDict

from rdzv._etcd._endpoints import Endpoint, resolve_endpoints
from rdzv._validation import MAX_READ_TIMEOUT, shown, validate_read_timeout

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_READ_TIMEOUT: Final = 60.0
"""Seconds any one etcd call may take, retries included, by default."""

DEFAULT_MAX_IN_FLIGHT: Final = 1000
"""Requests one `Connection` has in flight at most, by default.

Firing thousands of requests at once makes etcd answer "too many requests"; about a thousand in
flight keep a single etcd busy without that.
"""

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
"""Seconds a `Connection` that no endpoint has answered yet waits for one, by default.

Like the `DialTimeout` of etcd's Go client: a mistyped or refused endpoint fails within seconds,
while a connection that has reached etcd rides out a restart within its `read_timeout`.
"""


def validate_connect_timeout(connect_timeout: object) -> float:
    """Return `connect_timeout` as seconds; raise `ValueError` naming it if it is not one."""
    if (
        isinstance(connect_timeout, bool)
        or not isinstance(connect_timeout, int | float)
        or not 0 < connect_timeout <= MAX_READ_TIMEOUT  # false for NaN too
    ):
        raise ValueError(
            "The connect_timeout must be a positive number of seconds, at most "
            f"{MAX_READ_TIMEOUT} (one day), not {shown(connect_timeout)}."
        )
    return float(connect_timeout)


def _validate_max_in_flight(max_in_flight: object) -> int:
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive int, not {max_in_flight!r}.")
    return max_in_flight


def _validate_credentials(username: object, password: object) -> None:
    if (username is None) != (password is None):
        raise ValueError("etcd authentication needs both a username and a password.")
    if username is not None and not isinstance(username, str):
        raise ValueError(f"The etcd username must be a string, not {type(username).__name__}.")
    if username is not None and not username:
        raise ValueError("The etcd username must not be empty.")
    if password is not None and not isinstance(password, str):
        raise ValueError(f"The etcd password must be a string, not {type(password).__name__}.")


@dataclasses.dataclass(frozen=True, init=False)
class ConnectionOptions:
    """How to reach etcd: endpoints, protocol, TLS files, credentials and time bounds.

    Made once and checked once (`ValueError` naming the parameter); `rdzv.connect`, the
    facades and torchrun's `--rdzv-conf` build one from their keywords, or take one made here.
    Options that compare equal make facades of one process share a connection.

    Args:
        endpoints: `"host:port"`, or several separated by commas, tried in order: the connection
            moves to the next when one stops answering. The port defaults to 2379; IPv6
            addresses go in brackets. An endpoint listed twice is used once. An `http://` or
            `https://` prefix sets the protocol; the prefixes given must agree.
        protocol: `"http"` or `"https"` (TLS), in any case. By default, the endpoints' prefix
            decides, and without one it is http; given, it must agree with the prefix.
        read_timeout: seconds that any one call may take, retries included (default 60, at most
            one day, 86400).
        connect_timeout: seconds that a call may take while no endpoint has answered yet
            (default 5, at most a day): a refused or mistyped endpoint fails this soon, naming
            each endpoint and why. Once etcd has answered, calls ride out restarts and failovers
            within `read_timeout` (the shorter of the two applies before).
        max_in_flight: requests a connection has in flight at most (default 1000); more wait
            for a free slot. etcd answers "too many requests" to thousands at once.
        ca_cert: with https, the CA certificate that signed the server's (PEM file); the
            system's trusted CAs if omitted.
        ssl_cert: with https, a client certificate (PEM file), for servers that require one.
        ssl_cert_key: the client certificate's private key (PEM file).
        username: an etcd user, when etcd has authentication enabled.
        password: that user's password (never shown in a repr).

    The attributes hold the resolved values: `endpoints` as a tuple of `Endpoint`, `protocol`
    as `"http"` or `"https"`, the timeouts as floats.
    """

    endpoints: tuple[Endpoint, ...]
    protocol: str
    read_timeout: float
    connect_timeout: float
    max_in_flight: int
    ca_cert: str | Path | None
    ssl_cert: str | Path | None
    ssl_cert_key: str | Path | None
    username: str | None
    password: str | None = dataclasses.field(repr=False)

    def __init__(
        self,
        endpoints: str | Sequence[str] | Sequence[Endpoint],
        *,
        protocol: str | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        ca_cert: str | Path | None = None,
        ssl_cert: str | Path | None = None,
        ssl_cert_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not isinstance(endpoints, str) and isinstance(endpoints, Sequence):
            # `dataclasses.replace` passes the resolved endpoints back in.
            endpoints = [str(each) if isinstance(each, Endpoint) else each for each in endpoints]
        resolved, resolved_protocol = resolve_endpoints(endpoints, protocol)
        _validate_credentials(username, password)
        values = {
            "endpoints": resolved,
            "protocol": resolved_protocol,
            "read_timeout": validate_read_timeout(read_timeout),
            "connect_timeout": validate_connect_timeout(connect_timeout),
            "max_in_flight": _validate_max_in_flight(max_in_flight),
            "ca_cert": ca_cert,
            "ssl_cert": ssl_cert,
            "ssl_cert_key": ssl_cert_key,
            "username": username,
            "password": password,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


class ConnectionKeywords(TypedDict, total=False):
    """`ConnectionOptions`' keywords, for a function that passes them on (`**options`)."""

    protocol: str | None
    read_timeout: float
    connect_timeout: float
    max_in_flight: int
    ca_cert: str | Path | None
    ssl_cert: str | Path | None
    ssl_cert_key: str | Path | None
    username: str | None
    password: str | None


def as_options(
    endpoints: str | Sequence[str] | ConnectionOptions, **options: Unpack[ConnectionKeywords]
) -> ConnectionOptions:
    """`endpoints` if it is the options already, else the options made of it and `options`."""
    if isinstance(endpoints, ConnectionOptions):
        if options:
            raise ValueError(
                "Pass the connection options either as a ConnectionOptions or as keywords, "
                f"not both (got ConnectionOptions and {', '.join(sorted(options))})."
            )
        return endpoints
    return ConnectionOptions(endpoints, **options)
