"""The `rdzv` command line."""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator

import anyio
import click

from rdzv._backend import DEFAULT_KEY_PREFIX
from rdzv._demo import run_demo
from rdzv._errors import RendezvousError
from rdzv._version import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rdzv")
def main() -> None:
    """rdzv: an etcd v3 rendezvous backend for PyTorch elastic training.

    Exit codes: 0 success, 1 the operation failed, 2 bad usage or no etcd to run.
    """


@contextlib.contextmanager
def _etcd_endpoints(endpoints: str | None) -> Iterator[str]:
    """The given endpoints, or those of an embedded etcd started for the duration."""
    if endpoints:
        yield endpoints
        return
    from rdzv.testing import EtcdBinaryNotFoundError, EtcdServer

    try:
        server = EtcdServer(name="rdzv-demo")
        server.start()
    except EtcdBinaryNotFoundError as error:
        click.echo(f"rdzv: {error}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        click.echo(f"Started an embedded etcd at {server.endpoint}.", err=True)
        yield server.endpoint
    finally:
        server.stop()


@main.command()
@click.option("--nodes", "-n", default=8, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--endpoints",
    envvar="ETCDCTL_ENDPOINTS",
    help="etcd endpoints (host:port,...); default: start an embedded etcd.",
)
@click.option("--run-id", default=None, help="Rendezvous run id; default: a fresh one.")
@click.option("--key-prefix", default=DEFAULT_KEY_PREFIX, show_default=True)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before giving up.")
@click.option(
    "--read-timeout", default=10.0, show_default=True, help="Seconds any one etcd call may take."
)
def demo(
    nodes: int,
    endpoints: str | None,
    run_id: str | None,
    key_prefix: str,
    timeout: float,
    read_timeout: float,
) -> None:
    """Rendezvous N asyncio agents through etcd and print who got which rank."""
    run_id = run_id or f"demo-{uuid.uuid4().hex[:8]}"
    live = sys.stdout.isatty()

    def show(joined: int, conflicts: int, seconds: float) -> None:
        if live:
            line = f"joined {joined}/{nodes}  CAS conflicts {conflicts}  {seconds:6.2f} s"
            click.echo(f"\r{line}", nl=False)

    with _etcd_endpoints(endpoints) as resolved:
        click.echo(f"Rendezvous of {nodes} agents, run id {run_id!r}, etcd {resolved}.")
        try:
            result = anyio.run(
                lambda: run_demo(
                    nodes,
                    resolved,
                    run_id=run_id,
                    key_prefix=key_prefix,
                    timeout=timeout,
                    read_timeout=read_timeout,
                    on_progress=show,
                ),
                backend="asyncio",
            )
        except TimeoutError:
            click.echo(f"\nrdzv demo: the rendezvous did not complete in {timeout} s.", err=True)
            sys.exit(EXIT_FAILURE)
        except RendezvousError as error:
            cause = f" ({error.__cause__})" if error.__cause__ else ""
            click.echo(f"\nrdzv demo: {error}{cause}", err=True)
            sys.exit(EXIT_FAILURE)
    if live:
        click.echo()
    for name, rank in sorted(result.ranks.items(), key=lambda item: item[1]):
        click.echo(f"  rank {rank:>4}  {name}")
    ok = sorted(result.ranks.values()) == list(range(nodes))
    click.echo(
        f"{len(result.ranks)} agents took ranks 0..{nodes - 1} in {result.seconds:.3f} s "
        f"with {result.conflicts} CAS conflicts."
        if ok
        else "The ranks are not a permutation of 0..N-1: the rendezvous failed."
    )
    if not ok:
        sys.exit(EXIT_FAILURE)
