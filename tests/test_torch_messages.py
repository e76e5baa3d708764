"""What torchrun users see when a job cannot start: one clear line that says what to do.

Through torch's handler registry, which is how torchrun makes a handler, and through torchrun
itself for what only a real agent shows (the lines of its output).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import api as torch_api
from torch.distributed.elastic.rendezvous.api import rendezvous_handler_registry

from rdzv._portal import shared_connections
from rdzv._torch_rounds import RoundsRendezvousHandler, create_rounds_handler
from support import closed_port, torch_backend_of, torch_params

BACKENDS = ["etcd-v3", "etcd-v3-rounds"]

# Far beyond what a refused start takes (about 2 s of torch's import, 5 s of connect timeout):
# an agent still running then has hung.
HUNG = 45.0

WORKER = Path(__file__).parent / "torchrun_scripts" / "allreduce.py"


def _close_job(params: RendezvousParameters) -> None:
    """Run a job's handler to its end: torchrun's shutdown() closes the rendezvous."""
    handler = rendezvous_handler_registry.create_handler(params)
    handler.shutdown()
    if not isinstance(handler, RoundsRendezvousHandler):
        torch_backend_of(handler).facade.close()


def _release(handler: torch_api.RendezvousHandler) -> None:
    """Let a handler's connection go without closing its rendezvous."""
    if isinstance(handler, RoundsRendezvousHandler):
        handler.shutdown()
    else:
        torch_backend_of(handler).facade.close()


# ----------------------------------------------------------------------- a closed rendezvous


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_rendezvous_is_refused_with_what_to_do(
    etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """Re-running a finished job says: a new --rdzv-id, or the rdzv reset command to run."""
    params = torch_params(etcd_endpoints, etcd_key_prefix, backend=backend)
    _close_job(params)
    with pytest.raises(torch_api.RendezvousClosedError) as caught:
        rendezvous_handler_registry.create_handler(params)
    message = str(caught.value)
    assert "is closed" in message, message
    assert "new --rdzv-id" in message, message
    option = "--key-prefix" if backend == "etcd-v3" else "--rounds-prefix"
    reset = f"rdzv reset --endpoints {etcd_endpoints} {option} {etcd_key_prefix}/rdzv --run-id job"
    assert message.endswith(reset), message


def test_a_refused_closed_rendezvous_leaves_no_connection_open(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """The handler refused for a closed rendezvous releases the connection it opened."""
    params = torch_params(etcd_endpoints, etcd_key_prefix, backend="etcd-v3")
    _close_job(params)
    before = len(shared_connections())
    with pytest.raises(torch_api.RendezvousClosedError):
        rendezvous_handler_registry.create_handler(params)
    assert len(shared_connections()) == before


def test_a_rounds_join_after_the_close_says_what_to_do(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A node of etcd-v3-rounds that joins once the job closed is told how to run it again."""
    params = torch_params(etcd_endpoints, etcd_key_prefix, backend="etcd-v3-rounds")
    late = create_rounds_handler(params)
    try:
        _close_job(params)
        with pytest.raises(torch_api.RendezvousClosedError) as caught:
            late.next_rendezvous()
    finally:
        late.shutdown()
    assert "give it a new --rdzv-id" in str(caught.value)
    assert str(caught.value).endswith("--run-id job")


# --------------------------------------------------------------------- a run id torch made up


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_id_made_up_by_torchrun_is_refused_for_several_nodes(
    etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """An empty --rdzv-id gives every agent its own random id: with --nnodes=2, refused."""
    made_up = str(uuid.uuid4().int)  # what torch's launch_agent does with an empty run id
    params = torch_params(etcd_endpoints, etcd_key_prefix, backend=backend, run_id=made_up, nodes=2)
    with pytest.raises(ValueError, match=r"^--rdzv-id is empty, .* --nnodes=2"):
        rendezvous_handler_registry.create_handler(params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_id_made_up_by_torchrun_is_accepted_for_one_node(
    etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """With --nnodes=1 there is nobody to meet: torch's random run id is fine."""
    params = torch_params(
        etcd_endpoints, etcd_key_prefix, backend=backend, run_id=str(uuid.uuid4().int)
    )
    _release(rendezvous_handler_registry.create_handler(params))


@pytest.mark.parametrize("run_id", ["12345678901234567890123456789012345678", "job-42", "0042"])
def test_a_numeric_run_id_a_person_chose_is_not_taken_for_torchs(
    etcd_endpoints: str, etcd_key_prefix: str, run_id: str
) -> None:
    """Only a random version-4 UUID's digits are refused, not any run id made of digits."""
    params = torch_params(
        etcd_endpoints, etcd_key_prefix, backend="etcd-v3", run_id=run_id, nodes=2
    )
    _release(rendezvous_handler_registry.create_handler(params))


# ----------------------------------------------------------------------------- one line


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_is_logged_once_and_raised_without_its_chain(
    etcd_key_prefix: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that cannot start logs one line, and its error repeats no chained one."""
    params = torch_params(
        f"127.0.0.1:{closed_port()}", etcd_key_prefix, backend=backend, connect_timeout="1"
    )
    with (
        caplog.at_level(logging.ERROR, logger="rdzv"),
        pytest.raises(torch_api.RendezvousConnectionError) as caught,
    ):
        rendezvous_handler_registry.create_handler(params)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"torchrun --rdzv-backend={backend} cannot start: {caught.value}"
    ]
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


# ----------------------------------------------------------------------------- torchrun


def _torchrun(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run one torchrun agent of one worker to its end, `HUNG` seconds at most."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=1",
            "--monitor-interval=0.5",
            *arguments,
            str(WORKER),
        ],
        capture_output=True,
        text=True,
        timeout=HUNG,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def _one_line_first(output: str, backend: str) -> str:
    """rdzv's line, checked to come once, before the one traceback, with no chained error."""
    start = f"torchrun --rdzv-backend={backend} cannot start: "
    lines = output.splitlines()
    ours = [index for index, line in enumerate(lines) if line.startswith(start)]
    assert len(ours) == 1, output
    assert output.count("Traceback") == 1, output
    assert ours[0] < lines.index("Traceback (most recent call last):"), output
    assert "The above exception was the direct cause" not in output, output
    return lines[ours[0]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "conf", ["", "read_timeout=abc"], ids=["refused-endpoint", "bad-rdzv-conf"]
)
def test_torchrun_that_cannot_start_says_why_in_one_line_at_the_top(
    etcd_key_prefix: str, conf: str
) -> None:
    """A refused endpoint (default timeouts) or a bad option: one line first, soon."""
    result = _torchrun(
        "--nnodes=1",
        "--rdzv-backend=etcd-v3",
        f"--rdzv-endpoint=127.0.0.1:{closed_port()}",
        "--rdzv-id=job",
        f"--rdzv-conf=key_prefix={etcd_key_prefix}/rdzv,{conf}".rstrip(","),
    )
    assert result.returncode != 0
    line = _one_line_first(result.stderr, "etcd-v3")
    if conf:
        assert "read_timeout must be a positive number" in line
    else:
        assert "no answer within" in line
        assert "(connect_timeout)" in line


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torchrun_rerun_of_a_finished_job_says_what_to_do(
    etcd_endpoints: str, etcd_key_prefix: str, backend: str
) -> None:
    """Running a finished job's torchrun again tells to use a new --rdzv-id or rdzv reset."""
    _close_job(torch_params(etcd_endpoints, etcd_key_prefix, backend=backend))
    result = _torchrun(
        "--nnodes=1",
        f"--rdzv-backend={backend}",
        f"--rdzv-endpoint={etcd_endpoints}",
        "--rdzv-id=job",
        f"--rdzv-conf=key_prefix={etcd_key_prefix}/rdzv",
    )
    assert result.returncode != 0
    line = _one_line_first(result.stderr, backend)
    assert "is closed" in line
    assert "new --rdzv-id" in line
    assert "rdzv reset " in line


@pytest.mark.slow
def test_torchrun_with_an_empty_rdzv_id_for_two_nodes_is_refused(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """--rdzv-id= with --nnodes=2 ends at once, instead of waiting alone for join_timeout."""
    result = _torchrun(
        "--nnodes=2",
        "--rdzv-backend=etcd-v3-rounds",
        f"--rdzv-endpoint={etcd_endpoints}",
        "--rdzv-id=",
        f"--rdzv-conf=key_prefix={etcd_key_prefix}/rdzv",
    )
    assert result.returncode != 0
    line = _one_line_first(result.stderr, "etcd-v3-rounds")
    assert "--rdzv-id is empty" in line
