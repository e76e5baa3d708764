"""etcd endpoints: parsing `host:port` lists into `Endpoint` values, and what a scheme means."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Final

DEFAULT_PORT: Final = 2379
PROTOCOLS: Final = ("http", "https")
DEFAULT_PROTOCOL: Final = "http"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One etcd client endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """Parse `"host:port"`, a comma-separated list of them, or a sequence of them.

    The port defaults to 2379; IPv6 addresses go in brackets (`"[::1]:2379"`). An endpoint listed
    twice is kept once, where it first appears. An `http://` or `https://` prefix is accepted;
    what it means is `resolve_endpoints`' business.
    """
    return _parse_all(endpoints)[0]


def resolve_endpoints(
    endpoints: str | Sequence[str], protocol: str | None = None
) -> tuple[tuple[Endpoint, ...], str]:
    """Parse `endpoints` and decide the protocol: `(endpoints, "http" or "https")`.

    This is the one place that gives an `https://` endpoint its meaning, for the library, the
    command line and torchrun alike. The schemes written on the endpoints must agree with each
    other (an endpoint without one follows the others). When `protocol` is `None`, the scheme
    decides, and without a scheme the protocol is http; a `protocol` given (in any case) must
    agree with the scheme.

    Raises:
        ValueError: a malformed endpoint, mixed schemes, a protocol that is not http or https,
            or one that contradicts the scheme.
    """
    parsed, scheme = _parse_all(endpoints)
    if protocol is None:
        return parsed, scheme or DEFAULT_PROTOCOL
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise ValueError("The protocol must be HTTP or HTTPS.")
    if scheme is not None and scheme != protocol.lower():
        raise ValueError(
            f"protocol={protocol!r} contradicts the {scheme}:// scheme of the etcd endpoints "
            f"{endpoints!r}: leave one out, or make them agree."
        )
    return parsed, protocol.lower()


def _parse_all(endpoints: str | Sequence[str]) -> tuple[tuple[Endpoint, ...], str | None]:
    """The endpoints without repeats, and the scheme written on them, if any."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    unique: dict[tuple[object, int], Endpoint] = {}
    schemes: set[str] = set()
    for item in items:
        if not item.strip():
            continue
        scheme, endpoint = _parse_endpoint(item)
        if scheme is not None:
            schemes.add(scheme)
        # Listed twice, an endpoint would be tried twice, and counted twice where every
        # endpoint's failure is counted (the check for TLS misconfiguration).
        unique.setdefault(_identity(endpoint), endpoint)
    if not unique:
        raise ValueError(f"No etcd endpoint was given (got {endpoints!r}).")
    if len(schemes) > 1:
        raise ValueError(
            f"The etcd endpoints {endpoints!r} mix http:// and https://: a connection speaks "
            "one protocol to all of them."
        )
    return tuple(unique.values()), next(iter(schemes), None)


def _identity(endpoint: Endpoint) -> tuple[object, int]:
    """What makes two endpoints the same: the address (any spelling) or the name (any case)."""
    host: object
    try:
        host = ipaddress.ip_address(endpoint.host)
    except ValueError:
        host = endpoint.host.lower()
    return host, endpoint.port


def _parse_endpoint(text: str) -> tuple[str | None, Endpoint]:
    """The scheme written on one endpoint (`"http"`, `"https"` or None), and the endpoint."""
    stripped = text.strip()
    scheme: str | None = None
    head, separator, rest = stripped.partition("://")
    if separator and head.lower() in PROTOCOLS:
        scheme, stripped = head.lower(), rest
    elif separator:
        raise ValueError(
            f"The etcd endpoint {text!r} has the scheme {head}://: only http:// and https:// "
            "are etcd's."
        )
    stripped = stripped.rstrip("/")
    port_text = ""
    if stripped.startswith("["):
        host, bracket, rest = stripped[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"The etcd endpoint {text!r} is malformed: expected '[ipv6]:port'.")
        port_text = rest[1:]
        _require_ipv6(host, text)
    elif stripped.count(":") > 1:
        host = stripped
        _require_ipv6(host, text)
    else:
        host, _, port_text = stripped.partition(":")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"The etcd endpoint {text!r} is malformed: expected 'host:port'.")
    if not port_text:
        return scheme, Endpoint(host, DEFAULT_PORT)
    # ASCII digits only: str.isdigit() also accepts '²' (which int() refuses) and '٣' (which it
    # reads as 3). Leading zeros aside, a port has at most five digits, which also keeps int()
    # clear of its limit on very long digit strings.
    digits = port_text.lstrip("0")
    if (
        not (port_text.isascii() and port_text.isdigit())
        or len(digits) > 5
        or not 0 < int(digits or "0") < 65536
    ):
        raise ValueError(
            f"The etcd endpoint {text!r} has an invalid port {port_text!r}: expected 1 to 65535, "
            "in ASCII digits."
        )
    return scheme, Endpoint(host, int(digits))


def _require_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"The etcd endpoint {text!r} is malformed: bad IPv6 address.") from None
