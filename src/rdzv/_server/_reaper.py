"""The reaper: a watchdog that cleans up after a Python process that died without `atexit`.

It is a tiny Python process, one per Python process that starts etcd, that reads "watch" and
"unwatch" lines from a pipe and, when the pipe closes (that is, when this process is gone, however
it died: SIGKILL and SIGTERM included, where `atexit` does not run), kills the etcd processes and
removes the directories still watched. It ignores SIGINT and runs in its own session, so a Ctrl-C
or a closed terminal leaves it to clean up after the test process.

`REAPER.watch_pid` and `REAPER.watch_dir` name what it kills and removes; `unwatch_pid` and
`unwatch_dir` take back what was cleaned up already. Best effort: when the reaper cannot be
started, nothing is watched.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["REAPER"]

# The program of the reaper process (see above): the standard library only.
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


REAPER = _Reaper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=REAPER.after_fork_in_child)
