"""The `rdzv` command line, end to end against real etcd servers: serve, inspect, watch, demo.

`rdzv check` and `rdzv reset` have test modules of their own.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    _NodeDesc,
    _RendezvousState,
)

import rdzv
from rdzv._cli._embedded import EMBEDDED_COMPACTION_RETENTION, embedded_etcd
from rdzv._inspect import NotATorchStateError, load_torch_state
from rdzv.testing import EtcdServer, EtcdTLS
from rdzv.torch import create_handler
from support import (
    RawEtcd,
    RdzvProcess,
    closed_port,
    overwrite_state,
    run_cli,
    torch_backend_of,
    torch_state,
)

STATE_KEY = b"a-shared-state-key-of-32-bytes!!"

# ----------------------------------------------------------------------------------- helpers


class _Hostile:
    """A pickle that runs a shell command when it is unpickled by plain pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["serve"], ["inspect"], ["watch"], ["check"], ["reset"]]
)
def test_every_command_has_help_with_exit_codes(command: list[str]) -> None:
    """`--help` works everywhere and states the exit codes."""
    outcome = run_cli(*command, "--help")
    assert outcome.exit_code == 0
    assert "Exit codes" in outcome.output


@pytest.mark.parametrize("command", ["inspect", "watch", "check", "reset"])
def test_connection_options_are_the_same_for_inspect_and_watch(command: str) -> None:
    """Both commands take rdzv.connect's options, and no --password."""
    text = run_cli(command, "--help").output
    for option in (
        "--endpoints",
        "--protocol",
        "--read-timeout",
        "--ca-cert",
        "--ssl-cert",
        "--ssl-cert-key",
        "--username",
        "--password-file",
        "--key-prefix",
        "--state-key-file",
        "ETCDCTL_ENDPOINTS",
        "RDZV_ETCD_PASSWORD",
    ):
        assert option in text
    assert not re.search(r"^  --password\s", text, re.MULTILINE)


# ---------------------------------------------------------------------------------- inspect


def test_inspect_plain_state_shows_revision_size_and_lease(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A state that is not a pickle shows its revision, size and lease time left; exit 0."""
    token = overwrite_state(etcd_endpoints, etcd_key_prefix, b"hello", ttl=600)
    outcome = run_cli(
        "inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    assert outcome.exit_code == 0, outcome.output
    assert f"revision      {token} " in outcome.stdout
    assert "size          29 bytes (5-byte state)" in outcome.stdout
    assert re.search(r"lease         (59\d|600) s left", outcome.stdout)
    assert "not a PyTorch rendezvous state" in outcome.stdout


def test_inspect_json_of_a_plain_state(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """--json prints one object with the revision, the sizes and the lease."""
    token = overwrite_state(etcd_endpoints, etcd_key_prefix, b"hello", ttl=600)
    outcome = run_cli(
        "inspect",
        "--json",
        "--endpoints",
        etcd_endpoints,
        "--key-prefix",
        etcd_key_prefix,
        "--run-id",
        "job",
    )
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    assert report["key"] == f"{etcd_key_prefix}/job"
    assert report["revision"] == token
    assert (report["size"], report["state_size"], report["signed"]) == (29, 5, False)
    assert report["kind"] == "opaque"
    assert report["torch"] is None
    assert report["error"] is None
    assert 590 < report["lease"]["seconds_left"] <= 600


@pytest.mark.slow
def test_inspect_a_state_of_torchs_dynamic_rendezvous(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """After two real handlers rendezvous, inspect shows the round, ranks and heartbeats."""
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=etcd_endpoints,
        run_id="job",
        min_nodes=2,
        max_nodes=2,
        local_addr="127.0.0.1",
        key_prefix=f"{etcd_key_prefix}/rdzv",
        store_prefix=f"{etcd_key_prefix}/store/",
        read_timeout="10",
        last_call_timeout="1",
    )
    handlers = [create_handler(params) for _ in range(2)]
    infos: list[RendezvousInfo] = []
    errors: list[BaseException] = []

    def join(handler: DynamicRendezvousHandler) -> None:
        try:
            infos.append(handler.next_rendezvous())
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=join, args=(handler,)) for handler in handlers]
    arguments = ["--endpoints", etcd_endpoints, "--key-prefix", f"{etcd_key_prefix}/rdzv"]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert errors == []
        assert sorted(info.rank for info in infos) == [0, 1]

        text = run_cli("inspect", *arguments, "--run-id", "job")
        report = json.loads(run_cli("inspect", "--json", *arguments, "--run-id", "job").stdout)
    finally:
        for handler in handlers:
            handler.shutdown()
            torch_backend_of(handler).facade.close()
    closed = json.loads(run_cli("inspect", "--json", *arguments, "--run-id", "job").stdout)

    assert text.exit_code == 0, text.output
    assert "PyTorch dynamic rendezvous, round 0, complete, open" in text.stdout
    ranks = re.findall(
        r"rank (\d) +127\.0\.0\.1_(\d+)_\d+ +last heartbeat [\d.]+ s ago", text.stdout
    )
    assert sorted(rank for rank, _ in ranks) == ["0", "1"]
    assert {pid for _, pid in ranks} == {str(os.getpid())}
    assert "wait list (0)" in text.stdout
    assert "redundancy list (0)" in text.stdout

    torch = report["torch"]
    assert report["kind"] == "torch"
    assert (torch["round"], torch["complete"], torch["closed"]) == (0, True, False)
    assert [p["rank"] for p in torch["participants"]] == [0, 1]
    assert all(p["addr"] == "127.0.0.1" and p["pid"] == os.getpid() for p in torch["participants"])
    assert all(0 <= p["heartbeat_age"] < 60 for p in torch["participants"])
    assert (torch["wait_list"], torch["redundancy_list"]) == ([], [])
    assert report["lease"]["seconds_left"] > 0
    assert closed["torch"]["closed"] is True


def test_inspect_shows_wait_list_and_heartbeat_ages(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Waiting nodes are listed, and heartbeat ages are measured from the read."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, pickle.dumps(torch_state()))
    outcome = run_cli(
        "inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    assert outcome.exit_code == 0, outcome.output
    assert "round 2, complete, open" in outcome.stdout
    assert re.search(r"rank 0 +10\.1\.2\.3_4242_0 +last heartbeat 3\.\d s ago", outcome.stdout)
    assert re.search(
        r"wait list \(1\):\n  10\.1\.2\.4_99_1 +last heartbeat 0\.\d s ago", outcome.stdout
    )


def test_inspect_refuses_a_hostile_pickle_without_running_it(
    etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """A pickle that would run a command is refused by name; the command never runs."""
    witness = tmp_path / "pwned"
    overwrite_state(etcd_endpoints, etcd_key_prefix, pickle.dumps(_Hostile(f"touch {witness}")))
    for arguments in ([], ["--json"]):
        outcome = run_cli(
            "inspect",
            *arguments,
            "--endpoints",
            etcd_endpoints,
            "--key-prefix",
            etcd_key_prefix,
            "--run-id",
            "job",
        )
        assert outcome.exit_code == 1
        assert "not a PyTorch rendezvous state: refused global 'posix.system'" in outcome.stderr
    assert json.loads(outcome.stdout)["kind"] == "unreadable"
    assert not witness.exists()


def test_hostile_pickle_inside_a_real_state_is_refused(tmp_path: Path) -> None:
    """A hostile object hidden in a genuine state's fields is refused too."""
    witness = tmp_path / "pwned"
    state = _RendezvousState()
    state.participants[_NodeDesc("a", 1, 0)] = _Hostile(f"touch {witness}")  # type: ignore[assignment]  # on purpose
    with pytest.raises(NotATorchStateError, match=r"refused global 'posix\.system'"):
        load_torch_state(pickle.dumps(state))
    assert not witness.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(print),  # a builtin
        pickle.dumps(subprocess.Popen),  # a class from elsewhere
        pickle.dumps({"round": 1}),  # no global at all, but not a state
        b"\x80\x04\x95",  # truncated
        # The torch module path with a name that is not one of the two classes.
        b"\x80\x04\x8c8torch.distributed.elastic.rendezvous.dynamic_rendezvous\x8c\x02os\x93.",
    ],
)
def test_restricted_unpickler_refuses_anything_else(payload: bytes) -> None:
    """Any pickle that is not a rendezvous state raises NotATorchStateError."""
    with pytest.raises(NotATorchStateError, match=r"^not a PyTorch rendezvous state"):
        load_torch_state(payload)


def test_inspect_escapes_control_characters_from_the_state(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A node name with terminal escapes is printed escaped, not sent to the terminal."""
    state = _RendezvousState()
    state.participants[_NodeDesc("\x1b[2Jevil\nhost", 1, 0)] = 0
    overwrite_state(etcd_endpoints, etcd_key_prefix, pickle.dumps(state))
    outcome = run_cli(
        "inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    assert outcome.exit_code == 0, outcome.output
    assert "\x1b" not in outcome.stdout
    assert r"rank 0    \x1b[2Jevil\nhost_1_0  no heartbeat" in outcome.stdout


def test_restricted_unpickler_checks_field_types() -> None:
    """A state whose fields have the wrong types is not taken for a state."""
    state = _RendezvousState()
    state.round = "one"  # type: ignore[assignment]  # the wrong type, on purpose
    with pytest.raises(NotATorchStateError, match="its round is a str, not an int"):
        load_torch_state(pickle.dumps(state))


@pytest.mark.slow
def test_inspect_works_without_torch(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """inspect decodes a torch state in a process where torch cannot be imported."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, pickle.dumps(torch_state()))
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from rdzv._cli import main\n"
        "main(sys.argv[1:], prog_name='rdzv')\n"
    )
    connection = ["--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix]
    completed = subprocess.run(
        [sys.executable, "-c", script, "inspect", "--run-id", "job", *connection],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "PyTorch dynamic rendezvous, round 2" in completed.stdout


def test_inspect_corrupt_value_shows_what_it_can_and_exits_1(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """A value without rdzv's envelope: the revision and size, then "not an rdzv state", exit 1."""
    raw_etcd_sync.put(f"{etcd_key_prefix}/job", b"not an envelope at all, no")
    outcome = run_cli(
        "inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    assert outcome.exit_code == 1
    assert "size          26 bytes" in outcome.stdout
    assert "lease         none" in outcome.stdout
    assert "The state object is not an rdzv state" in outcome.stderr


def test_inspect_missing_state_exits_1(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """No state for the run id is an error naming the key."""
    outcome = run_cli(
        "inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    assert outcome.exit_code == 1
    assert f"there is no state at '{etcd_key_prefix}/job'" in outcome.stderr


def test_inspect_signed_state_needs_the_state_key(
    etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """A signed state is read with --state-key-file, and refused without it."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, b"signed", state_key=STATE_KEY)
    key_file = tmp_path / "state-key"
    key_file.write_bytes(STATE_KEY + b"\n")
    base = ["inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix]
    signed = run_cli(*base, "--run-id", "job", "--state-key-file", str(key_file))
    assert signed.exit_code == 0, signed.output
    assert "(6-byte state, signed)" in signed.stdout
    unsigned = run_cli(*base, "--run-id", "job")
    assert unsigned.exit_code == 1
    assert "signed with a state key" in unsigned.stderr


def test_environment_variables_configure_the_connection(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """ETCDCTL_ENDPOINTS, RDZV_KEY_PREFIX and RDZV_RUN_ID stand in for the options."""
    token = overwrite_state(etcd_endpoints, etcd_key_prefix, b"env")
    outcome = run_cli(
        "inspect",
        "--json",
        env={
            "ETCDCTL_ENDPOINTS": etcd_endpoints,
            "RDZV_KEY_PREFIX": etcd_key_prefix,
            "RDZV_RUN_ID": "job",
        },
    )
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["revision"] == token
    # RDZV_ENDPOINTS wins over ETCDCTL_ENDPOINTS.
    outcome = run_cli(
        "inspect",
        env={
            "RDZV_ENDPOINTS": etcd_endpoints,
            "ETCDCTL_ENDPOINTS": f"127.0.0.1:{closed_port()}",
            "RDZV_KEY_PREFIX": etcd_key_prefix,
            "RDZV_RUN_ID": "job",
        },
    )
    assert outcome.exit_code == 0, outcome.output


# -------------------------------------------------------------------------- connection errors


@pytest.mark.slow
@pytest.mark.parametrize("command", ["inspect", "watch"])
def test_unreachable_endpoint_is_a_clear_error(command: str) -> None:
    """An etcd that does not answer: one line naming the endpoint and the timeout, exit 1."""
    endpoint = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    outcome = run_cli(command, "--endpoints", endpoint, "--read-timeout", "1", "--run-id", "job")
    assert time.monotonic() - started < 10
    assert outcome.exit_code == 1
    assert outcome.stdout == ""
    assert re.fullmatch(
        rf"rdzv {command}: etcd at {endpoint} did not answer within 1 s \(UNAVAILABLE: .*\)\.\n",
        outcome.stderr,
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--endpoints", "host:port"], "invalid port"),
        (["--endpoints", "127.0.0.1:2379", "--run-id", "a/b"], "must not contain '/'"),
        (["--key-prefix", "relative"], "must be a string that starts with '/'"),
        (["--read-timeout", "0"], "0 is not a number of seconds from 0 (excluded) to 86400"),
        (["--username", "alice"], "needs a password"),
        (["--ca-cert", "/nonexistent/ca.pem"], "does not exist"),
    ],
)
def test_bad_options_are_usage_errors(arguments: list[str], message: str) -> None:
    """Bad options exit 2 with a message, before any connection is tried."""
    if "--run-id" not in arguments:
        arguments = [*arguments, "--run-id", "job"]
    outcome = run_cli("inspect", *arguments, env={"RDZV_ETCD_PASSWORD": None})
    assert outcome.exit_code == 2
    assert message in outcome.stderr


def test_short_state_key_is_a_usage_error(tmp_path: Path) -> None:
    """A state key file of fewer than 16 bytes is refused before connecting."""
    key_file = tmp_path / "state-key"
    key_file.write_bytes(b"too short\n")
    outcome = run_cli("inspect", "--run-id", "job", "--state-key-file", str(key_file))
    assert outcome.exit_code == 2
    assert "The state key must be at least 16 bytes." in outcome.stderr


def test_credentials_from_a_file_or_the_environment(
    auth_server: EtcdServer, tmp_path: Path, auth_password: str, etcd_key_prefix: str
) -> None:
    """The password comes from --password-file or RDZV_ETCD_PASSWORD."""
    # The auth server is shared by the session: this test's keys go under its own prefix.
    prefix = f"/allowed{etcd_key_prefix}"
    overwrite_state(auth_server.endpoint, prefix, b"x", username="alice", password=auth_password)
    password_file = tmp_path / "password"
    password_file.write_text(auth_password + "\n")
    base = ["inspect", "--endpoints", auth_server.endpoint, "--key-prefix", prefix]
    from_file = run_cli(
        *base, "--run-id", "job", "--username", "alice", "--password-file", str(password_file)
    )
    assert from_file.exit_code == 0, from_file.output
    from_env = run_cli(
        *base,
        "--run-id",
        "job",
        env={"RDZV_USERNAME": "alice", "RDZV_ETCD_PASSWORD": auth_password},
    )
    assert from_env.exit_code == 0, from_env.output


def test_wrong_password_is_a_clear_error(auth_server: EtcdServer, tmp_path: Path) -> None:
    """Rejected credentials: one line naming the user, exit 1, the password nowhere."""
    password_file = tmp_path / "password"
    password_file.write_text("wrong-password")
    outcome = run_cli(
        "inspect",
        "--endpoints",
        auth_server.endpoint,
        "--run-id",
        "job",
        "--username",
        "alice",
        "--password-file",
        str(password_file),
    )
    assert outcome.exit_code == 1
    assert re.fullmatch(
        rf"rdzv inspect: etcd at {re.escape(auth_server.endpoint)} did not authenticate user "
        r"'alice': .*invalid user ID or password\n",
        outcome.stderr,
    )
    assert "wrong-password" not in outcome.output


def test_missing_credentials_are_a_clear_error(auth_server: EtcdServer) -> None:
    """No credentials against an etcd with auth on says that a username is needed."""
    outcome = run_cli("inspect", "--endpoints", auth_server.endpoint, "--run-id", "job")
    assert outcome.exit_code == 1
    assert "requires authentication" in outcome.stderr


def test_mutual_tls_options(tmp_path: Path, etcd_key_prefix: str) -> None:
    """--ca-cert, --ssl-cert and --ssl-cert-key reach an etcd that requires client certs."""
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("127.0.0.1"), ca.issue_cert("rdzv-client")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "sc", "sk", "cc", "ck")}
    ca.cert_pem.write_to_path(files["ca"])
    server_cert.cert_chain_pems[0].write_to_path(files["sc"])
    server_cert.private_key_pem.write_to_path(files["sk"])
    client_cert.cert_chain_pems[0].write_to_path(files["cc"])
    client_cert.private_key_pem.write_to_path(files["ck"])
    tls = EtcdTLS(files["sc"], files["sk"], files["ca"], True, files["cc"], files["ck"])
    with EtcdServer(tls=tls) as server:
        overwrite_state(
            server.endpoint,
            etcd_key_prefix,
            b"tls",
            protocol="https",
            ca_cert=files["ca"],
            ssl_cert=files["cc"],
            ssl_cert_key=files["ck"],
        )
        base = ["inspect", "--endpoints", server.endpoint, "--key-prefix", etcd_key_prefix]
        secure = run_cli(
            *base,
            "--run-id",
            "job",
            "--protocol",
            "https",
            "--ca-cert",
            str(files["ca"]),
            "--ssl-cert",
            str(files["cc"]),
            "--ssl-cert-key",
            str(files["ck"]),
        )
        assert secure.exit_code == 0, secure.output
        no_client_cert = run_cli(
            *base, "--run-id", "job", "--protocol", "https", "--ca-cert", str(files["ca"])
        )
        assert no_client_cert.exit_code == 1
        assert "TLS handshake" in no_client_cert.stderr


# ------------------------------------------------------------------------------------ watch


@pytest.mark.slow
def test_watch_prints_one_line_per_change(
    etcd_endpoints: str,
    etcd_key_prefix: str,
    raw_etcd_sync: RawEtcd,
    rdzv_process: Callable[..., RdzvProcess],
) -> None:
    """Three changes make three lines; SIGTERM ends the watch with exit code 0."""
    key = f"{etcd_key_prefix}/job"
    process = rdzv_process(
        "watch", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--run-id", "job"
    )
    process.stderr.until(f"Watching {key} from revision")

    first = overwrite_state(etcd_endpoints, etcd_key_prefix, b"plain")
    second = overwrite_state(etcd_endpoints, etcd_key_prefix, pickle.dumps(torch_state()))
    raw_etcd_sync.delete(key)
    lines = [process.stdout.next() for _ in range(3)]

    assert re.fullmatch(rf"[\d:.]+  revision {first}  size 29", lines[0])
    assert re.fullmatch(
        rf"[\d:.]+  revision {second}  size \d+  round 2  complete  participants 1  waiting 1"
        r"  redundant 0",
        lines[1],
    )
    assert re.fullmatch(r"[\d:.]+  revision \d+  deleted \(or expired\)", lines[2])
    assert process.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_watch_json_starts_with_the_current_state(
    etcd_endpoints: str, etcd_key_prefix: str, rdzv_process: Callable[..., RdzvProcess]
) -> None:
    """--json prints JSON lines, the current state first; SIGINT ends it with exit code 0."""
    token = overwrite_state(etcd_endpoints, etcd_key_prefix, b"before")
    process = rdzv_process(
        "watch",
        "--json",
        "--endpoints",
        etcd_endpoints,
        "--key-prefix",
        etcd_key_prefix,
        "--run-id",
        "job",
    )
    current = json.loads(process.stdout.next())
    assert (current["revision"], current["deleted"], current["kind"]) == (token, False, "opaque")
    after = overwrite_state(etcd_endpoints, etcd_key_prefix, b"after")
    change = json.loads(process.stdout.next())
    assert (change["revision"], change["state_size"]) == (after, 5)
    assert process.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_watch_exits_1_when_etcd_goes_away(rdzv_process: Callable[..., RdzvProcess]) -> None:
    """A watch whose etcd dies says so on one line and exits 1 after the read timeout."""
    with EtcdServer() as server:
        process = rdzv_process(
            "watch", "--endpoints", server.endpoint, "--read-timeout", "2", "--run-id", "job"
        )
        process.stderr.until("Watching")
        # A change delivered: the watch stream is established before etcd dies.
        overwrite_state(server.endpoint, rdzv.DEFAULT_KEY_PREFIX, b"x")
        process.stdout.next()
        server.kill()
        assert process.popen.wait(timeout=60) == 1
    # After the line saying that there was nothing to show yet: the failure.
    process.stderr.until(
        re.escape(f"rdzv watch: etcd at {server.endpoint} did not answer within 2 s")
    )


# ------------------------------------------------------------------------------------ serve


@pytest.mark.slow
def test_serve_runs_etcd_until_ctrl_c(rdzv_process: Callable[..., RdzvProcess]) -> None:
    """serve prints an endpoint that works, and SIGINT stops etcd and exits 0."""
    process = rdzv_process("serve", "--port", "0", "--peer-port", "0")
    match = process.stdout.until(r"Serving etcd [\d.]+ at (127\.0\.0\.1:\d+) \(pid (\d+)\)")
    endpoint, etcd_pid = match[1], int(match[2])

    async def round_trip() -> bytes | None:
        async with rdzv.connect(endpoint, read_timeout=10) as connection:
            backend = rdzv.AsyncEtcdBackend(connection, "job")
            await backend.set_state(b"served")
            current = await backend.get_state()
            return None if current is None else current[0]

    assert anyio.run(round_trip) == b"served"
    assert _pid_exists(etcd_pid)
    assert process.stop(signal.SIGINT) == 0
    assert not _pid_exists(etcd_pid)
    process.stderr.until("Stopped etcd.")


@pytest.mark.slow
def test_serve_runs_etcd_with_auto_compaction(rdzv_process: Callable[..., RdzvProcess]) -> None:
    """serve's etcd keeps a bounded history: it runs with revision auto-compaction."""
    process = rdzv_process("serve", "--port", "0", "--peer-port", "0")
    match = process.stdout.until(r"Serving etcd [\d.]+ at 127\.0\.0\.1:\d+ \(pid (\d+)\)")
    command = Path(f"/proc/{match[1]}/cmdline").read_bytes().split(b"\0")
    assert b"--auto-compaction-mode=revision" in command
    assert f"--auto-compaction-retention={EMBEDDED_COMPACTION_RETENTION}".encode() in command
    assert process.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_serve_keeps_data_across_runs(
    tmp_path: Path, rdzv_process: Callable[..., RdzvProcess]
) -> None:
    """With --data-dir, a second run on the same ports finds what the first one stored."""
    port, peer_port = closed_port(), closed_port()
    arguments = ["serve", "--data-dir", str(tmp_path / "data")]
    arguments += ["--port", str(port), "--peer-port", str(peer_port)]
    endpoint = f"127.0.0.1:{port}"
    for run in range(2):
        process = rdzv_process(*arguments)
        process.stdout.until(f"Serving etcd .* at {endpoint} ")
        with rdzv.EtcdBackend(endpoint, "job") as backend:
            current = backend.get_state()
            if run == 0:
                assert current is None
                backend.set_state(b"first run")
            else:
                assert current is not None
                assert current[0] == b"first run"
        assert process.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_serve_on_a_taken_port_exits_1() -> None:
    """A client port in use: etcd cannot start, and serve says so with exit code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "rdzv", "serve", "--port", str(port), "--peer-port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert completed.returncode == 1
    assert "rdzv serve: etcd did not start" in completed.stderr
    assert "address already in use" in completed.stderr


@pytest.mark.slow
def test_serve_where_another_etcd_serves_exits_1_and_never_says_serving() -> None:
    """Another etcd, started as serve starts its own, on the same ports: exit 1, no "Serving"."""
    port, peer_port = closed_port(), closed_port()
    serve = ["serve", "--port", str(port), "--peer-port", str(peer_port)]
    with embedded_etcd("rdzv-serve", client_port=port, peer_port=peer_port):
        completed = subprocess.run(
            [sys.executable, "-m", "rdzv", *serve],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert completed.returncode == 1
    assert "Serving" not in completed.stdout
    assert completed.stderr == (
        f"rdzv serve: etcd did not start: port {port} (--port) is taken (address already in "
        "use); stop what listens there (another rdzv serve?), or choose another --port (0: any "
        "free one).\n"
    )


def test_an_etcd_is_not_ready_while_another_holds_its_ports() -> None:
    """A twin etcd (same name, same ports) does not pass for ready: it fails to start."""
    port, peer_port = closed_port(), closed_port()
    with embedded_etcd("rdzv-serve", client_port=port, peer_port=peer_port):
        twin = embedded_etcd("rdzv-serve", client_port=port, peer_port=peer_port)
        try:
            with pytest.raises(RuntimeError, match="address already in use") as failure:
                twin.start()
        finally:
            twin.stop()
    assert getattr(failure.value, "port_conflict", False)


# ------------------------------------------------------------------------------ --log-level


@pytest.fixture
def rdzv_logger() -> Iterator[logging.Logger]:
    """The `rdzv` logger, its level and handlers put back after the test."""
    logger = logging.getLogger("rdzv")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_log_level_sends_rdzv_records_to_stderr(
    rdzv_logger: logging.Logger, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """`rdzv --log-level debug CMD` sets the rdzv loggers' level and logs to stderr."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, b"x")
    arguments = ["inspect", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix]
    outcome = run_cli("--log-level", "DEBUG", *arguments, "--run-id", "job")
    assert outcome.exit_code == 0, outcome.output
    assert rdzv_logger.level == logging.DEBUG
    (handler,) = [h for h in rdzv_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert handler.level == logging.NOTSET


def test_log_level_given_twice_keeps_one_handler(rdzv_logger: logging.Logger) -> None:
    """Configuring logging again replaces rdzv's handler rather than adding one."""
    before = len(rdzv_logger.handlers)
    for level in ("info", "warning"):
        assert run_cli("--log-level", level, "demo", "--help").exit_code == 0
    assert len(rdzv_logger.handlers) == before + 1
    assert rdzv_logger.level == logging.WARNING


def test_an_invalid_log_level_is_a_usage_error() -> None:
    """An unknown level exits 2 naming the choices."""
    outcome = run_cli("--log-level", "loud", "inspect", "--run-id", "job")
    assert outcome.exit_code == 2
    assert "'loud' is not one of" in outcome.stderr


# ------------------------------------------------------------------------------ demo errors


@pytest.mark.slow
def test_demo_on_a_closed_port_fails_with_one_line() -> None:
    """An unreachable etcd: one line on stderr naming the endpoint, exit 1."""
    endpoint = f"127.0.0.1:{closed_port()}"
    outcome = run_cli("demo", "-n", "2", "--endpoints", endpoint, "--read-timeout", "1")
    assert outcome.exit_code == 1
    assert re.fullmatch(
        rf"rdzv demo: The connection to etcd has failed: etcd at {endpoint} did not answer "
        r"within 1 s \(UNAVAILABLE: [^\n]*\)\.\n",
        outcome.stderr,
    )


@pytest.mark.parametrize("state", [b"not json", b"5", pickle.dumps(torch_state())])
def test_demo_cas_on_a_foreign_state_fails_with_one_line(
    etcd_endpoints: str, etcd_key_prefix: str, state: bytes
) -> None:
    """A run id holding a state that the cas demo did not write: one line, exit 1."""
    overwrite_state(etcd_endpoints, etcd_key_prefix, state)
    outcome = run_cli(
        "demo", "-n", "2", "--protocol", "cas", "--run-id", "job", "--endpoints",
        etcd_endpoints, "--key-prefix", etcd_key_prefix,
    )  # fmt: skip
    assert outcome.exit_code == 1
    assert re.fullmatch(
        r"rdzv demo: the run id 'job' holds a state that rdzv demo --protocol cas did not "
        r"write \((JSONDecodeError|TypeError|UnicodeDecodeError): [^\n]*\); use a fresh run "
        r"id\.\n",
        outcome.stderr,
    )


def test_demo_rounds_on_a_foreign_key_fails_with_one_line(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """A rounds key that another program wrote: one line naming it, exit 1."""
    raw_etcd_sync.put(f"{etcd_key_prefix}/job/latest", b"not a number")
    outcome = run_cli(
        "demo", "-n", "2", "--run-id", "job", "--endpoints", etcd_endpoints, "--key-prefix",
        etcd_key_prefix,
    )  # fmt: skip
    assert outcome.exit_code == 1
    assert outcome.stderr.startswith(f"rdzv demo: The key b'{etcd_key_prefix}/job/latest' holds")
    assert outcome.stderr.count("\n") == 1


def test_inspect_shows_what_the_user_may_read_and_names_what_it_may_not(
    auth_server: EtcdServer, auth_password: str, etcd_key_prefix: str
) -> None:
    """A user who may read the state but not the rounds sees the state; stderr says why not more."""
    prefix = f"/allowed{etcd_key_prefix}"
    overwrite_state(auth_server.endpoint, prefix, b"x", username="alice", password=auth_password)
    outcome = run_cli(
        "inspect", "--endpoints", auth_server.endpoint, "--key-prefix", prefix, "--run-id", "job",
        env={"RDZV_USERNAME": "alice", "RDZV_ETCD_PASSWORD": auth_password},
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "revision" in outcome.stdout
    [note] = outcome.stderr.splitlines()
    assert note.startswith("rdzv inspect: not shown: ")
    assert "refused to let user 'alice' read the rounds of 'job'" in note
