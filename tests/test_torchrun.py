"""End to end: real torchrun agents rendezvous through etcd and run gloo workers.

Most tests run twice: on `etcd-v3` (torch's own handler over rdzv's backend) and on
`etcd-v3-rounds` (rdzv's handler on the O(N) rendezvous).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from torch.distributed.elastic.rendezvous import RendezvousParameters

import rdzv
from rdzv._cli import main
from rdzv._torch_rounds import RoundsRendezvousHandler, create_rounds_handler
from rdzv.testing import EtcdCluster
from support import closed_port

SCRIPTS = Path(__file__).parent / "torchrun_scripts"

pytestmark = pytest.mark.slow

BACKENDS = ["etcd-v3", "etcd-v3-rounds"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The rendezvous backend the agents use."""
    return str(request.param)


class Agents:
    """torchrun agents started as subprocesses, each in its own session, logging to a file."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, arguments: list[str]) -> subprocess.Popen[bytes]:
        """Start `python -m torch.distributed.run ARGUMENTS`."""
        log = self.directory / f"agent-{len(self.processes)}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *arguments],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # so that killpg() takes the agent's whole group
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def wait(self, process: subprocess.Popen[bytes], deadline: float) -> int | None:
        """The agent's exit code, or None if it was still running at `deadline`."""
        try:
            return process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def report(self) -> str:
        """Every agent's exit code and log, for an assertion message."""
        return "\n".join(
            f"--- agent {index} (pid {process.pid}, exit {process.poll()}) ---\n"
            f"{log.read_text(errors='replace')}"
            for index, (process, log) in enumerate(zip(self.processes, self.logs, strict=True))
        )

    def log(self, process: subprocess.Popen[bytes]) -> str:
        """The output of one agent (and its workers)."""
        return self.logs[self.processes.index(process)].read_text(errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_agent(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent's process group, unless the agent was already reaped."""
    if process.poll() is None:  # not reaped, so its pid is still its own
        _kill_group(process.pid)


def _kill_worker(pid: int) -> None:
    """SIGKILL a worker of the elastic script (a session leader), if that pid still is one."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone already
    if b"elastic.py" in command:
        _kill_group(pid)


def _worker_records(flag_dir: Path, kind: str = "worker") -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(flag_dir.glob(f"{kind}-*.json"))]


@pytest.fixture
def flag_dir(tmp_path: Path) -> Path:
    """A directory where the workers of the elastic script leave their records."""
    directory = tmp_path / "flags"
    directory.mkdir()
    return directory


@pytest.fixture
def agents(tmp_path: Path, flag_dir: Path) -> Iterator[Agents]:
    """A launcher of torchrun agents; every agent and worker left running is killed at the end."""
    env = {**os.environ, "RDZV_TEST_FLAG_DIR": str(flag_dir), "PYTHONUNBUFFERED": "1"}
    launched = Agents(tmp_path, env)
    try:
        yield launched
    finally:
        for process in launched.processes:
            _kill_agent(process)
        # torchrun starts each worker in a session of its own: kill those the elastic script
        # recorded too, in case their agent was killed before it could stop them.
        for record in _worker_records(flag_dir):
            _kill_worker(record["pid"])
        for process in launched.processes:
            process.wait(timeout=30)


def _torchrun_arguments(
    endpoint: str,
    key_prefix: str,
    nnodes: str,
    script: str,
    *,
    backend: str = "etcd-v3",
    conf: str = "",
    extra: tuple[str, ...] = (),
) -> list[str]:
    rdzv_conf = f"key_prefix={key_prefix}/rdzv,store_prefix={key_prefix}/store/,read_timeout=10"
    return [
        f"--nnodes={nnodes}",
        "--nproc-per-node=2",
        f"--rdzv-backend={backend}",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=job",
        f"--rdzv-conf={rdzv_conf},{conf}" if conf else f"--rdzv-conf={rdzv_conf}",
        "--local-addr=127.0.0.1",
        "--monitor-interval=0.5",
        *extra,
        str(SCRIPTS / script),
    ]


@pytest.mark.parametrize("endpoint_list", [False, True], ids=["one-endpoint", "endpoint-list"])
def test_two_agents_rendezvous_and_all_reduce(
    agents: Agents, etcd_endpoints: str, etcd_key_prefix: str, endpoint_list: bool, backend: str
) -> None:
    """Two torchrun agents of two workers each rendezvous via etcd; all four all-reduce.

    With `endpoint_list`, --rdzv-endpoint lists a dead endpoint before the live one.
    """
    endpoint = f"127.0.0.1:{closed_port()},{etcd_endpoints}" if endpoint_list else etcd_endpoints
    arguments = _torchrun_arguments(
        endpoint,
        etcd_key_prefix,
        "2",
        "allreduce.py",
        backend=backend,
        conf="join_timeout=30,last_call_timeout=1",
    )
    both = [agents.start(arguments), agents.start(arguments)]
    deadline = time.monotonic() + 120
    codes = [agents.wait(process, deadline) for process in both]
    assert codes == [0, 0], agents.report()
    output = "".join(agents.log(process) for process in both)
    assert output.count("sum 10 ok") == 4, agents.report()
    # The rendezvous state is where --rdzv-conf key_prefix put it.
    if backend == "etcd-v3":
        key_prefix = f"{etcd_key_prefix}/rdzv"
        with rdzv.EtcdBackend(etcd_endpoints, "job", key_prefix=key_prefix) as facade:
            assert facade.get_state() is not None
    else:
        with _rounds(etcd_endpoints, etcd_key_prefix) as rounds:
            assert rounds.is_closed()  # torchrun's shutdown() closed it, as torch's handler does
        shown = CliRunner().invoke(
            main,
            [
                "inspect",
                "--endpoints",
                etcd_endpoints,
                "--run-id",
                "job",
                "--key-prefix",
                f"{etcd_key_prefix}/rdzv",
                "--rounds-prefix",
                f"{etcd_key_prefix}/rdzv",
            ],
        )
        assert "closed, latest complete round 1" in shown.stdout, shown.output
        assert shown.stdout.count('{"addr":"127.0.0.1","pid":') == 2, shown.output


@contextlib.contextmanager
def _rounds(endpoints: str, key_prefix: str) -> Iterator[rdzv.Rendezvous]:
    """A participant of the tests' `etcd-v3-rounds` rendezvous, to look at it (never joins)."""
    with rdzv.Rendezvous(
        endpoints, "job", min_nodes=1, max_nodes=2, key_prefix=f"{key_prefix}/rdzv"
    ) as rounds:
        yield rounds


# torch 2.13's DynamicRendezvousHandler hangs a node that joins in a later round while the agents
# share the rank-0 agent's TCPStore (the default): the new node waits for MASTER_ADDR under the
# new round's prefix, which the old rank 0 never writes again. The same happens with torch's own
# c10d backend, so the elastic tests turn the sharing off, as torch allows.
_ELASTIC_CONF = (
    "join_timeout=30,last_call_timeout=1,close_timeout=10,"
    "keep_alive_interval=1,keep_alive_max_attempt=3"
)


def _wait_for_world(
    agents: Agents, flag_dir: Path, world_size: int, deadline: float
) -> list[dict[str, Any]]:
    """The records of the workers of a world of `world_size`, once all of them have started."""
    while True:
        records = [r for r in _worker_records(flag_dir) if r["world_size"] == world_size]
        if len(records) == world_size:
            return records
        if time.monotonic() > deadline or any(p.poll() is not None for p in agents.processes):
            pytest.fail(f"no world of {world_size} workers started:\n{agents.report()}")
        time.sleep(0.2)


def test_survivor_restarts_alone_after_the_other_node_is_killed(
    agents: Agents, flag_dir: Path, etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """With --nnodes=1:2, killing one node makes the other re-rendezvous alone and finish."""
    _survive_a_killed_node(agents, flag_dir, etcd_endpoints, etcd_key_prefix, backend)


def test_survivor_restarts_alone_on_a_cluster_that_loses_its_leader(
    agents: Agents, flag_dir: Path, etcd_cluster: EtcdCluster, etcd_key_prefix: str
) -> None:
    """On a 3-member cluster, a node and the etcd leader are killed: the survivor finishes."""
    leader = etcd_cluster.leader()
    _survive_a_killed_node(
        agents, flag_dir, etcd_cluster.endpoints, etcd_key_prefix, "etcd-v3-rounds", leader.kill
    )


def _survive_a_killed_node(
    agents: Agents,
    flag_dir: Path,
    endpoints: str,
    key_prefix: str,
    backend: str,
    also: Callable[[], None] | None = None,
) -> None:
    agents.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    arguments = _torchrun_arguments(
        endpoints,
        key_prefix,
        "1:2",
        "elastic.py",
        backend=backend,
        conf=_ELASTIC_CONF,
        extra=("--max-restarts=1",),
    )
    both = [agents.start(arguments), agents.start(arguments)]
    records = _wait_for_world(agents, flag_dir, 4, time.monotonic() + 120)
    # Kill the node of group rank 0 (agent and workers): the survivor has to become rank 0.
    victim_pid = next(r["agent_pid"] for r in records if r["group_rank"] == 0)
    [victim] = [p for p in both if p.pid == victim_pid]
    [survivor] = [p for p in both if p is not victim]
    _kill_agent(victim)
    for record in records:
        if record["agent_pid"] == victim.pid:
            _kill_worker(record["pid"])  # each worker leads a session of its own
    if also is not None:
        also()

    code = agents.wait(survivor, time.monotonic() + 120)
    assert code == 0, agents.report()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    finished = _worker_records(flag_dir, "finished")
    assert sorted(r["rank"] for r in finished) == [0, 1], agents.report()
    assert {(r["world_size"], r["restart"], r["agent_pid"]) for r in finished} == {
        (2, 1, survivor.pid)
    }, agents.report()


def test_a_late_node_scales_the_job_up(
    agents: Agents, flag_dir: Path, etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """With --nnodes=1:2, a node that starts late joins: both train in a world of four."""
    agents.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    arguments = _torchrun_arguments(
        etcd_endpoints, etcd_key_prefix, "1:2", "elastic.py", backend=backend, conf=_ELASTIC_CONF
    )
    first = agents.start(arguments)
    alone = _wait_for_world(agents, flag_dir, 2, time.monotonic() + 120)
    assert {r["agent_pid"] for r in alone} == {first.pid}
    late = agents.start(arguments)
    together = _wait_for_world(agents, flag_dir, 4, time.monotonic() + 120)
    assert {r["agent_pid"] for r in together} == {first.pid, late.pid}
    (flag_dir / "stop").touch()
    deadline = time.monotonic() + 60
    codes = [agents.wait(process, deadline) for process in (first, late)]
    assert codes == [0, 0], agents.report()
    finished = _worker_records(flag_dir, "finished")
    assert sorted(r["rank"] for r in finished) == [0, 1, 2, 3], agents.report()
    assert {r["world_size"] for r in finished} == {4}, agents.report()


def test_max_restarts_is_honoured_one_round_each(
    agents: Agents, flag_dir: Path, etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: Any
) -> None:
    """Workers that always fail are started 1 + --max-restarts times, each in a new round."""
    arguments = _torchrun_arguments(
        etcd_endpoints,
        etcd_key_prefix,
        "1",
        "failing.py",
        backend="etcd-v3-rounds",
        conf=_ELASTIC_CONF,
        extra=("--max-restarts=2",),
    )
    agent = agents.start(arguments)
    code = agents.wait(agent, time.monotonic() + 120)
    assert code not in (0, None), agents.report()
    starts = _worker_records(flag_dir, "start")
    assert sorted(r["restart"] for r in starts) == [0, 0, 1, 1, 2, 2], agents.report()
    latest = raw_etcd_sync.get(f"{etcd_key_prefix}/rdzv/job/latest")
    assert latest is not None
    assert latest.value == b"3", agents.report()


def test_set_closed_ends_the_job_for_every_agent(
    agents: Agents, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Agents waiting for a round end, failing, once anybody calls set_closed()."""
    arguments = _torchrun_arguments(
        etcd_endpoints,
        etcd_key_prefix,
        "3",
        "allreduce.py",
        backend="etcd-v3-rounds",
        conf="join_timeout=120,last_call_timeout=1",
    )
    waiting = [agents.start(arguments), agents.start(arguments)]
    params = RendezvousParameters(
        "etcd-v3-rounds",
        etcd_endpoints,
        "job",
        3,
        3,
        key_prefix=f"{etcd_key_prefix}/rdzv",
        read_timeout="10",
    )
    closer = create_rounds_handler(params)
    try:
        _wait_for_members(closer, 2, time.monotonic() + 60, agents)
        closer.set_closed()
    finally:
        closer.shutdown()
    deadline = time.monotonic() + 60
    codes = [agents.wait(process, deadline) for process in waiting]
    assert all(code not in (0, None) for code in codes), agents.report()
    assert all("RendezvousClosedError" in agents.log(p) for p in waiting), agents.report()


def _wait_for_members(
    handler: RoundsRendezvousHandler, count: int, deadline: float, agents: Agents
) -> None:
    """Wait until `count` nodes wait in the open round (torch's agents have started)."""
    while handler.num_nodes_waiting() < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} agents joined:\n{agents.report()}")
        time.sleep(1)
