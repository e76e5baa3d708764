"""The connection options of the commands that talk to an etcd of yours, and running on it.

`connection_options` adds them to a command, which receives them checked, as one `EtcdOptions`;
`run_on_etcd` runs the command's work on a connection made of them, and turns a failure of etcd
into one line and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from rdzv import _envelope
from rdzv._backend import DEFAULT_KEY_PREFIX
from rdzv._cli._output import fail, leaves, one_line
from rdzv._demo import DAY
from rdzv._errors import RendezvousError
from rdzv._etcd import Connection, ConnectionOptions
from rdzv._etcd._endpoints import resolve_endpoints
from rdzv._validation import validate_key_prefix, validate_run_id

DEFAULT_ENDPOINT = "127.0.0.1:2379"
DEFAULT_READ_TIMEOUT = 10.0
PASSWORD_ENVIRONMENT_VARIABLE = "RDZV_ETCD_PASSWORD"

F = TypeVar("F", bound=Callable[..., Any])


_NOT_A_SEPARATOR = re.compile(r"[;\s]+")


def endpoints_protocol(endpoints: str, protocol: str | None = None) -> str:
    """The protocol of `--endpoints` (and `--protocol`); `click.BadParameter` for bad ones."""
    found = _NOT_A_SEPARATOR.search(endpoints.strip())
    if found is not None:
        separator = "a space" if found[0].isspace() else repr(found[0][0])
        fixed = _NOT_A_SEPARATOR.sub(",", endpoints.strip())
        raise click.BadParameter(
            f"{endpoints!r} separates endpoints with {separator}: endpoints are separated by "
            f"commas, as in --endpoints {fixed}",
            param_hint="'--endpoints'",
        )
    try:
        return resolve_endpoints(endpoints, protocol)[1]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--endpoints'") from None


def valid_seconds(context: click.Context, parameter: click.Parameter, value: float) -> float:
    """A positive, finite number of seconds, at most a day."""
    if not 0 < value <= DAY:  # false for NaN too
        raise click.BadParameter(
            f"{value:g} is not a number of seconds from 0 (excluded) to {DAY}."
        )
    return value


@dataclasses.dataclass(frozen=True)
class EtcdOptions:
    """The connection options common to every command that talks to an etcd of yours."""

    endpoints: str  # as given, for messages
    options: ConnectionOptions
    key_prefix: str
    state_key: bytes | None = dataclasses.field(repr=False)

    @property
    def read_timeout(self) -> float:
        """Seconds any one etcd call may take, retries included."""
        return self.options.read_timeout

    def connection(self) -> Connection:
        """A new, unopened `Connection` with these options."""
        return Connection(self.options)

    def key(self, run_id: str) -> str:
        """The etcd key of run `run_id`'s state; raises `click.BadParameter` for a bad run id."""
        try:
            return f"{self.key_prefix}/{validate_run_id(run_id)}"
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'--run-id'") from None


_FILE = click.Path(exists=True, dir_okay=False)

_CONNECTION_OPTIONS = (
    click.option(
        "--endpoints",
        envvar=["RDZV_ENDPOINTS", "ETCDCTL_ENDPOINTS"],
        default=DEFAULT_ENDPOINT,
        show_default=True,
        show_envvar=True,
        help="etcd endpoints, host:port[,host:port...]; IPv6 in brackets.",
    ),
    click.option(
        "--protocol",
        envvar="RDZV_PROTOCOL",
        type=click.Choice(["http", "https"], case_sensitive=False),
        default=None,
        show_envvar=True,
        help="http or https; default: the endpoints' http:// or https:// prefix, else http.",
    ),
    click.option(
        "--read-timeout",
        envvar="RDZV_READ_TIMEOUT",
        type=float,
        callback=valid_seconds,
        default=DEFAULT_READ_TIMEOUT,
        show_default=True,
        show_envvar=True,
        help="Seconds any one etcd call may take, retries included.",
    ),
    click.option(
        "--ca-cert",
        envvar="RDZV_CA_CERT",
        type=_FILE,
        show_envvar=True,
        help="With https: the CA certificate (PEM) that signed etcd's; default: the system's.",
    ),
    click.option(
        "--ssl-cert",
        envvar="RDZV_SSL_CERT",
        type=_FILE,
        show_envvar=True,
        help="With https: a client certificate (PEM), for etcd with --client-cert-auth.",
    ),
    click.option(
        "--ssl-cert-key",
        envvar="RDZV_SSL_CERT_KEY",
        type=_FILE,
        show_envvar=True,
        help="The client certificate's private key (PEM).",
    ),
    click.option(
        "--username",
        envvar="RDZV_USERNAME",
        show_envvar=True,
        help=f"An etcd user; its password from --password-file or {PASSWORD_ENVIRONMENT_VARIABLE}.",
    ),
    click.option(
        "--password-file",
        envvar="RDZV_PASSWORD_FILE",
        type=_FILE,
        show_envvar=True,
        help="A file holding the etcd user's password (there is no --password option).",
    ),
    click.option(
        "--key-prefix",
        envvar="RDZV_KEY_PREFIX",
        default=DEFAULT_KEY_PREFIX,
        show_default=True,
        show_envvar=True,
        help="Where rendezvous states live (torchrun's key_prefix).",
    ),
    click.option(
        "--state-key-file",
        envvar="RDZV_STATE_KEY_FILE",
        type=_FILE,
        show_envvar=True,
        help="The secret key file of jobs that sign their states (torchrun's state_key_file).",
    ),
)


def _password(username: str | None, password_file: str | None) -> str | None:
    if username is None:
        if password_file is not None:
            raise click.UsageError("--password-file was given without --username.")
        return None
    if password_file is not None:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as error:
            raise click.BadParameter(
                f"cannot read {password_file!r}: {error.strerror}", param_hint="'--password-file'"
            ) from None
    password = os.environ.get(PASSWORD_ENVIRONMENT_VARIABLE)
    if password is None:
        raise click.UsageError(
            f"The etcd user {username!r} needs a password: pass --password-file or set "
            f"{PASSWORD_ENVIRONMENT_VARIABLE}."
        )
    return password


def _state_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        # Surrounding whitespace is not part of the key, as for torchrun's state_key_file.
        return _envelope.validate_state_key(Path(path).read_bytes().strip())
    except OSError as error:
        raise click.BadParameter(
            f"cannot read {path!r}: {error.strerror}", param_hint="'--state-key-file'"
        ) from None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--state-key-file'") from None


def connection_options(command: F) -> F:
    """Add the connection options to `command`, which receives them as `etcd: EtcdOptions`."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        endpoints: str,
        protocol: str | None,
        read_timeout: float,
        ca_cert: str | None,
        ssl_cert: str | None,
        ssl_cert_key: str | None,
        username: str | None,
        password_file: str | None,
        key_prefix: str,
        state_key_file: str | None,
        **kwargs: Any,
    ) -> Any:
        protocol = endpoints_protocol(endpoints, protocol)
        try:
            prefix = validate_key_prefix(key_prefix)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'--key-prefix'") from None
        try:
            options = ConnectionOptions(
                endpoints,
                protocol=protocol,
                read_timeout=read_timeout,
                ca_cert=ca_cert,
                ssl_cert=ssl_cert,
                ssl_cert_key=ssl_cert_key,
                username=username or None,
                password=_password(username or None, password_file),
            )
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        etcd = EtcdOptions(endpoints, options, prefix, state_key=_state_key(state_key_file))
        return command(*args, etcd=etcd, **kwargs)

    decorated: Callable[..., Any] = wrapper
    for option in reversed(_CONNECTION_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[return-value]


def run_on_etcd(command: str, etcd: EtcdOptions, function: Callable[[Connection], Any]) -> Any:
    """Open a connection, run `function(connection)` on asyncio, and report failures."""
    connection = etcd.connection()

    async def run() -> Any:
        async with connection:
            return await function(connection)

    try:
        return anyio.run(run, backend="asyncio")
    except Exception as error:
        # Also a task group's: the first of its failures, on one line as any other.
        failures = [leaf for leaf in leaves(error) if isinstance(leaf, RendezvousError)]
        if not failures:
            raise
        fail(command, one_line(failures[0], etcd))
