"""`rdzv check`: whether etcd, the credentials and torchrun are ready for a rendezvous."""

from __future__ import annotations

import dataclasses
import json

import anyio
import click

from rdzv import _check
from rdzv._cli._connection_options import EtcdOptions, connection_options
from rdzv._cli._job_options import ROUNDS_PREFIX_OPTION, STORE_PREFIX_OPTION, valid_rounds_prefix
from rdzv._cli._output import fail
from rdzv._etcd import Connection, parse_endpoints

_CHECK_EXIT_CODES = """\b
Exit codes:
  0  every check passed
  1  a check failed (each failed line says what to do)
  2  bad usage (a bad option or argument)"""


def _check_target(
    etcd: EtcdOptions, rounds_prefix: str, store_prefix: str, torch: bool | None
) -> _check.Target:
    def connect(some: str) -> Connection:
        return Connection(dataclasses.replace(etcd.options, endpoints=parse_endpoints(some)))

    return _check.Target(
        endpoints=tuple(str(endpoint) for endpoint in etcd.options.endpoints),
        connect=connect,
        key_prefix=etcd.key_prefix,
        rounds_prefix=valid_rounds_prefix(rounds_prefix),
        store_prefix=store_prefix,
        username=etcd.options.username,
        read_timeout=etcd.read_timeout,
        torch=torch,
    )


@click.command(epilog=_CHECK_EXIT_CODES)
@ROUNDS_PREFIX_OPTION
@STORE_PREFIX_OPTION
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
        fail("check", f"{failed} of {len(findings)} checks failed.")
