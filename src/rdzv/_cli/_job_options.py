"""The options that name a job, and where its rounds and store keys live."""

from __future__ import annotations

import click

from rdzv._rendezvous import DEFAULT_ROUNDS_PREFIX
from rdzv._store import DEFAULT_STORE_PREFIX
from rdzv._validation import validate_key_prefix, validate_run_id, validate_store_prefix


def valid_run_id(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    """A run id that can name a rendezvous, and is not blank (a quoting mistake, surely)."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter(f"{value!r} is blank: give the job's run id.")
    try:
        return validate_run_id(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


RUN_ID_OPTION = click.option(
    "--run-id",
    required=True,
    envvar="RDZV_RUN_ID",
    show_envvar=True,
    callback=valid_run_id,
    help="The job.",
)

ROUNDS_PREFIX_OPTION = click.option(
    "--rounds-prefix",
    envvar="RDZV_ROUNDS_PREFIX",
    default=DEFAULT_ROUNDS_PREFIX,
    show_default=True,
    show_envvar=True,
    help="Where rdzv.AsyncRendezvous (torchrun's etcd-v3-rounds) keeps its rounds.",
)


def valid_rounds_prefix(value: str) -> str:
    """The value of `--rounds-prefix`, checked; raises `click.BadParameter` for a bad one."""
    try:
        return validate_key_prefix(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--rounds-prefix'") from None


def _store_prefix(context: click.Context, parameter: click.Parameter, value: str) -> str:
    """A store prefix, ending with '/' as the store's own."""
    try:
        return validate_store_prefix(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


STORE_PREFIX_OPTION = click.option(
    "--store-prefix",
    envvar="RDZV_STORE_PREFIX",
    default=DEFAULT_STORE_PREFIX,
    show_default=True,
    show_envvar=True,
    callback=_store_prefix,
    help="Where the c10d store's keys live (torchrun's store_prefix).",
)
