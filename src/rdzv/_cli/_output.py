"""How a command ends: its exit code, and a failure as one line on stderr."""

from __future__ import annotations

import sys
from typing import NoReturn, Protocol

import click

from rdzv._errors import RendezvousConnectionError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""A command that Ctrl-C (SIGINT) stopped, as shells report it: 128 + 2."""

EXIT_CODES = """\b
Exit codes:
  0  success
  1  the operation failed (etcd unreachable, credentials rejected, no state,
     a state that cannot be read)
  2  bad usage (a bad option or argument)"""
"""The exit codes of a command that reads etcd (the epilog of its help)."""


class Reached(Protocol):
    """Where a command reached etcd: what `one_line` names in a connection failure."""

    @property
    def endpoints(self) -> str: ...

    @property
    def read_timeout(self) -> float: ...


def one_line(error: BaseException, etcd: Reached) -> str:
    """The error, with the gRPC status behind a connection failure, on one line."""
    message = str(error)
    # Exactly the base class: etcd did not answer (its subclasses say something more precise).
    if type(error) is RendezvousConnectionError:
        message = f"etcd at {etcd.endpoints} did not answer within {etcd.read_timeout:g} s"
        if error.code is not None:
            message += f" ({error.code}: {error.details})"
        message += "."
    return " ".join(message.split())


def fail(command: str, message: str) -> NoReturn:
    """Print `rdzv COMMAND: MESSAGE` on stderr and exit 1."""
    click.echo(f"rdzv {command}: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group (a task group's), or `[error]`."""
    inner = getattr(error, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for nested in inner for leaf in leaves(nested)]
    return [error]


def plural(count: int, noun: str) -> str:
    """`1 key`, `2 keys`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
