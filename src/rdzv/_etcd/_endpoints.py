"""etcd endpoints: parsing `host:port` lists into `Endpoint` values."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Final

DEFAULT_PORT: Final = 2379


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One etcd client endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """Parse `"host:port"`, a comma-separated list of them, or a sequence of them.

    The port defaults to 2379; IPv6 addresses go in brackets (`"[::1]:2379"`); an `http://` or
    `https://` prefix is accepted and ignored (the `protocol` argument decides).
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = tuple(_parse_endpoint(item) for item in items if item.strip())
    if not parsed:
        raise ValueError(f"No etcd endpoint was given (got {endpoints!r}).")
    return parsed


def _parse_endpoint(text: str) -> Endpoint:
    stripped = text.strip()
    for scheme in ("http://", "https://"):
        if stripped.lower().startswith(scheme):
            stripped = stripped[len(scheme) :]
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
        return Endpoint(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"The etcd endpoint {text!r} has an invalid port {port_text!r}.")
    return Endpoint(host, int(port_text))


def _require_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"The etcd endpoint {text!r} is malformed: bad IPv6 address.") from None
