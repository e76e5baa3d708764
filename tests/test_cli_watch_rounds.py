"""`rdzv watch` on a rendezvous of rounds (`AsyncRendezvous`, torchrun's `etcd-v3-rounds`).

Each test runs `python -m rdzv watch` as a user does, with `--rounds-prefix` set to the test's
own key prefix (and `--key-prefix` next to it), and drives real participants through rounds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

import anyio
import pytest

import rdzv
from conftest import Participants
from support import RdzvProcess

pytestmark = pytest.mark.anyio

LINE_TIMEOUT = 20.0
"""Seconds to wait for a line that the watch should print."""


@pytest.fixture
def watch(etcd_endpoints: str, etcd_key_prefix: str) -> Iterator[Callable[..., RdzvProcess]]:
    """Start `rdzv watch --run-id job` on the test's rounds prefix; killed at teardown."""
    started: list[RdzvProcess] = []

    def start(*options: str) -> RdzvProcess:
        connection = ["--endpoints", etcd_endpoints, "--key-prefix", f"{etcd_key_prefix}-torch"]
        rounds = ["--run-id", "job", "--rounds-prefix", etcd_key_prefix]
        started.append(RdzvProcess("watch", *connection, *rounds, *options))
        return started[-1]

    yield start
    for each in started:
        each.close()


async def _one_round(participants: Participants, *infos: bytes) -> list[rdzv.AsyncRendezvous]:
    """Nodes with `infos` complete one round together; the nodes."""
    nodes = [participants(min_nodes=len(infos), max_nodes=len(infos)) for _ in infos]
    async with anyio.create_task_group() as joining:
        for node, info in zip(nodes, infos, strict=True):
            joining.start_soon(node.join, info)
    return nodes


async def test_watch_shows_a_round_open_then_complete_with_its_size(
    watch: Callable[..., RdzvProcess], participants: Participants
) -> None:
    """A new round is a line when its first node waits, and another when it completes."""
    process = watch()
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    await _one_round(participants, b"a", b"b")
    opened = await process.stdout.next_async(LINE_TIMEOUT)
    assert re.fullmatch(
        r"[\d:.]+  revision \d+  rounds  round 1 opened: a node waits \([ab]\)", opened
    )
    complete = await process.stdout.next_async(LINE_TIMEOUT)
    assert re.fullmatch(r"[\d:.]+  revision \d+  rounds  round 1 complete, 2 members", complete)
    assert process.stop() == 0


async def test_watch_shows_a_member_leaving(
    watch: Callable[..., RdzvProcess], participants: Participants
) -> None:
    """A member of the latest round that leaves is a line naming it, coordinator or not."""
    nodes = await _one_round(participants, b"a", b"b")
    process = watch()
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    for node in nodes:
        await node.leave()
    line = await process.stdout.until_async("is gone", LINE_TIMEOUT)
    assert re.fullmatch(
        r"[\d:.]+  revision \d+  rounds  round 1: member [0-9a-f]{16} is gone \(it left, joined "
        r"again, or its lease expired\); the others rendezvous again",
        line,
    )
    assert process.stop() == 0
    assert process.stop() == 0


async def test_watch_shows_the_rendezvous_closing(
    watch: Callable[..., RdzvProcess], participants: Participants
) -> None:
    """Closing the rendezvous is a line."""
    [node] = await _one_round(participants, b"a")
    process = watch()
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    await node.close()
    line = await process.stdout.until_async("closed", LINE_TIMEOUT)
    assert line.endswith("rounds  closed: nobody can join any more")
    assert process.stop() == 0


async def test_watch_first_shows_the_rounds_as_they_are(
    watch: Callable[..., RdzvProcess], participants: Participants
) -> None:
    """Started on a running job, the first line is its rounds now: latest round and size."""
    await _one_round(participants, b"a", b"b")
    process = watch()
    first = await process.stdout.next_async(LINE_TIMEOUT)
    assert re.fullmatch(
        r"[\d:.]+  revision \d+  rounds  open  latest complete round 1  2 members", first
    )
    assert process.stop() == 0


async def test_watch_says_it_found_rounds_and_no_state(
    watch: Callable[..., RdzvProcess], participants: Participants, etcd_key_prefix: str
) -> None:
    """With rounds and no torch state, a line on stderr says it is a rounds job."""
    await _one_round(participants, b"a")
    process = watch()
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    hint = await process.stderr.next_async(LINE_TIMEOUT)
    assert hint == (
        f"rdzv watch: no state at {etcd_key_prefix}-torch/job, but rounds under "
        f"{etcd_key_prefix}/job/: an etcd-v3-rounds job (rdzv.AsyncRendezvous); showing its rounds."
    )
    assert process.stop() == 0


async def test_watch_says_it_found_a_state_and_no_rounds(
    watch: Callable[..., RdzvProcess], etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With a torch state and no rounds, a line on stderr says it is an etcd-v3 job."""
    async with rdzv.connect(etcd_endpoints) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=f"{etcd_key_prefix}-torch")
        await backend.set_state(b"a state")
    process = watch()
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    hint = await process.stderr.next_async(LINE_TIMEOUT)
    assert hint == (
        f"rdzv watch: a state at {etcd_key_prefix}-torch/job, no rounds under "
        f"{etcd_key_prefix}/job/: an etcd-v3 job; showing its state."
    )
    assert process.stop() == 0


async def test_watch_says_it_found_neither_and_which_options_to_check(
    watch: Callable[..., RdzvProcess], etcd_key_prefix: str
) -> None:
    """With nothing in either place, a line on stderr names both and the options that set them."""
    process = watch()
    watching = await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    assert f"the rounds under {etcd_key_prefix}/job/ from revision" in watching
    hint = await process.stderr.next_async(LINE_TIMEOUT)
    assert hint == (
        f"rdzv watch: nothing at {etcd_key_prefix}-torch/job nor under {etcd_key_prefix}/job/ "
        "yet; waiting for either (are --run-id, --key-prefix and --rounds-prefix the job's?)."
    )
    assert process.stop() == 0


async def test_watch_json_has_the_round_events(
    watch: Callable[..., RdzvProcess], participants: Participants, etcd_key_prefix: str
) -> None:
    """--json: one object per change, under "rounds", with the event, round and member count."""
    process = watch("--json")
    await process.stderr.until_async("^Watching ", LINE_TIMEOUT)
    await _one_round(participants, b"a", b"b")
    opened = json.loads(await process.stdout.next_async(LINE_TIMEOUT))["rounds"]
    complete = json.loads(await process.stdout.next_async(LINE_TIMEOUT))["rounds"]
    assert (opened["event"], opened["round"], opened["base"]) == (
        "opened",
        1,
        f"{etcd_key_prefix}/job/",
    )
    assert (complete["event"], complete["round"], complete["members"]) == ("complete", 1, 2)
    assert complete["revision"] > opened["revision"]
    assert process.stop() == 0
