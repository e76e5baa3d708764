"""fork() and gRPC: what rdzv does around a fork, and what a forked child may still do.

grpc.aio polls its completion queue on a thread of its own while any channel object exists,
open or closed. A fork while that thread is inside gRPC skips gRPC's own fork handlers ("Other
threads are currently calling into gRPC"), and a child that then uses gRPC crashes or hangs in
gRPC's poller (`ev_epoll1_linux.cc ... Check failed`). With every channel closed and collected,
the thread ends and a child can start gRPC afresh.

So before a fork the synchronous facades close their channels (`_sync` registers that hook
here, and one that gives a child an empty registry of connections and no loop thread), and the
fork waits, briefly, for the poller thread to end. If it is still there (another
channel, or one that an exception's traceback keeps alive), the child is told so: making a
connection there raises a clear `RendezvousError` instead of crashing.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Final

from rdzv._errors import RendezvousError

__all__ = ["check_grpc_usable", "on_fork"]

# grpc.aio's poller thread, recognised by its target's name (grpcio 1.60-1.85). If a grpcio
# names it otherwise, nothing is waited for and no child is refused.
_GRPC_POLLER: Final = "_poll_wrapper"
_IDLE_TIMEOUT: Final = 2.0

_before: list[Callable[[], bool]] = []
_after_in_parent: list[Callable[[], None]] = []
_after_in_child: list[Callable[[], None]] = []
_grpc_busy_at_fork = False
_unusable_here = False


def on_fork(
    *,
    before: Callable[[], bool],
    after_in_parent: Callable[[], None],
    after_in_child: Callable[[], None] | None = None,
) -> None:
    """Run `before` ahead of every fork, and after it `after_in_parent` or `after_in_child`.

    `before` returns whether it closed gRPC channels (then the fork waits for gRPC to go idle).
    `after_in_child` runs in the child, where no thread but the forking one exists: it must not
    wait for another thread.
    """
    _before.append(before)
    _after_in_parent.append(after_in_parent)
    if after_in_child is not None:
        _after_in_child.append(after_in_child)


def check_grpc_usable() -> None:
    """Raise `RendezvousError` in a child forked while its parent's gRPC was busy."""
    if _unusable_here:
        raise RendezvousError(
            "This process was forked while gRPC was still running in its parent (a channel "
            "object was still alive there), and gRPC cannot be used in it. Close every rdzv "
            "connection before forking, or start the process with multiprocessing's 'spawn' "
            "or 'forkserver' method."
        )


def _poller_running() -> bool:
    return any(_GRPC_POLLER in thread.name for thread in threading.enumerate())


def _wait_for_grpc_to_go_idle() -> bool:
    """Wait (at most `_IDLE_TIMEOUT`) until gRPC's poller thread has ended; whether it did."""
    deadline = time.monotonic() + _IDLE_TIMEOUT
    while time.monotonic() < deadline:
        gc.collect()
        if not _poller_running():
            return True
        time.sleep(0.01)
    return False


def _prepare() -> None:
    global _grpc_busy_at_fork
    released = [hook() for hook in _before]
    # Only when rdzv had channels open does it wait (collecting garbage costs time) and judge:
    # a process that forks with other gRPC users is left as it always was.
    _grpc_busy_at_fork = any(released) and not _wait_for_grpc_to_go_idle()


def _in_parent() -> None:
    for hook in _after_in_parent:
        hook()


def _in_child() -> None:
    global _unusable_here
    _unusable_here = _unusable_here or _grpc_busy_at_fork
    for hook in _after_in_child:
        hook()


os.register_at_fork(before=_prepare, after_in_parent=_in_parent, after_in_child=_in_child)
