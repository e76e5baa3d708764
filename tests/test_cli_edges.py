"""The `rdzv` command line's rough edges, as a user meets them (issue 22, item 9).

Usage errors, run ids and timeouts run in this process (CliRunner); Ctrl-C and `serve` run
`python -m rdzv` as a subprocess, against real etcd servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import RawEtcd, closed_port, run_cli


def _subprocess(*arguments: str) -> subprocess.Popen[str]:
    """`python -m rdzv ARGUMENTS`, in a session of its own (a terminal's Ctrl-C reaches it all)."""
    return subprocess.Popen(
        [sys.executable, "-m", "rdzv", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def _killed_at_the_end(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def _first_progress_line(process: subprocess.Popen[str]) -> None:
    """Read the demo's stdout until its first progress line: the agents are joining."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("joined"):
            return
    pytest.fail("the demo printed no progress line")


# ------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (
            ["inspect", "--run-id", "job", "--bogus"],
            "rdzv inspect: No such option '--bogus'. Try 'rdzv inspect --help'.",
        ),
        (
            ["watch"],
            "rdzv watch: Missing option '--run-id' (env var: 'RDZV_RUN_ID'). "
            "Try 'rdzv watch --help'.",
        ),
        (
            ["demo", "--nodes", "0"],
            "rdzv demo: Invalid value for '--nodes' / '-n': 0 is not in the range "
            "1<=x<=131072. Try 'rdzv demo --help'.",
        ),
        (["nosuch"], "rdzv: No such command 'nosuch'. Try 'rdzv --help'."),
    ],
)
def test_a_usage_error_is_one_line(arguments: list[str], line: str) -> None:
    """A usage error is one line on stderr, starting with the command, and exit code 2."""
    outcome = run_cli(*arguments)
    assert outcome.exit_code == 2
    assert outcome.stderr == f"{line}\n"


def test_endpoints_separated_by_semicolons_are_told_to_use_commas() -> None:
    """A ';' between endpoints is named, with the same endpoints separated by commas."""
    outcome = run_cli("inspect", "--run-id", "job", "--endpoints", "127.0.0.1:2379;127.0.0.1:2380")
    assert outcome.exit_code == 2
    assert (
        "separates endpoints with ';': endpoints are separated by commas, as in --endpoints "
        "127.0.0.1:2379,127.0.0.1:2380" in outcome.stderr
    )
    assert "IPv6" not in outcome.stderr


@pytest.mark.parametrize("command", ["inspect", "watch", "reset", "demo"])
@pytest.mark.parametrize("run_id", [" ", "", "\t"])
def test_a_blank_run_id_is_a_usage_error(command: str, run_id: str) -> None:
    """A run id of whitespace (or nothing) is refused before anything runs, on one line."""
    outcome = run_cli(command, "--run-id", run_id, "--endpoints", f"127.0.0.1:{closed_port()}")
    assert outcome.exit_code == 2
    [line] = outcome.stderr.splitlines()
    assert line.startswith(f"rdzv {command}: Invalid value for '--run-id'")
    assert f"{run_id!r} is blank: give the job's run id." in line


@pytest.mark.parametrize("seconds", ["1e9", "nan", "inf", "0"])
def test_a_read_timeout_out_of_range_names_the_option(seconds: str) -> None:
    """--read-timeout beyond a day (or not a positive number) names the option and the range."""
    outcome = run_cli("inspect", "--run-id", "job", "--read-timeout", seconds)
    assert outcome.exit_code == 2
    assert "Invalid value for '--read-timeout'" in outcome.stderr
    assert "is not a number of seconds from 0 (excluded) to 86400" in outcome.stderr


# ------------------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_stops_a_demo_of_10000_agents_at_once_with_exit_130() -> None:
    """Ctrl-C (to the process group, as a terminal sends it) ends the demo within seconds, 130."""
    # 10,000 agents, as in the report: every cancelled agent used to spend a request or two
    # leaving, 5-7 s in all, then click printed "Aborted!" with exit code 1.
    with _killed_at_the_end(_subprocess("demo", "--nodes", "10000")) as process:
        _first_progress_line(process)
        interrupted = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # the embedded etcd gets it too, as on a terminal
        _, stderr = process.communicate(timeout=60)
        seconds = time.monotonic() - interrupted
    assert process.returncode == 130, stderr
    assert seconds < 5, f"stopped {seconds:.1f} s after Ctrl-C"
    assert "Aborted!" not in stderr
    assert stderr.splitlines()[-1].endswith(
        "stopped the embedded etcd and deleted its data: nothing is left."
    )


@pytest.mark.slow
def test_ctrl_c_in_a_demo_on_your_etcd_deletes_what_its_agents_wrote(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """On an etcd of yours, Ctrl-C deletes the agents' keys, says how many, and exits 130."""
    demo = ["demo", "--nodes", "10000", "--run-id", "job", "--endpoints", etcd_endpoints]
    with _killed_at_the_end(_subprocess(*demo, "--key-prefix", etcd_key_prefix)) as process:
        _first_progress_line(process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"its agents had written under {etcd_key_prefix}/job/: nothing of theirs is left" in (
        stderr
    )
    assert raw_etcd_sync.under(f"{etcd_key_prefix}/job/round/") == []


# ------------------------------------------------------------------------------- serve


@pytest.fixture
def default_peer_port_taken() -> Iterator[None]:
    """etcd's default peer port, 2380, taken for the test (if nothing else holds it already)."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # already taken: as good
            holder.bind(("127.0.0.1", 2380))
            holder.listen()
        yield


def _serve_once(*arguments: str) -> tuple[int, str]:
    """Start `rdzv serve ARGUMENTS`; once it serves (or exits), stop it: exit code and stdout."""
    with _killed_at_the_end(_subprocess("serve", *arguments)) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        if first.startswith("Serving etcd"):
            process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    return process.returncode, first + rest + stderr


@pytest.mark.slow
@pytest.mark.usefixtures("default_peer_port_taken")
def test_a_second_serve_needs_only_a_port() -> None:
    """`serve --port P` next to another etcd on 2380 picks a free peer port, and serves."""
    port = closed_port()
    code, output = _serve_once("--port", str(port))
    assert code == 0, output
    assert re.search(rf"Serving etcd \S+ at 127\.0\.0\.1:{port} ", output)


@pytest.mark.slow
def test_serve_with_a_data_dir_starts_again_with_only_a_port(tmp_path: Path) -> None:
    """With --data-dir, --port alone works for a second run too: the peer port is kept there."""
    arguments = ["--data-dir", str(tmp_path / "data"), "--port", str(closed_port())]
    for run in range(2):
        code, output = _serve_once(*arguments)
        assert code == 0, f"run {run}: {output}"
        assert "Serving etcd" in output
