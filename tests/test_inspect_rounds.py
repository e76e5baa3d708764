"""`rdzv inspect` on a rendezvous of rounds (`AsyncRendezvous`, torchrun's `etcd-v3-rounds`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest
from click.testing import Result

import rdzv
from support import RawEtcd, run_cli

pytestmark = pytest.mark.anyio


def _inspect(endpoints: str, rounds_prefix: str, *options: str) -> Result:
    arguments = ["inspect", "--endpoints", endpoints, "--run-id", "job"]
    arguments += ["--key-prefix", f"{rounds_prefix}-torch", "--rounds-prefix", rounds_prefix]
    return run_cli(*arguments, *options)


@pytest.fixture
async def one_round_and_one_waiting(
    etcd_endpoints: str, etcd_key_prefix: str
) -> AsyncIterator[None]:
    """Round 1 complete with nodes a (rank 0) and b; node c waits in round 2 (which needs 3)."""
    async with rdzv.connect(etcd_endpoints) as connection:

        def node(max_nodes: int) -> rdzv.AsyncRendezvous:
            return rdzv.AsyncRendezvous(
                connection,
                "job",
                min_nodes=max_nodes,
                max_nodes=max_nodes,
                key_prefix=etcd_key_prefix,
            )

        first, second, late = node(2), node(2), node(3)
        async with anyio.create_task_group() as joining:
            joining.start_soon(first.join, b"a")
            await anyio.sleep(0.3)  # a joins first, so it has rank 0
            joining.start_soon(second.join, b"b")
        async with anyio.create_task_group() as waiting:
            waiting.start_soon(late.join, b"c\x1b[31m")
            await anyio.sleep(0.5)
            yield
            waiting.cancel_scope.cancel()
        for each in (first, second, late):
            await each.leave()


@pytest.mark.usefixtures("one_round_and_one_waiting")
async def test_inspect_shows_the_complete_round_in_rank_order_and_the_waiting_node(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """The latest round's members are listed by rank, and the open round's waiting nodes."""
    outcome = await anyio.to_thread.run_sync(_inspect, etcd_endpoints, etcd_key_prefix)
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.stdout.splitlines()
    assert "open, latest complete round 1" in lines[0]
    assert lines[1].startswith("round 1: complete, 2 members, coordinator ")
    assert lines[2].startswith("  rank 0     member ")
    assert lines[2].endswith("  a")
    assert lines[3].startswith("  rank 1     member ")
    assert lines[3].endswith("  b")
    assert lines[4].startswith("round 2: open, 1 waiting")


@pytest.mark.usefixtures("one_round_and_one_waiting")
async def test_node_info_reaches_the_terminal_escaped(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A node info holding a terminal escape is printed as text, never as the escape."""
    outcome = await anyio.to_thread.run_sync(_inspect, etcd_endpoints, etcd_key_prefix)
    assert "\x1b" not in outcome.stdout
    assert "c\\x1b[31m" in outcome.stdout


@pytest.mark.usefixtures("one_round_and_one_waiting")
async def test_inspect_json_has_the_rounds(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """--json has a "rounds" object: closed, latest, and each round with its members."""
    outcome = await anyio.to_thread.run_sync(_inspect, etcd_endpoints, etcd_key_prefix, "--json")
    assert outcome.exit_code == 0, outcome.output
    rounds = json.loads(outcome.stdout)["rounds"]
    assert (rounds["closed"], rounds["latest"]) == (False, 1)
    complete, waiting = rounds["rounds"]
    assert [m["info"] for m in complete["members"]] == ["a", "b"]
    assert (waiting["complete"], waiting["count"]) == (False, 1)


def test_a_foreign_latest_key_is_one_line_and_exit_1(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """A `latest` key another program wrote is reported, not trusted: exit 1."""
    raw_etcd_sync.put(f"{etcd_key_prefix}/job/latest", b"\x1b]0;pwned\x07")
    outcome = _inspect(etcd_endpoints, etcd_key_prefix)
    assert outcome.exit_code == 1
    assert "not an rdzv rendezvous" in outcome.stdout
    assert "\x1b" not in outcome.output


def test_nothing_at_all_is_exit_1_naming_both_places(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With neither a state nor rounds, inspect says where it looked, and exits 1."""
    outcome = _inspect(etcd_endpoints, etcd_key_prefix)
    assert outcome.exit_code == 1
    assert f"no rounds under '{etcd_key_prefix}/job/'" in outcome.stderr


async def _one_node_round(etcd_endpoints: str, etcd_key_prefix: str, *, close: bool) -> None:
    """Round 1 completes with one node, which then leaves (after closing the rendezvous)."""
    async with rdzv.connect(etcd_endpoints) as connection:
        node = rdzv.AsyncRendezvous(
            connection, "job", min_nodes=1, max_nodes=1, key_prefix=etcd_key_prefix
        )
        await node.join(b"a")
        if close:
            await node.close()
        await node.leave()


async def test_a_round_of_one_member_says_member(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """A complete round of one node reads "1 member", not "1 members"."""
    await _one_node_round(etcd_endpoints, etcd_key_prefix, close=False)
    outcome = await anyio.to_thread.run_sync(_inspect, etcd_endpoints, etcd_key_prefix)
    assert outcome.exit_code == 0, outcome.output
    assert outcome.stdout.splitlines()[1] == "round 1: complete, 1 member"


async def test_the_next_round_of_a_closed_rendezvous_says_closed(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """After close, the round after the latest reads "closed", not "open": nobody can join it."""
    await _one_node_round(etcd_endpoints, etcd_key_prefix, close=True)
    outcome = await anyio.to_thread.run_sync(_inspect, etcd_endpoints, etcd_key_prefix)
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.stdout.splitlines()
    assert "closed, latest complete round 1" in lines[0]
    assert lines[-1] == "round 2: closed, 0 waiting"
