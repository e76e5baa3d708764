"""The demo: N agents rendezvous through etcd and take distinct ranks, with either protocol."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import rdzv
from rdzv._cli._embedded import EMBEDDED_COMPACTION_RETENTION, embedded_etcd
from rdzv._demo import DemoProgress, run_demo
from support import closed_port, run_cli

pytestmark = pytest.mark.anyio


def _demo_process(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m rdzv demo ARGUMENTS` with its output on pipes."""
    return subprocess.run(
        [sys.executable, "-m", "rdzv", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ------------------------------------------------------------------------------- the library


async def test_agents_take_ranks_zero_to_n_minus_one(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Sixteen agents of the rounds protocol each get one distinct rank in 0..15, in round 1."""
    result = await run_demo(
        16, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60, protocol="rounds"
    )
    assert result.protocol == "rounds"
    assert sorted(result.ranks.values()) == list(range(16))
    assert sorted(result.ranks) == sorted(f"node-{i}" for i in range(16))
    assert result.round == 1


async def test_agents_on_several_connections_share_one_round(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With five agents per connection, 16 agents use four connections and one round."""
    result = await run_demo(
        16,
        etcd_endpoints,
        run_id="demo",
        key_prefix=etcd_key_prefix,
        timeout=60,
        protocol="rounds",
        per_connection=5,
    )
    assert result.connections == 4
    assert sorted(result.ranks.values()) == list(range(16))


async def test_agents_leave_so_the_same_run_id_forms_the_next_round(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A second demo on the run id of a finished one completes, as round 2."""
    options: dict[str, Any] = {"run_id": "again", "key_prefix": etcd_key_prefix, "timeout": 60}
    rounds = [
        (await run_demo(4, etcd_endpoints, protocol="rounds", **options)).round for _ in range(2)
    ]
    assert rounds == [1, 2]


async def test_progress_ends_with_every_agent_joined_and_ranked(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """The last progress report counts all N agents as joined and ranked."""
    reports: list[DemoProgress] = []
    await run_demo(
        6,
        etcd_endpoints,
        run_id="demo",
        key_prefix=etcd_key_prefix,
        timeout=60,
        protocol="rounds",
        on_progress=reports.append,
    )
    last = reports[-1]
    assert (last.nodes, last.joined, last.ranked) == (6, 6, 6)


async def test_etcd_requests_are_counted_by_method(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """The result has etcd's own count of the requests: a lease and a Txn per agent, at least."""
    result = await run_demo(
        10, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60, protocol="rounds"
    )
    assert result.requests is not None
    assert result.requests["LeaseGrant"] >= 10
    assert result.requests["Txn"] >= 10


async def test_an_incomplete_round_times_out(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """A round held back by a member of the previous one ends in TimeoutError, on time."""
    async with rdzv.connect(etcd_endpoints) as connection:
        # Round 1 completes with one member that stays: round 2 cannot complete while it does.
        stayer = rdzv.AsyncRendezvous(
            connection, "held", min_nodes=1, max_nodes=1, key_prefix=etcd_key_prefix
        )
        await stayer.join()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await run_demo(
                2,
                etcd_endpoints,
                run_id="held",
                key_prefix=etcd_key_prefix,
                timeout=1,
                protocol="rounds",
            )
        assert time.monotonic() - started < 10
        await stayer.leave()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nodes": 0}, "nodes must be an int from 1 to 131072"),
        ({"nodes": 5000, "protocol": "cas"}, "nodes must be an int from 1 to 4096"),
        ({"per_connection": 0}, "per_connection must be a positive int"),
        ({"timeout": float("nan")}, "timeout must be a positive number of seconds"),
        ({"read_timeout": 0}, "read_timeout must be a positive number"),
        ({"run_id": "a/b"}, "must not contain '/'"),
    ],
)
async def test_bad_arguments_are_value_errors(
    etcd_endpoints: str, options: dict[str, Any], message: str
) -> None:
    """Bad arguments raise ValueError, naming the argument, before any agent starts."""
    arguments: dict[str, Any] = {"nodes": 2, "run_id": "demo", "timeout": 10, "protocol": "rounds"}
    arguments.update(options)
    with pytest.raises(ValueError, match=re.escape(message)):
        await run_demo(endpoints=etcd_endpoints, **arguments)


async def test_cas_agents_take_ranks_zero_to_n_minus_one(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Eight agents of the cas protocol each get one distinct rank in 0..7."""
    result = await run_demo(
        8, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60, protocol="cas"
    )
    assert result.protocol == "cas"
    assert sorted(result.ranks.values()) == list(range(8))


async def test_cas_final_state_lists_every_agent_in_rank_order(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With cas, the stored participant list is the agents ordered by rank."""
    result = await run_demo(
        5, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60, protocol="cas"
    )
    async with rdzv.connect(etcd_endpoints) as connection:
        stored = await rdzv.AsyncEtcdBackend(
            connection, "demo", key_prefix=etcd_key_prefix
        ).get_state()
    assert stored is not None
    by_rank = sorted(result.ranks, key=result.ranks.__getitem__)
    assert stored[0] == ("[" + ", ".join(f'"{name}"' for name in by_rank) + "]").encode()


# ---------------------------------------------------------------------------- the command


def test_cli_demo_on_given_endpoints_prints_ranks(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """`rdzv demo --endpoints E` prints one line per rank and a summary, and exits 0."""
    outcome = run_cli(
        "demo", "--nodes", "4", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix
    )
    assert outcome.exit_code == 0, outcome.output
    assert len(re.findall(r"rank +\d+ +node-\d+", outcome.output)) == 4
    assert re.search(r"4 agents took ranks 0\.\.3 in round 1 in [\d.]+ s", outcome.output)


def test_cli_demo_shows_the_first_and_last_ranks_of_many(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Of 100 agents, the demo lists ranks 0..7 and 92..99 and says how many it left out."""
    outcome = run_cli(
        "demo", "-n", "100", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix
    )
    assert outcome.exit_code == 0, outcome.output
    ranks = [int(rank) for rank in re.findall(r"rank +(\d+) +node-\d+", outcome.output)]
    assert ranks == [*range(8), *range(92, 100)]
    assert "... 84 more ..." in outcome.output


def test_cli_demo_with_the_cas_protocol(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """`--protocol cas` rendezvous through one shared list and counts its lost CAS."""
    outcome = run_cli(
        "demo",
        "-n",
        "6",
        "--protocol",
        "cas",
        "--endpoints",
        etcd_endpoints,
        "--key-prefix",
        etcd_key_prefix,
    )
    assert outcome.exit_code == 0, outcome.output
    assert "(cas on" not in outcome.output
    assert re.search(
        r"6 agents took ranks 0\.\.5 in [\d.]+ s with \d+ CAS conflicts", outcome.output
    )


def test_cli_demo_runs_get_fresh_run_ids(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Two runs on one etcd both succeed, each in round 1 of a run id of its own."""
    run_ids = []
    for _ in range(2):
        outcome = run_cli(
            "demo", "-n", "3", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix
        )
        assert outcome.exit_code == 0, outcome.output
        assert "in round 1 in" in outcome.output
        run_ids += re.findall(r"run id '(demo-[0-9a-f]+)'", outcome.output)
    assert len(set(run_ids)) == 2


def test_cli_demo_prints_progress_lines_into_a_pipe(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With its output on a pipe, the demo prints progress as lines, the last with all N."""
    completed = _demo_process(
        "-n", "16", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix
    )
    assert completed.returncode == 0, completed.stderr
    assert "\r" not in completed.stdout
    assert re.search(r"^joined 16/16  ranked 16/16 +[\d.]+ s$", completed.stdout, re.MULTILINE)


@pytest.mark.slow
def test_cli_demo_prints_a_progress_line_a_second(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A demo of several seconds on a pipe prints a progress line about every second."""
    completed = _demo_process(
        "-n", "6000", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix
    )
    assert completed.returncode == 0, completed.stderr
    seconds = [
        float(s)
        for s in re.findall(
            r"^joined +\d+/6000  ranked +\d+/6000 +([\d.]+) s$", completed.stdout, re.MULTILINE
        )
    ]
    assert len(seconds) >= 3, completed.stdout
    # Every second, give or take a busy event loop; and the final line when all have ranks.
    gaps = [later - earlier for earlier, later in itertools.pairwise(seconds[:-1])]
    assert all(0.9 < gap < 5 for gap in gaps), seconds


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--nodes", "0"], "is not in the range 1<=x<=131072"),
        (["--nodes", "5000", "--protocol", "cas"], "more than --protocol cas takes (4096)"),
        (["--protocol", "paxos"], "'paxos' is not one of 'rounds', 'cas'"),
        (["--per-connection", "0"], "is not in the range x>=1"),
        (["--per-connection", "5", "--protocol", "cas"], "applies to --protocol rounds only"),
        (["--timeout", "0"], "0 is not a number of seconds from 0 (excluded) to 86400"),
        (["--timeout", "nan"], "nan is not a number of seconds"),
        (["--read-timeout", "-1"], "-1 is not a number of seconds"),
        (["--read-timeout", "inf"], "inf is not a number of seconds"),
        (["--read-timeout", "soon"], "'soon' is not a valid float"),
        (["--run-id", "a/b"], "must not contain '/'"),
        (["--key-prefix", "relative"], "must be a string that starts with '/'"),
        (["--endpoints", "host:port"], "invalid port"),
    ],
)
def test_bad_options_exit_2_before_etcd_starts(arguments: list[str], message: str) -> None:
    """Bad options exit 2 with a one-line message and no traceback, and start no etcd."""
    outcome = run_cli("demo", *arguments)
    assert outcome.exit_code == 2
    assert message in outcome.stderr
    assert "Started an embedded etcd" not in outcome.stderr
    assert "Traceback" not in outcome.output


def test_cli_demo_on_a_closed_rendezvous_fails_cleanly(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A run id whose rendezvous is closed makes the demo exit 1 saying so."""

    async def close() -> None:
        async with rdzv.connect(etcd_endpoints) as connection:
            await rdzv.AsyncRendezvous(
                connection, "closed", min_nodes=1, max_nodes=1, key_prefix=etcd_key_prefix
            ).close()

    anyio.run(close)
    outcome = run_cli(
        "demo",
        "-n",
        "2",
        "--run-id",
        "closed",
        "--endpoints",
        etcd_endpoints,
        "--key-prefix",
        etcd_key_prefix,
    )
    assert outcome.exit_code == 1
    assert "rdzv demo: The rendezvous 'closed' is closed" in outcome.stderr


def test_cli_demo_cas_on_the_run_id_of_a_finished_run_fails_cleanly(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With cas, a run id whose list is already full makes the demo exit 1 saying why."""
    arguments = ["-n", "2", "--protocol", "cas", "--run-id", "twice"]
    arguments += ["--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix]
    assert run_cli("demo", *arguments).exit_code == 0
    outcome = run_cli("demo", *arguments)
    assert outcome.exit_code == 1
    assert "in the list of 'twice' before joining: it is an earlier run's" in outcome.stderr


@pytest.mark.slow
def test_cli_demo_fails_with_exit_code_1_when_etcd_is_unreachable() -> None:
    """An unreachable etcd makes the demo exit 1 with a connection error, not hang."""
    started = time.monotonic()
    outcome = run_cli(
        "demo", "-n", "2", "--endpoints", f"127.0.0.1:{closed_port()}", "--read-timeout", "1"
    )
    assert time.monotonic() - started < 10
    assert outcome.exit_code == 1
    assert "The connection to etcd has failed" in outcome.stderr


def test_cli_demo_exits_1_when_its_etcd_does_not_start() -> None:
    """An embedded etcd that exits at once makes the demo exit 1 saying so, with no traceback."""
    outcome = run_cli("demo", "-n", "2", env={"RDZV_ETCD_BINARY": "/bin/false"})
    assert outcome.exit_code == 1
    assert outcome.stderr.startswith("rdzv demo: etcd did not start: ")
    assert "Traceback" not in outcome.output


def test_the_embedded_etcd_compacts_its_history() -> None:
    """The etcd that demo and serve start runs with revision auto-compaction."""
    with embedded_etcd("rdzv-compaction") as server:
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--auto-compaction-mode=revision" in command
    assert f"--auto-compaction-retention={EMBEDDED_COMPACTION_RETENTION}".encode() in command


@pytest.mark.slow
def test_python_m_rdzv_demo_starts_its_own_etcd() -> None:
    """`python -m rdzv demo` with no endpoints starts an embedded etcd and succeeds."""
    completed = _demo_process("--nodes", "3")
    assert completed.returncode == 0, completed.stderr
    assert "Started an embedded etcd" in completed.stderr
    assert "3 agents took ranks 0..2 in round 1" in completed.stdout
