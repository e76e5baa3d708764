"""`rdzv inspect`: the rendezvous state of a job, and its rounds, as they are now."""

from __future__ import annotations

import json

import click

from rdzv import _inspect
from rdzv._cli._connection_options import EtcdOptions, connection_options, run_on_etcd
from rdzv._cli._job_options import ROUNDS_PREFIX_OPTION, RUN_ID_OPTION, valid_rounds_prefix
from rdzv._cli._output import EXIT_CODES, fail, one_line
from rdzv._errors import RendezvousAuthError, RendezvousError
from rdzv._etcd import Connection
from rdzv._rendezvous._view import RoundsView, view_rounds
from rdzv._rendezvous._view import to_json as rounds_to_json
from rdzv._rendezvous._view import to_text as rounds_to_text
from rdzv._validation import validate_run_id


@click.command(epilog=EXIT_CODES)
@RUN_ID_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@ROUNDS_PREFIX_OPTION
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
    prefix = valid_rounds_prefix(rounds_prefix)

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

    inspection, rounds = run_on_etcd("inspect", etcd, read)
    if rounds is not None and not rounds.exists:
        rounds = None
    if inspection is None and rounds is None:
        if refusals:
            fail("inspect", one_line(refusals[0], etcd))
        fail(
            "inspect",
            f"there is no state at {key!r} and no rounds under {prefix + '/' + run_id + '/'!r} "
            f"(run id {run_id!r}).",
        )
    for refused in refusals:
        click.echo(f"rdzv inspect: not shown: {one_line(refused, etcd)}", err=True)
    _show(inspection, rounds, as_json)
    if inspection is not None and inspection.error is not None:
        fail("inspect", inspection.error)
    if rounds is not None and rounds.error is not None:
        fail("inspect", "the rounds hold a value rdzv did not write (shown above).")


def _show(inspection: _inspect.Inspection | None, rounds: RoundsView | None, as_json: bool) -> None:
    """Print the state and the rounds found: as text, or as one JSON object."""
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
