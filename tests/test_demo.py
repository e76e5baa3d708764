"""The demo: N agents rendezvous through etcd and take distinct ranks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

import rdzv
from rdzv._cli import main
from rdzv._demo import run_demo
from support import closed_port

pytestmark = pytest.mark.anyio


async def test_agents_take_ranks_zero_to_n_minus_one(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Sixteen agents each get one distinct rank in 0..15."""
    result = await run_demo(
        16, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60
    )
    assert sorted(result.ranks.values()) == list(range(16))
    assert sorted(result.ranks) == sorted(f"node-{i}" for i in range(16))


async def test_final_state_lists_every_agent_in_rank_order(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """The stored participant list is the agents ordered by rank."""
    result = await run_demo(
        5, etcd_endpoints, run_id="demo", key_prefix=etcd_key_prefix, timeout=60
    )
    async with rdzv.connect(etcd_endpoints) as connection:
        stored = await rdzv.AsyncEtcdBackend(
            connection, "demo", key_prefix=etcd_key_prefix
        ).get_state()
    assert stored is not None
    by_rank = sorted(result.ranks, key=result.ranks.__getitem__)
    assert stored[0] == ("[" + ", ".join(f'"{name}"' for name in by_rank) + "]").encode()


def test_cli_demo_on_given_endpoints_prints_ranks(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """`rdzv demo --endpoints E` prints one line per rank and a summary, and exits 0."""
    outcome = CliRunner().invoke(
        main,
        ["demo", "--nodes", "4", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix],
    )
    assert outcome.exit_code == 0, outcome.output
    assert len(re.findall(r"rank +\d+ +node-\d+", outcome.output)) == 4
    assert re.search(
        r"4 agents took ranks 0\.\.3 in [\d.]+ s with \d+ CAS conflicts", outcome.output
    )


@pytest.mark.slow
def test_cli_demo_fails_with_exit_code_1_when_etcd_is_unreachable() -> None:
    """An unreachable etcd makes the demo exit 1 with a connection error, not hang."""
    outcome = CliRunner().invoke(
        main,
        ["demo", "-n", "2", "--endpoints", f"127.0.0.1:{closed_port()}", "--read-timeout", "1"],
    )
    assert outcome.exit_code == 1
    assert "The connection to etcd has failed" in outcome.output


@pytest.mark.slow
def test_python_m_rdzv_demo_starts_its_own_etcd() -> None:
    """`python -m rdzv demo` with no endpoints starts an embedded etcd and succeeds."""
    completed = subprocess.run(
        [sys.executable, "-m", "rdzv", "demo", "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Started an embedded etcd" in completed.stderr
    assert "3 agents took ranks 0..2" in completed.stdout
