"""`rdzv demo`: N asyncio agents rendezvous through etcd, and it prints who got which rank."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

import anyio
import click

from rdzv._cli._connection_options import endpoints_protocol, valid_seconds
from rdzv._cli._embedded import embedded_etcd
from rdzv._cli._job_options import valid_run_id
from rdzv._cli._output import EXIT_INTERRUPTED, EXIT_USAGE, fail, leaves, one_line, plural
from rdzv._demo import (
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
from rdzv._errors import CONNECTION_FAILED_MESSAGE, RendezvousConnectionError, RendezvousError
from rdzv._validation import validate_key_prefix, validate_run_id

if TYPE_CHECKING:
    from rdzv._demo import Protocol as DemoProtocol
    from rdzv._server import EtcdServer

DEMO_READ_TIMEOUT = 30.0

_DEMO_EXIT_CODES = """\b
Exit codes:
  0    every agent got a distinct rank
  1    the rendezvous failed or timed out, or etcd did not answer
  2    bad usage, or no etcd binary to start
  130  stopped by Ctrl-C (after deleting what the agents wrote)"""


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
        fail("demo", f"etcd did not start: {error}")
    except BaseException:  # Ctrl-C while it starts
        server.stop()
        raise
    try:
        click.echo(f"Started an embedded etcd at {server.endpoint}.", err=True)
        yield server.endpoint, server
    finally:
        server.stop()


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


@click.command(epilog=_DEMO_EXIT_CODES)
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
    callback=valid_run_id,
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
    callback=valid_seconds,
    help="Seconds before giving up.",
)
@click.option(
    "--read-timeout",
    default=DEMO_READ_TIMEOUT,
    show_default=True,
    callback=valid_seconds,
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
    agents = _agents(
        nodes=nodes,
        protocol=protocol,
        per_connection=per_connection,
        endpoints=endpoints,
        run_id=run_id,
        key_prefix=key_prefix,
        timeout=timeout,
        read_timeout=read_timeout,
    )
    try:
        with _etcd_endpoints(endpoints) as (resolved, server):
            click.echo(_opening_line(agents, resolved))
            result = _rendezvous(agents, resolved, server)
        if agents.live:
            click.echo()
        _print_result(result, nodes)
    except KeyboardInterrupt:
        # Ctrl-C outside the rendezvous (etcd starting or stopping, the ranks printing): the
        # agents had written nothing yet, or had left.
        _interrupted(agents.live, "interrupted; nothing is left.")


@dataclasses.dataclass(frozen=True)
class _Agents:
    """What `demo` runs: its options, checked."""

    nodes: int
    protocol: DemoProtocol
    per_connection: int
    run_id: str
    key_prefix: str
    timeout: float
    read_timeout: float
    live: bool
    """Whether stdout is a terminal: then the progress line is rewritten in place."""


def _agents(
    *,
    nodes: int,
    protocol: DemoProtocol,
    per_connection: int | None,
    endpoints: str | None,
    run_id: str | None,
    key_prefix: str | None,
    timeout: float,
    read_timeout: float,
) -> _Agents:
    """The options of `demo`, checked together; click's usage errors for bad ones."""
    if nodes > max_nodes(protocol):
        raise click.BadParameter(
            f"{nodes} is more than --protocol {protocol} takes ({max_nodes(protocol)}).",
            param_hint="'--nodes'",
        )
    if per_connection is not None and protocol != "rounds":
        raise click.UsageError("--per-connection applies to --protocol rounds only.")
    if endpoints:
        endpoints_protocol(endpoints)
    try:
        prefix = validate_key_prefix(key_prefix or default_key_prefix(protocol))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--key-prefix'") from None
    try:
        run_id = validate_run_id(run_id or f"demo-{uuid.uuid4().hex[:8]}")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--run-id'") from None
    return _Agents(
        nodes=nodes,
        protocol=protocol,
        per_connection=per_connection or DEFAULT_PER_CONNECTION,
        run_id=run_id,
        key_prefix=prefix,
        timeout=timeout,
        read_timeout=read_timeout,
        live=sys.stdout.isatty(),
    )


def _opening_line(agents: _Agents, endpoints: str) -> str:
    """What `demo` is about to run: how many agents, how, as which run id, and where."""
    connections = ""
    if agents.protocol == "rounds":
        count = -(-agents.nodes // agents.per_connection)
        connections = f" on {count} connection{'s' if count > 1 else ''}"
    return (
        f"Rendezvous of {plural(agents.nodes, 'agent')} ({agents.protocol}{connections}), "
        f"run id {agents.run_id!r}, etcd {endpoints}."
    )


def _rendezvous(agents: _Agents, endpoints: str, server: EtcdServer | None) -> DemoResult:
    """Run the agents on `endpoints`: exit 1 if they fail, and 130 at once on Ctrl-C."""
    started = time.monotonic()

    async def rendezvous() -> DemoResult:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, _abandon, agents, endpoints, server, started)
        try:
            return await run_demo(
                agents.nodes,
                endpoints,
                run_id=agents.run_id,
                key_prefix=agents.key_prefix,
                timeout=agents.timeout,
                read_timeout=agents.read_timeout,
                protocol=agents.protocol,
                per_connection=agents.per_connection,
                on_progress=functools.partial(_show_progress, agents),
                progress_interval=0.2 if agents.live else 1.0,
            )
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        return anyio.run(rendezvous, backend="asyncio")
    except Exception as error:
        reach = _Reach(endpoints, agents.read_timeout)
        message = _demo_failure(error, agents.protocol, agents.run_id, agents.timeout, reach)
        if message is None:
            raise  # a bug, not an operational failure: the traceback says where
        if agents.live:
            click.echo()  # end the progress line
        fail("demo", message)


def _show_progress(agents: _Agents, progress: DemoProgress) -> None:
    line = _progress_line(progress, agents.protocol)
    if agents.live:
        click.echo(f"\r{line}", nl=False)
    else:
        click.echo(line)


def _abandon(
    agents: _Agents, endpoints: str, server: EtcdServer | None, started: float
) -> NoReturn:
    """Ctrl-C during the rendezvous: delete what the agents wrote, say so, and exit 130."""
    # This runs on the agents' event loop and holds it, so that no agent sends anything more;
    # then the process exits. Letting every agent leave on its own (a cancelled join deletes
    # its key, a leave revokes its lease) took 5-7 s for 10,000 agents; here their keys go in a
    # few requests.
    line = f"interrupted after {time.monotonic() - started:.1f} s; "
    if server is not None:
        server.stop()
        line += "stopped the embedded etcd and deleted its data: nothing is left."
    else:
        line += _deleted_agent_keys(
            endpoints, agents.protocol, agents.key_prefix, agents.run_id, agents.read_timeout
        )
    _interrupted(agents.live, line, at_once=True)


_CLEAN_UP_TIMEOUT = 5.0
"""Seconds that deleting the keys of agents stopped by Ctrl-C may take."""


def _deleted_agent_keys(
    endpoints: str, protocol: DemoProtocol, key_prefix: str, run_id: str, read_timeout: float
) -> str:
    """Delete the keys of a demo's agents, from another thread; what that left, in words."""
    where = agent_keys(protocol, key_prefix, run_id)
    timeout = min(read_timeout, _CLEAN_UP_TIMEOUT)
    delete = functools.partial(
        delete_agent_keys, endpoints, protocol, key_prefix, run_id, read_timeout=timeout
    )
    deleted = _in_a_thread(delete, timeout)
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
            f"deleted the agents' list at {where} ({plural(deleted, 'key')}): nothing of "
            "theirs is left."
        )
    return (
        f"deleted the {plural(deleted, 'key')} its agents had written under {where}: nothing "
        f"of theirs is left (their leases, which hold nothing now, lapse within {LEASE_TTL} s)."
    )


def _in_a_thread(delete: Callable[[], Awaitable[int]], timeout: float) -> int | BaseException:
    """Run `delete` on an event loop of its own, in a thread; what it returned or raised.

    A `TimeoutError` when it takes more than `timeout` seconds (and a second): the thread, a
    daemon, is left to the process's exit.
    """
    outcome: list[int | BaseException] = []

    def run() -> None:
        # A thread and an event loop of its own: the agents' loop is held (see `_abandon`).
        try:
            outcome.append(anyio.run(delete, backend="asyncio"))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, name="rdzv-demo-clean-up", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")


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


@dataclasses.dataclass(frozen=True)
class _Reach:
    """The endpoints and read timeout of a command without `EtcdOptions` (`demo`)."""

    endpoints: str
    read_timeout: float


def _demo_failure(
    error: Exception, protocol: str, run_id: str, timeout: float, reach: _Reach
) -> str | None:
    """One line for a failed demo; None for an error that is not an operational failure."""
    leaf = leaves(error)[0]
    if isinstance(leaf, TimeoutError):
        return f"the rendezvous did not complete in {timeout:g} s."
    if isinstance(leaf, RendezvousError):
        message = one_line(leaf, reach)
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
        fail("demo", "the ranks are not a permutation of 0..N-1: the rendezvous failed.")
    if result.protocol == "rounds":
        click.echo(
            f"{plural(nodes, 'agent')} took ranks 0..{nodes - 1} in round {result.round} in "
            f"{result.seconds:.3f} s, then left in {result.leave_seconds or 0:.3f} s."
        )
    else:
        click.echo(
            f"{plural(nodes, 'agent')} took ranks 0..{nodes - 1} in {result.seconds:.3f} s "
            f"with {result.conflicts} CAS conflicts."
        )
    requests = _requests_line(result, nodes)
    if requests is not None:
        click.echo(requests)
