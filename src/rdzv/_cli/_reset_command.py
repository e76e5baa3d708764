"""`rdzv reset`: delete the rendezvous keys of a job, so that its run id starts afresh."""

from __future__ import annotations

import sys

import click

from rdzv import _reset
from rdzv._cli._connection_options import EtcdOptions, connection_options, run_on_etcd
from rdzv._cli._job_options import (
    ROUNDS_PREFIX_OPTION,
    RUN_ID_OPTION,
    STORE_PREFIX_OPTION,
    valid_rounds_prefix,
)
from rdzv._cli._output import fail, plural
from rdzv._etcd import Connection

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
        fail("reset", "nothing deleted: no terminal to ask for confirmation on; pass --yes.")
    return click.confirm(f"Delete these {count} keys?", default=False)


@click.command(epilog=_RESET_EXIT_CODES)
@RUN_ID_OPTION
@ROUNDS_PREFIX_OPTION
@click.option("--store", "with_store", is_flag=True, help="Also delete the job's store keys.")
@STORE_PREFIX_OPTION
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
    rounds_prefix = valid_rounds_prefix(rounds_prefix)

    async def find(connection: Connection) -> tuple[_reset.Group, ...]:
        return await _reset.plan(
            connection,
            run_id,
            key_prefix=etcd.key_prefix,
            rounds_prefix=rounds_prefix,
            store_prefix=store_prefix if with_store else None,
        )

    groups = run_on_etcd("reset", etcd, find)
    count = sum(len(group.keys) for group in groups)
    click.echo(f"Run id {run_id!r} on etcd at {etcd.endpoints}:")
    for line in _reset.to_text(groups):
        click.echo(f"  {line}")
    if count == 0 or dry_run:
        click.echo("Nothing to delete." if count == 0 else "Nothing deleted (--dry-run).")
        return
    if not _confirmed(count, yes):
        fail("reset", "nothing deleted.")

    async def delete(connection: Connection) -> int:
        return await _reset.delete(connection, groups)

    deleted = run_on_etcd("reset", etcd, delete)
    click.echo(f"Deleted {plural(deleted, 'key')}.")
