"""`rdzv check`, end to end against real etcd servers: healthy, read-only, one endpoint down."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from rdzv import _check
from rdzv.testing import EtcdServer
from support import READER_PASSWORD, RawEtcd, closed_port, run_cli


def _check_without_torch(site: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`rdzv check ARGUMENTS` in a Python whose site-packages lack torch, as on an operator's box.

    `site` is a directory of links to everything in this environment's site-packages but torch;
    `python -S` leaves the real one out, and `site.addsitedir` reads the links' .pth files
    (rdzv's editable install among them).
    """
    script = (
        "import site, sys; site.addsitedir(sys.argv[1]); from rdzv._cli import main; "
        "main(sys.argv[2:], prog_name='rdzv')"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-S", "-c", script, str(site), "check", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
    )


@pytest.fixture
def site_without_torch(tmp_path: Path) -> Path:
    """A directory of links to this environment's site-packages, torch's left out."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for directory in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(directory).iterdir():
            torch = entry.name == "torch" or entry.name.startswith("torch-")
            if not torch and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


def _as_json(outcome: Result) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(outcome.stdout)
    return report


def _finding(report: dict[str, Any], topic: str, name: str) -> dict[str, Any]:
    checks: list[dict[str, Any]] = report["checks"]
    (found,) = [c for c in checks if (c["topic"], c["name"]) == (topic, name)]
    return found


def test_healthy_etcd_passes_every_check(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """A healthy etcd without auth: every check passes, exit 0, each etcd call timed."""
    outcome = run_cli(
        "check", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--rounds-prefix",
        f"{etcd_key_prefix}/rounds", "--store-prefix", f"{etcd_key_prefix}/store/", "--json",
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    report = _as_json(outcome)
    assert report["ok"] is True
    assert set(report["checks"][0]) == {"topic", "name", "ok", "detail", "seconds", "fix"}
    expected = [("endpoint", etcd_endpoints)]
    expected += [("cluster", name) for name in ("members", "leader", "health", "version")]
    expected += [("auth", "status")]
    for topic in ("rendezvous", "rounds", "store"):
        expected += [(topic, name) for name in ("write", "read", "watch", "delete")]
    expected += [("torch", "installed"), ("torch", "etcd-v3")]
    checks = [(c["topic"], c["name"]) for c in report["checks"]]
    assert checks[: len(expected)] == expected
    assert all(topic == "torch" for topic, _ in checks[len(expected) :])  # rdzv's other handlers
    for topic, name in [("endpoint", etcd_endpoints), ("rendezvous", "write"), ("store", "watch")]:
        assert _finding(report, topic, name)["seconds"] > 0
    assert _finding(report, "auth", "status")["detail"] == "off"


def test_scratch_keys_are_gone_afterwards(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """The keys the check wrote under both prefixes are deleted when it ends."""
    outcome = run_cli(
        "check", "--endpoints", etcd_endpoints, "--key-prefix", etcd_key_prefix, "--rounds-prefix",
        f"{etcd_key_prefix}/rounds", "--store-prefix", f"{etcd_key_prefix}/store/", "--json",
    )  # fmt: skip
    report = _as_json(outcome)
    for topic in ("rendezvous", "rounds", "store"):
        key = _finding(report, topic, "write")["detail"].removeprefix("wrote ")
        assert key.startswith(etcd_key_prefix)
        assert raw_etcd_sync.get(key) is None


def test_read_only_user_fails_the_write_with_the_grant_hint(
    reader_server: EtcdServer, tmp_path: Path
) -> None:
    """A user who may only read: the write and delete fail, each naming the etcdctl grant."""
    password_file = tmp_path / "password"
    password_file.write_text(READER_PASSWORD)
    outcome = run_cli(
        "check", "--endpoints", reader_server.endpoint, "--username", "reader", "--password-file",
        str(password_file), "--json",
    )  # fmt: skip
    assert outcome.exit_code == 1
    report = _as_json(outcome)
    assert report["ok"] is False
    assert _finding(report, "auth", "status")["detail"] == "on; user reader, roles: reading"
    prefixes = {
        "rendezvous": "/torch/elastic/rendezvous/",
        "rounds": "/rdzv/rounds/",
        "store": "/torch/elastic/store/",
    }
    for topic, prefix in prefixes.items():
        write = _finding(report, topic, "write")
        assert write["ok"] is False
        assert "permission denied" in write["detail"]
        assert write["fix"] == (
            f"Run: etcdctl role grant-permission reading readwrite --prefix=true {prefix}"
        )
        assert _finding(report, topic, "delete")["ok"] is False
        assert _finding(report, topic, "read")["ok"] is True
        assert _finding(report, topic, "watch")["ok"] is True
    failed = [(c["topic"], c["name"]) for c in report["checks"] if not c["ok"]]
    assert failed == [(topic, name) for topic in prefixes for name in ("write", "delete")]
    assert outcome.stderr == f"rdzv check: 6 of {len(report['checks'])} checks failed.\n"


def test_user_without_a_role_is_told_to_add_one(reader_server: EtcdServer) -> None:
    """A user with no role: the hint adds a role, grants it, and gives it to the user."""
    outcome = run_cli(
        "check", "--endpoints", reader_server.endpoint, "--username", "nobody", "--json",
        env={"RDZV_ETCD_PASSWORD": READER_PASSWORD},
    )  # fmt: skip
    assert outcome.exit_code == 1
    write = _finding(_as_json(outcome), "rendezvous", "write")
    assert write["fix"] == (
        "Run: etcdctl role add ROLE; etcdctl role grant-permission ROLE readwrite --prefix=true "
        "/torch/elastic/rendezvous/; etcdctl user grant-role nobody ROLE"
    )


def test_auth_on_without_a_username_says_to_pass_one(reader_server: EtcdServer) -> None:
    """Auth on and no --username: the auth line fails and says how to give one."""
    outcome = run_cli("check", "--endpoints", reader_server.endpoint, "--json")
    assert outcome.exit_code == 1
    status = _finding(_as_json(outcome), "auth", "status")
    assert (status["ok"], status["detail"]) == (False, "on, and no --username given")
    assert "--username" in status["fix"]


@pytest.mark.slow
def test_one_endpoint_of_two_down_is_reported_unreachable(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A closed port among the endpoints: that line fails, the rest is checked on the other."""
    down = f"127.0.0.1:{closed_port()}"
    outcome = run_cli(
        "check", "--endpoints", f"{etcd_endpoints},{down}", "--read-timeout", "2", "--key-prefix",
        etcd_key_prefix, "--rounds-prefix", f"{etcd_key_prefix}/rounds", "--store-prefix",
        f"{etcd_key_prefix}/store/", "--json",
    )  # fmt: skip
    assert outcome.exit_code == 1
    report = _as_json(outcome)
    unreachable = _finding(report, "endpoint", down)
    assert unreachable["ok"] is False
    assert unreachable["detail"].startswith("unreachable: did not answer within 2 s (UNAVAILABLE")
    assert f"Check that etcd runs at {down}" in unreachable["fix"]
    failed = [(c["topic"], c["name"]) for c in report["checks"] if not c["ok"]]
    assert failed == [("endpoint", down)]


def test_the_table_gives_each_failure_its_fix(reader_server: EtcdServer) -> None:
    """On a terminal: one row a check, FAIL rows followed by a fix line."""
    outcome = run_cli(
        "check", "--endpoints", reader_server.endpoint, "--username", "reader",
        env={"RDZV_ETCD_PASSWORD": READER_PASSWORD},
    )  # fmt: skip
    lines = outcome.stdout.splitlines()
    assert lines[0].startswith(f"ok    endpoint    {reader_server.endpoint}")
    failed = [index for index, line in enumerate(lines) if line.startswith("FAIL")]
    assert len(failed) == 6
    for index in failed:
        assert lines[index + 1].startswith("      fix: Run: etcdctl role grant-permission")


def test_a_handler_entry_point_that_fails_to_load_shows_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torchrun would only log a failing etcd-v3 entry point: check shows the error."""
    broken = importlib.metadata.EntryPoint(
        name="etcd-v3", value="rdzv._no_such_module:handler_creator", group="torchrun.handlers"
    )

    def entry_points(**selection: str) -> importlib.metadata.EntryPoints:
        assert selection == {"group": "torchrun.handlers"}
        return importlib.metadata.EntryPoints([broken])

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    (handler,) = [f for f in _check.torch_findings() if f.name == "etcd-v3"]
    assert not handler.ok
    assert handler.detail == (
        "rdzv._no_such_module:handler_creator fails: ModuleNotFoundError: No module named "
        "'rdzv._no_such_module'"
    )
    assert handler.fix is not None


def _scratch_prefixes(etcd_key_prefix: str) -> list[str]:
    return [
        "--key-prefix", etcd_key_prefix, "--rounds-prefix", f"{etcd_key_prefix}/rounds",
        "--store-prefix", f"{etcd_key_prefix}/store/",
    ]  # fmt: skip


@pytest.mark.slow
def test_without_torch_a_healthy_etcd_passes_with_torch_skipped(
    site_without_torch: Path, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Where torch is not installed, the torch line says skipped and the exit code is 0."""
    completed = _check_without_torch(
        site_without_torch, "--endpoints", etcd_endpoints, *_scratch_prefixes(etcd_key_prefix)
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    torch_lines = [line for line in completed.stdout.splitlines() if "  torch  " in line]
    assert torch_lines == ["ok    torch       installed                   not installed (skipped)"]


@pytest.mark.slow
def test_torch_option_requires_torch(
    site_without_torch: Path, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With --torch, a machine without torch fails the check, saying how to install it."""
    completed = _check_without_torch(
        site_without_torch, "--torch", "--json", "--endpoints", etcd_endpoints,
        *_scratch_prefixes(etcd_key_prefix),
    )  # fmt: skip
    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    installed = _finding(report, "torch", "installed")
    assert (installed["ok"], installed["detail"]) == (False, "torch is not installed")
    assert "pip install torch" in installed["fix"]


def test_no_torch_option_skips_the_torch_checks(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """--no-torch checks nothing of torch, even where it is installed: one line says so."""
    outcome = run_cli(
        "check",
        "--no-torch",
        "--json",
        "--endpoints",
        etcd_endpoints,
        *_scratch_prefixes(etcd_key_prefix),
    )
    assert outcome.exit_code == 0, outcome.output
    torch = [c for c in _as_json(outcome)["checks"] if c["topic"] == "torch"]
    assert [(c["name"], c["ok"], c["detail"]) for c in torch] == [
        ("installed", True, "not checked (--no-torch)")
    ]
