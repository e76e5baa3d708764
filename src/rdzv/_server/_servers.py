"""The etcd processes: `EtcdServer`, one etcd on 127.0.0.1, and `EtcdCluster`, several as one.

`EtcdServer` runs one etcd process on 127.0.0.1, with its own free ports and a temporary data
directory; `EtcdCluster` runs several of them as one cluster, so that fault tests can kill, pause
and restart single members. The servers only speak the v3 API (the v2 API is never enabled), use
fast raft timings (50 ms heartbeats, 500 ms election timeout, so the smallest lease TTL is 1 s)
and log errors only, to a file.

Every process started here is killed, and every temporary directory removed, when the Python
process exits: through `atexit` when it exits normally, and otherwise (SIGKILL, SIGTERM, a crash)
through the reaper (`rdzv._server._reaper`).

The classes are not thread-safe: drive one server from one thread at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from rdzv._server._binary import find_etcd_binary
from rdzv._server._gateway import Gateway, uint
from rdzv._server._ports import HOST, free_ports, listens_on
from rdzv._server._reaper import REAPER
from rdzv._server._tls import EtcdTLS

__all__ = ["EtcdCluster", "EtcdServer"]

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


class _StartupError(RuntimeError):
    """etcd did not become ready; `port_conflict` tells whether a port was already taken."""

    def __init__(self, message: str, *, port_conflict: bool = False) -> None:
        super().__init__(message)
        self.port_conflict = port_conflict


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


def _cleanup_at_exit() -> None:
    for server in list(_LIVE_SERVERS):
        if server._owner_pid == os.getpid():  # never a forked child's parent's servers
            with contextlib.suppress(Exception):
                server._cleanup_now()
    with contextlib.suppress(Exception):
        REAPER.close()


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
        free = iter(free_ports(int(client_port is None) + int(peer_port is None)))
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
        self._gateway = Gateway(tls)

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
        return f"{HOST}:{self._client_port}"

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
        return f"http://{HOST}:{self._peer_port}"

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
        if wait:
            _start(self, self.startup_timeout)
        else:
            self._launch()

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
        return self._gateway.post(self.client_url, "/v3/maintenance/status", {}, timeout=timeout)

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
            REAPER.watch_dir(self._scratch_dir)
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
        REAPER.watch_pid(self._proc.pid)
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
        if proc is not None and listens_on(proc.pid, self.client_port) is False:
            return False
        try:
            status = self.status(timeout=probe_timeout)
            member_id = uint(status["header"]["member_id"])
            if uint(status.get("leader")) == 0:
                return False
            if member_id == self._member_id:
                return True
            members = self._gateway.post(
                self.client_url, "/v3/cluster/member/list", {}, timeout=probe_timeout
            )
            for member in members.get("members", []):
                if (
                    uint(member.get("ID")) == member_id
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
            REAPER.unwatch_pid(proc.pid)
        self._proc = None
        self._paused = False
        if self._scratch_dir is None:
            _LIVE_SERVERS.discard(self)

    def _remove_scratch(self) -> None:
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            REAPER.unwatch_dir(self._scratch_dir)
            self._scratch_dir = None
            if self._given_data_dir is None:
                self._member_id = None
        if self._proc is None:
            _LIVE_SERVERS.discard(self)

    def _members(self) -> list[EtcdServer]:
        """The servers that `_start` waits for: a lone server is a cluster of one."""
        return [self]

    def _take_new_ports(self) -> bool:
        """After a port conflict on a fresh start: forget what etcd wrote, take new free ports.

        Returns False, and does nothing, when both ports were given, since those never change.
        """
        if not (self._auto_client_port or self._auto_peer_port):
            return False
        data_dir = self.data_dir
        if data_dir is not None:
            shutil.rmtree(data_dir / "member", ignore_errors=True)
        free = iter(free_ports(2))
        if self._auto_client_port:
            self._client_port = next(free)
        if self._auto_peer_port:
            self._peer_port = next(free)
        return True

    def _cleanup_now(self) -> None:
        """At interpreter exit: kill without delay and remove the owned temporary directory."""
        self.kill()
        self._remove_scratch()


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


class _Startable(Protocol):
    """What `_start` drives: one `EtcdServer`, or every member of an `EtcdCluster`."""

    def _members(self) -> Sequence[EtcdServer]:
        """The servers to wait for."""
        ...

    def _launch(self) -> bool:
        """Start every process without waiting; return whether every data directory was fresh."""
        ...

    def _terminate(self) -> None:
        """Stop every process, keeping every file."""
        ...

    def _take_new_ports(self) -> bool:
        """After a port conflict: drop the fresh data, take new ports; False if they are fixed."""
        ...


def _start(startable: _Startable, timeout: float) -> None:
    """Launch, then wait until ready; after a port conflict on fresh data, again on new ports.

    A port picked as free can be taken by another process before etcd binds it, and etcd then
    exits. On fresh data nothing is lost by starting over, so that is tried up to
    `_PORT_ATTEMPTS` times within `timeout`; any other failure stops every process and is raised.
    """
    deadline = time.monotonic() + timeout
    attempt = 1
    while True:
        fresh = False
        try:
            fresh = startable._launch()
            _wait_ready(startable._members(), deadline, timeout)
        except _StartupError as exc:
            startable._terminate()
            retry = (
                exc.port_conflict
                and fresh
                and attempt < _PORT_ATTEMPTS
                and time.monotonic() < deadline
                and startable._take_new_ports()
            )
            if not retry:
                raise
            attempt += 1
        except BaseException:
            startable._terminate()
            raise
        else:
            return


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
        ports = free_ports(2 * self.size)
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
        _start(self, self.startup_timeout)

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
                    member_id = uint(status["header"]["member_id"])
                    leader_id = uint(status.get("leader"))
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

    def _members(self) -> list[EtcdServer]:
        return self.members

    def _launch(self) -> bool:
        """Start every member without waiting, since a member is only ready once a quorum is up."""
        fresh = True
        for member in self.members:
            fresh = member._launch() and fresh
        return fresh

    def _terminate(self) -> None:
        # Every member is stopped, so no member keeps waiting for a dead peer.
        for member in self.members:
            member.stop(keep_data=True)

    def _take_new_ports(self) -> bool:
        """New members on new ports, in place of these (whose data is removed)."""
        for member in self.members:
            member.stop()
        self.members = self._new_members()
        return True

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
