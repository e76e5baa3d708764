"""`rdzv reset`, end to end against real etcd: what it lists, asks, deletes and leaves alone."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import rdzv
from rdzv.testing import EtcdServer, find_etcd_binary
from support import READER_PASSWORD, run_cli


@dataclass(frozen=True)
class Job:
    """The prefixes of one test's jobs, and the options that point `rdzv reset` at them."""

    endpoint: str
    prefix: str

    @property
    def state_key(self) -> str:
        """The torch rendezvous state of run id "job"."""
        return f"{self.prefix}/torch/job"

    @property
    def rounds(self) -> str:
        """Where rdzv.AsyncRendezvous keeps run id "job"'s rounds."""
        return f"{self.prefix}/rounds/job/"

    @property
    def store(self) -> str:
        """The store prefix."""
        return f"{self.prefix}/store/"

    def options(self, *more: str) -> list[str]:
        """`reset --run-id job` at this test's prefixes, then `more`."""
        return [
            "reset", "--run-id", "job", "--endpoints", self.endpoint, "--key-prefix",
            f"{self.prefix}/torch", "--rounds-prefix", f"{self.prefix}/rounds", "--store-prefix",
            self.store, *more,
        ]  # fmt: skip

    def etcd_keys(self) -> list[bytes]:
        """Every key under the test's prefix."""

        async def read() -> list[bytes]:
            async with rdzv.connect(self.endpoint) as connection:
                kvs, _ = await connection.range(self.prefix.encode(), prefix=True)
            return [kv.key for kv in kvs]

        return anyio.run(read)


async def _populate(job: Job) -> None:
    """Run id "job": a torch state, a completed round, store keys; other run ids' store keys."""
    async with rdzv.connect(job.endpoint) as connection:
        backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=f"{job.prefix}/torch")
        await backend.set_state(b"state")
        participant = rdzv.AsyncRendezvous(
            connection, "job", min_nodes=1, max_nodes=1, key_prefix=f"{job.prefix}/rounds"
        )
        await participant.join(b"node")
        await participant.leave()
        store = rdzv.AsyncEtcdStore(connection, prefix=job.store)
        await store.set("torch.rendezvous.job.0/rank0", b"x")
        await store.add("torch.rendezvous.job.1/counter", 1)  # with its write marker
        await store.set("job/round-0000000001/rank0", b"x")  # torchrun's etcd-v3-rounds
        await store.set("torch.rendezvous.job.2.0/other", b"run id job.2")
        await store.set("jobs/round-0000000001/other", b"run id jobs")
        await store.set("torch.rendezvous.jobs.0/other", b"run id jobs")


@pytest.fixture
def job(etcd_endpoints: str, etcd_key_prefix: str) -> Job:
    """Run id "job" with its rendezvous state, rounds and store keys, under the test's prefix."""
    made = Job(etcd_endpoints, etcd_key_prefix)
    anyio.run(_populate, made)
    return made


def _job_keys(job: Job) -> list[bytes]:
    """Run id "job"'s keys: its state, its rounds, its store keys (markers included)."""
    return [
        key
        for key in job.etcd_keys()
        if key == job.state_key.encode()
        or key.startswith(job.rounds.encode())
        or b"torch.rendezvous.job.0/" in key
        or b"torch.rendezvous.job.1/" in key
        or key.endswith(b"/job/round-0000000001/rank0")
    ]


def test_yes_deletes_the_state_and_the_rounds_but_not_the_store(job: Job) -> None:
    """With --yes: the torch state and every rounds key go; the store keys stay."""
    rounds_keys = [key for key in job.etcd_keys() if key.startswith(job.rounds.encode())]
    assert rounds_keys
    outcome = run_cli(*job.options("--yes"))
    assert outcome.exit_code == 0, outcome.output
    assert outcome.stdout.endswith(f"Deleted {1 + len(rounds_keys)} keys.\n")
    left = job.etcd_keys()
    assert job.state_key.encode() not in left
    assert not [key for key in left if key.startswith(job.rounds.encode())]
    assert f"{job.store}torch.rendezvous.job.0/rank0".encode() in left


def test_store_flag_deletes_the_jobs_store_keys_only(job: Job) -> None:
    """With --store: the job's store keys and markers go; other run ids' (job.2, jobs) stay."""
    outcome = run_cli(*job.options("--store", "--yes"))
    assert outcome.exit_code == 0, outcome.output
    assert _job_keys(job) == []
    assert sorted(job.etcd_keys()) == [
        f"{job.store}jobs/round-0000000001/other".encode(),
        f"{job.store}torch.rendezvous.job.2.0/other".encode(),
        f"{job.store}torch.rendezvous.jobs.0/other".encode(),
    ]
    assert "store: 4 keys" in outcome.stdout  # three keys and the add's write marker


def test_it_shows_each_kind_with_its_count_and_keys(job: Job) -> None:
    """The plan names each kind of key, how many, and the keys (control characters escaped)."""
    outcome = run_cli(*job.options("--store", "--dry-run"))
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.stdout.splitlines()
    assert lines[0] == f"Run id 'job' on etcd at {job.endpoint}:"
    assert f"  torch rendezvous state: 1 key  ({job.state_key})" in lines
    assert f"    {job.state_key}" in lines
    assert any(line.startswith("  rendezvous rounds: ") for line in lines)
    assert f"    {job.rounds}latest" in lines
    assert f"    {job.store}\\x00rdzv-write-id/torch.rendezvous.job.1/counter" in lines
    assert lines[-1] == "Nothing deleted (--dry-run)."
    assert len(_job_keys(job)) > 3


def test_without_a_terminal_or_yes_it_refuses(job: Job) -> None:
    """No terminal to ask on and no --yes: exit 1, one line saying so, nothing deleted."""
    before = job.etcd_keys()
    outcome = run_cli(*job.options())
    assert outcome.exit_code == 1
    assert outcome.stderr == (
        "rdzv reset: nothing deleted: no terminal to ask for confirmation on; pass --yes.\n"
    )
    assert job.etcd_keys() == before


@pytest.mark.slow
@pytest.mark.parametrize(("answer", "deleted"), [("y", True), ("n", False)])
def test_on_a_terminal_it_asks_first(job: Job, answer: str, deleted: bool) -> None:
    """On a terminal it asks; "y" deletes, "n" exits 1 with nothing deleted."""
    main_end, child_end = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "rdzv", *job.options()],
        stdin=child_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(child_end)
    try:
        time.sleep(0.1)  # the answer waits in the terminal until the prompt reads it
        os.write(main_end, f"{answer}\n".encode())
        stdout, stderr = process.communicate(timeout=60)
    finally:
        os.close(main_end)
    assert "Delete these" in stdout
    assert process.returncode == (0 if deleted else 1), stderr
    assert (job.state_key.encode() not in job.etcd_keys()) is deleted
    if not deleted:
        assert stderr == "rdzv reset: nothing deleted.\n"


def test_nothing_to_delete_exits_0(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """A run id with no keys: it says so and exits 0, without asking."""
    outcome = run_cli(*Job(etcd_endpoints, etcd_key_prefix).options("--store"))
    assert outcome.exit_code == 0, outcome.output
    assert outcome.stdout.endswith("Nothing to delete.\n")


def test_a_bad_run_id_is_a_usage_error() -> None:
    """A run id with a '/' exits 2 before connecting."""
    outcome = run_cli("reset", "--run-id", "a/b", "--yes")
    assert outcome.exit_code == 2
    assert "must not contain '/'" in outcome.stderr


def test_a_refused_delete_is_one_line_saying_how_many_keys_went(
    reader_server: EtcdServer, tmp_path: Path
) -> None:
    """A user who may only read: reset lists the keys, then fails in one line, exit 1."""
    etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))
    subprocess.run(
        [
            etcdctl,
            f"--endpoints={reader_server.endpoint}",
            "--user=root:root-password",
            "put",
            "/rdzv/rounds/refused/latest",
            "1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    password_file = tmp_path / "password"
    password_file.write_text(READER_PASSWORD)
    outcome = run_cli(
        "reset",
        "--endpoints",
        reader_server.endpoint,
        "--username",
        "reader",
        "--password-file",
        str(password_file),
        "--run-id",
        "refused",
        "--yes",
    )
    assert outcome.exit_code == 1
    [line] = outcome.stderr.splitlines()
    assert line.startswith("rdzv reset: 1 of 1 deletes failed (0 keys deleted)")
    assert "permission denied" in line
