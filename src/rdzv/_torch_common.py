"""What rdzv's two torchrun handlers share: the connection options, the logger, torch's errors.

The `etcd-v3` handler and the `etcd-v3-rounds` handler both build on this module, and neither on
the other: here are the connection options read from torchrun's `--rdzv-conf`, the warning that
names the options nobody reads, the hint for a rendezvous that is closed, and `as_torch_errors`,
which re-raises rdzv's errors as torch's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import api as torch_api

from rdzv._errors import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StoreTimeoutError,
)
from rdzv._etcd import ConnectionOptions
from rdzv._etcd._options import DEFAULT_CONNECT_TIMEOUT, validate_connect_timeout
from rdzv._validation import parse_read_timeout

__all__ = [
    "CONNECTION_CONF_KEYS",
    "DEFAULT_ENDPOINT",
    "PASSWORD_ENVIRONMENT_VARIABLE",
    "as_torch_errors",
    "conf_value",
    "connection_options",
    "logger",
    "reset_hint",
    "warn_unknown_conf",
]

PASSWORD_ENVIRONMENT_VARIABLE = "RDZV_ETCD_PASSWORD"
DEFAULT_ENDPOINT = "localhost:2379"

logger = logging.getLogger("rdzv.torch")
"""Both handlers' logger: torchrun shows its messages next to its own rendezvous messages."""

# The `--rdzv-conf` keys that `connection_options` reads (`password` only to refuse it, with a
# message that says where it belongs).
CONNECTION_CONF_KEYS: frozenset[str] = frozenset(
    {
        "ca_cert",
        "cacert",
        "cert",
        "connect_timeout",
        "key",
        "password",
        "password_file",
        "protocol",
        "read_timeout",
        "ssl_cert",
        "ssl_cert_key",
        "username",
    }
)

# (our class, torch's class), most specific first; `StoreTimeoutError` is apart, below.
_TORCH_ERRORS: tuple[tuple[type[RendezvousError], type[Exception]], ...] = (
    (RendezvousConnectionError, torch_api.RendezvousConnectionError),
    (RendezvousStateError, torch_api.RendezvousStateError),
    (RendezvousClosedError, torch_api.RendezvousClosedError),
    (RendezvousTimeoutError, torch_api.RendezvousTimeoutError),
    (RendezvousError, torch_api.RendezvousError),
)


@contextlib.contextmanager
def as_torch_errors(*, timeout: type[Exception] = dist.DistStoreError) -> Iterator[None]:
    """Re-raise rdzv's errors as torch's, with the same message and the original chained.

    torch's elastic agent acts on its own classes. A `StoreTimeoutError` becomes `timeout`:
    `DistStoreError`, or for a pop that must not wait, `QueueEmptyError` (a `DistStoreError`
    too), as TCPStore raises.
    """
    try:
        yield
    except StoreTimeoutError as error:
        raise timeout(str(error)) from error
    except RendezvousError as error:
        for ours, theirs in _TORCH_ERRORS:
            if isinstance(error, ours):
                raise theirs(str(error)) from error
        raise  # pragma: no cover - the last pair catches every RendezvousError


def conf_value(params: torch_api.RendezvousParameters, *names: str) -> str | None:
    """The first of `names` set in `--rdzv-conf` (a name and its legacy aliases)."""
    for name in names:
        value = params.get(name)
        if value:
            return str(value).strip()
    return None


def _password(params: torch_api.RendezvousParameters, username: str | None) -> str | None:
    if params.get("password") is not None:
        raise ValueError(
            "Do not put the etcd password in --rdzv-conf, where every process listing shows it; "
            f"use password_file=PATH or the {PASSWORD_ENVIRONMENT_VARIABLE} environment variable."
        )
    password_file = conf_value(params, "password_file")
    if username is None:
        if password_file:
            raise ValueError("password_file was given without a username.")
        return None
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as error:
            raise ValueError(
                f"The etcd password file {password_file!r} cannot be read: {error.strerror}."
            ) from None
    password = os.environ.get(PASSWORD_ENVIRONMENT_VARIABLE)
    if password is None:
        raise ValueError(
            f"The etcd user {username!r} needs a password: set password_file=PATH in "
            f"--rdzv-conf, or the {PASSWORD_ENVIRONMENT_VARIABLE} environment variable."
        )
    return password


def warn_unknown_conf(params: torch_api.RendezvousParameters, known: frozenset[str]) -> None:
    """Log a warning naming the `--rdzv-conf` keys that are not in `known` (a typo, most often).

    torch passes unknown keys along silently, so `read_timout=10` would leave the read timeout
    at its default without a word. It is a warning on the "rdzv.torch" logger, next to
    torchrun's own rendezvous messages, not an error: a key meant for another backend is
    harmless.
    """
    unknown = sorted(set(params.config) - known)
    if unknown:
        logger.warning(
            "Unknown --rdzv-conf option%s %s, ignored. The options read are: %s.",
            "s" if len(unknown) > 1 else "",
            ", ".join(unknown),
            ", ".join(sorted(known)),
        )


def _read_timeout(params: torch_api.RendezvousParameters) -> float:
    """`read_timeout` in seconds: a positive number up to a day, such as `0.5` (default 60)."""
    return parse_read_timeout(params.get("read_timeout", 60))


def _connect_timeout(params: torch_api.RendezvousParameters) -> float:
    """`connect_timeout` in seconds: a positive number up to a day (default 5)."""
    value = params.get("connect_timeout")
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        return validate_connect_timeout(float(str(value).strip()))
    except ValueError:
        return validate_connect_timeout(str(value))  # refused, with the text in the message


def connection_options(params: torch_api.RendezvousParameters) -> ConnectionOptions:
    """The connection parameters in torchrun's `params` (`ValueError` for bad ones)."""
    read_timeout = _read_timeout(params)
    connect_timeout = _connect_timeout(params)
    endpoints = params.endpoint.strip() or DEFAULT_ENDPOINT
    # rdzv's one rule for schemes: without a protocol option, an https:// endpoint means https,
    # and no scheme means http (torch's etcd-v2 default); an option must agree with the scheme.
    protocol = params.get("protocol")
    username = conf_value(params, "username")
    return ConnectionOptions(
        endpoints,
        protocol=None if protocol is None else str(protocol).strip(),
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
        ca_cert=conf_value(params, "ca_cert", "cacert"),
        ssl_cert=conf_value(params, "ssl_cert", "cert"),
        ssl_cert_key=conf_value(params, "ssl_cert_key", "key"),
        username=username,
        password=_password(params, username),
    )


def reset_hint(params: torch_api.RendezvousParameters, prefix_option: str) -> str:
    """What to do about a closed rendezvous: a new `--rdzv-id`, or the `rdzv reset` command.

    `prefix_option` is the `rdzv reset` option that takes the `key_prefix` of `--rdzv-conf`.
    """
    command = ["rdzv", "reset"]
    if params.endpoint.strip():
        command += ["--endpoints", params.endpoint.strip()]
    key_prefix = conf_value(params, "key_prefix")
    if key_prefix:
        command += [prefix_option, key_prefix]
    command += ["--run-id", params.run_id]
    return (
        "To run the job again, give it a new --rdzv-id, or delete this one's state first: "
        f"{shlex.join(command)}"
    )
