"""The event-loop thread that runs every synchronous facade's calls, and the connections they share.

There is no second implementation in the facades (`rdzv._sync`): every facade of a process runs
the async core's coroutines on one event-loop thread (`_Runner`), for any number of calling
threads at once, and facades made with the same connection options share one `Connection` (one
gRPC channel): a `Portal` is one facade's hold on both. The thread starts with the first facade
and stops with the last; a connection opens with the first facade that uses it and closes with
the last. Each thread or channel costs a process: torchrun's agents and the processes that
create many facades (measured: 16 handlers, 23 threads of their own, before they shared) pay for
them once. Before a fork the shared channels are closed, and a forked child starts anew.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from rdzv import _fork
from rdzv._errors import RendezvousError
from rdzv._etcd import Connection, ConnectionOptions, resume, suspend

__all__ = ["Portal", "open_shared", "shared_connections"]

T = TypeVar("T")

_THREAD_NAME: Final = "rdzv-event-loop"
# How long closing a facade waits for its calls in progress to end once cancelled.
_RELEASE_TIMEOUT: Final = 5.0


# ------------------------------------------------------------------------ sharing a connection


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _file_digest(path: str | Path | None) -> bytes | str | None:
    """What a TLS file holds, for the sharing key: its contents decide, not its name.

    A certificate renewed in place must not be served by a channel made with the old one, as
    a connection of its own would read the new one. (Digests, so that the registry holds no
    second copy of a private key.)
    """
    if path is None:
        return None
    try:
        return _digest(Path(path).read_bytes())
    except OSError:
        return str(path)  # the connection read it a moment ago; it is gone or changing now


def _sharing_key(options: ConnectionOptions) -> tuple[object, ...]:
    """What must be equal for two facades to share a connection: everything it was made with.

    The endpoints and the protocol as resolved (so `"h:2379"` and `"http://h"` share), the
    read timeout, the TLS files' contents, the credentials (the password as a digest) and the
    bound on requests in flight.
    """
    return (
        options.endpoints,
        options.protocol,
        options.read_timeout,
        _file_digest(options.ca_cert),
        _file_digest(options.ssl_cert),
        _file_digest(options.ssl_cert_key),
        options.username,
        None if options.password is None else _digest(options.password.encode()),
        options.max_in_flight,
    )


# ------------------------------------------------------------------------- the loop thread


class _Call:
    """One blocking call handed to the loop: a lock its caller waits on, and the outcome.

    The lock is taken when the call is made and released by the loop thread once the outcome
    is in: a waiting thread costs no polling, and the hand-off is a lock release, cheaper than
    a `concurrent.futures.Future` (see `docs/async-vs-sync.md`).
    """

    __slots__ = ("done", "error", "task", "value")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.release()


def _closed_error() -> RendezvousError:
    return RendezvousError("This rdzv object is closed.")


def _closed_during_call() -> RendezvousError:
    return RendezvousError("This rdzv object was closed while the call was in progress.")


def _cancelled_error(owner: Portal | None, cancelled: asyncio.CancelledError) -> RendezvousError:
    """What a call that ended with `cancelled` raises in its caller's thread.

    The facade cancels a call's task when its portal closes, when its caller is interrupted,
    and when the loop ends. A cancellation that escaped a call whose task nothing cancelled is
    none of these, and is not reported as a close.
    """
    if owner is not None and owner.closed:
        return _closed_during_call()
    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
    if cancelling is None or cancelling():
        return _closed_error()
    error = RendezvousError(
        "The call ended with a cancellation that nothing asked for: a bug of rdzv or of a "
        "library it uses (the chained error shows where it came from)."
    )
    error.__cause__ = cancelled
    return error


class _Runner:
    """The event-loop thread that runs every facade's calls in this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        # Calls handed to the loop and not answered yet: failed if the loop ends first.
        self.pending: set[_Call] = set()
        self.stopped = False
        started = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(started,), name=_THREAD_NAME, daemon=True
        )
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                remaining = asyncio.all_tasks(self.loop)
                for task in remaining:
                    task.cancel()
                if remaining:
                    self.loop.run_until_complete(asyncio.wait(remaining))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                self.loop.close()
                self.stopped = True
                for call in list(self.pending):
                    self.pending.discard(call)
                    call.fail(_closed_error())

    def stop(self) -> None:
        """End the loop (its remaining tasks are cancelled) and wait for the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    def call(
        self,
        function: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        owner: Portal | None = None,
    ) -> T:
        """Run `function(*args, **kwargs)` as a task of the loop; wait for it; return or raise.

        With an `owner`, the task is one of its calls: cancelled when it closes, and refused
        once it has.
        """
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError(
                "A synchronous rdzv facade cannot be called from its own event-loop thread: "
                "it would wait for itself. Use the async API there."
            )
        call = _Call()
        self.pending.add(call)
        try:
            if self.stopped:
                raise RuntimeError("stopped")
            self.loop.call_soon_threadsafe(self._start, call, function, args, kwargs, owner)
        except RuntimeError:  # the loop is closed: every facade on it was closed
            self.pending.discard(call)
            raise _closed_error() from None
        try:
            call.done.acquire()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt): do not leave the call running.
            if not self.stopped:
                self.loop.call_soon_threadsafe(self._cancel, call)
            raise
        error, call.error = call.error, None
        if error is not None:
            raise error
        value: T = call.value
        return value

    def _start(
        self,
        call: _Call,
        function: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        owner: Portal | None,
    ) -> None:
        if owner is not None and owner.closed:
            self.pending.discard(call)
            call.fail(_closed_error())
            return
        call.task = task = self.loop.create_task(self._step(call, function, args, kwargs, owner))
        if owner is not None:
            owner._tasks.add(task)

    async def _step(
        self,
        call: _Call,
        function: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        owner: Portal | None,
    ) -> None:
        # The outcome is handed over here, in the task's last step, rather than by a done
        # callback: that would cost the caller one more turn of the loop.
        try:
            call.value = await function(*args, **kwargs)
        except asyncio.CancelledError as cancelled:
            call.error = _cancelled_error(owner, cancelled)
        except Exception as error:  # StopAsyncIteration too: `iterate` needs it
            call.error = error
        except BaseException as error:  # KeyboardInterrupt, SystemExit: the loop ends too
            call.error = error
            raise
        finally:
            if owner is not None:
                owner._tasks.discard(call.task)
            self.pending.discard(call)
            call.done.release()

    def _cancel(self, call: _Call) -> None:
        if call.task is not None:
            call.task.cancel()

    def run(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run `function(*args)` on the loop for rdzv itself (open, close, fork hooks)."""
        return self.call(function, args, {})


class _Shared:
    """A connection and the number of facades of this process that use it."""

    def __init__(self, key: tuple[object, ...], connection: Connection) -> None:
        self.key = key
        self.connection = connection
        self.users = 0


class _Process:
    """What the facades of one process share: the loop thread, and the connections by key.

    A forked child starts with a new one (see `_fork_in_child`): nothing of its parent's
    threads or channels exists there.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.runner: _Runner | None = None
        self.shared: dict[tuple[object, ...], _Shared] = {}
        self.closing = 0  # portals releasing their connection on the runner right now


_process = _Process()
_open_portals: weakref.WeakSet[Portal] = weakref.WeakSet()


def shared_connections() -> list[tuple[Connection, int]]:
    """The connections that this process's open facades share, each with its number of users."""
    with _process.lock:
        return [(shared.connection, shared.users) for shared in _process.shared.values()]


async def _resume(connection: Connection) -> None:
    resume(connection)


@atexit.register
def _close_open_portals() -> None:
    """Close the channels that facades left open, so the interpreter exits quietly."""
    for portal in list(_open_portals):
        with contextlib.suppress(RendezvousError):  # its loop thread is gone already
            portal.close()


def _on_loop_thread(runner: _Runner) -> bool:
    return threading.get_ident() == runner.thread.ident


def _suspend_connections() -> bool:
    """Before fork(): no gRPC channel may be live, or the child cannot use gRPC at all."""
    process = _process
    runner = process.runner
    # A fork from the loop's own thread cannot wait for the loop.
    if runner is None or runner.pid != os.getpid() or _on_loop_thread(runner):
        return False
    connections = [shared.connection for shared in list(process.shared.values())]
    for connection in connections:
        with contextlib.suppress(RendezvousError):  # closed meanwhile: no channel to close
            runner.run(suspend, connection)
    return bool(connections)


def _resume_connections() -> None:
    process = _process
    runner = process.runner
    if runner is None or runner.pid != os.getpid() or _on_loop_thread(runner):
        return
    for shared in list(process.shared.values()):
        with contextlib.suppress(RendezvousError):
            runner.run(_resume, shared.connection)


def _fork_in_child() -> None:
    """The child has no loop thread and no channel: its facades start anew, from nothing."""
    global _process, _open_portals
    _process = _Process()
    _open_portals = weakref.WeakSet()


_fork.on_fork(
    before=_suspend_connections, after_in_parent=_resume_connections, after_in_child=_fork_in_child
)


async def _next(changes: AsyncGenerator[T, None]) -> T:
    return await changes.__anext__()


class Portal:
    """One facade's hold on the process's event-loop thread and on a shared `Connection`.

    Made by `Portal.open`; a facade and everything it hands out (the torch store and its
    clones) call through it. `close()` ends its calls in progress and, for the last portal on a
    connection, closes the connection, and for the last portal of the process, stops the
    thread. A portal made before a fork refuses to work in the child.
    """

    def __init__(self, process: _Process, runner: _Runner, shared: _Shared) -> None:
        self._process = process
        self._runner = runner
        self._shared = shared
        self._pid = runner.pid
        self._lock = threading.Lock()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # touched on the loop thread only
        self._generators: set[AsyncGenerator[Any, None]] = set()

    @classmethod
    def open(cls, options: ConnectionOptions, connection: Connection | None = None) -> Portal:
        """A portal on the shared connection for `options`, checked to answer like `open()`.

        `connection`, made from `options`, is used if no facade of this process uses one
        with the same options yet; otherwise it is dropped unopened (it holds no channel).
        Raises what `Connection.open` raises if etcd does not answer or refuses the
        credentials.
        """
        candidate = Connection(options) if connection is None else connection
        key = _sharing_key(options)
        process = _process
        with process.lock:
            if process.runner is None:
                process.runner = _Runner()
            runner = process.runner
            shared = process.shared.get(key)
            if shared is None:
                shared = process.shared[key] = _Shared(key, candidate)
            shared.users += 1
        portal = cls(process, runner, shared)
        try:
            # Every facade checks, as it did with a connection of its own, that etcd answers.
            portal.call(shared.connection.open)
        except BaseException:
            portal.close()
            raise
        _open_portals.add(portal)
        return portal

    @property
    def connection(self) -> Connection:
        """The connection this portal's facade uses, shared with others of the same options."""
        return self._shared.connection

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run `function(*args, **kwargs)` on the event loop and wait for its result."""
        if self._closed or self._pid != os.getpid():
            self._refuse()
        return self._runner.call(function, args, kwargs, self)

    def iterate(self, changes: AsyncGenerator[T, None]) -> Iterator[T]:
        """Iterate over an async generator of the loop from this thread."""
        self._generators.add(changes)
        try:
            while True:
                try:
                    item = self.call(_next, changes)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._closed and self._pid == os.getpid():
                try:
                    self.call(changes.aclose)
                except RendezvousError:
                    if not self._closed:
                        raise
            self._generators.discard(changes)

    def _refuse(self) -> None:
        if self._pid != os.getpid():
            # The loop thread did not survive fork(); only the parent can use it.
            raise RendezvousError(
                f"This rdzv object was created in process {self._pid}, and its event-loop thread "
                "does not exist in this forked process: create a new one here."
            )
        raise _closed_error()

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    async def _release(self, last: bool) -> None:
        """End this portal's calls and watches; close the connection if no one else uses it."""
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_RELEASE_TIMEOUT)
        for changes in list(self._generators):
            try:
                await changes.aclose()
            except Exception:  # a watch that fails to end has ended all the same
                continue
        if last:
            await self._shared.connection.aclose()

    def close(self) -> None:
        """Release the connection and the thread; the last user closes them. Harmless twice.

        Calls in progress through this portal end with `RendezvousError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_portals.discard(self)
        if self._pid != os.getpid():
            return  # a parent's portal in a forked child: nothing of it exists here
        process, shared, runner = self._process, self._shared, self._runner
        with process.lock:
            shared.users -= 1
            last = shared.users == 0
            if last and process.shared.get(shared.key) is shared:
                del process.shared[shared.key]
            process.closing += 1
        try:
            runner.run(self._release, last)
        finally:
            # The last portal to finish its release stops the thread: one that stopped it
            # while another still closed its connection would leave that channel open.
            with process.lock:
                process.closing -= 1
                stop = process.runner is runner and not process.shared and not process.closing
                if stop:
                    process.runner = None
            if stop:
                runner.stop()


def open_shared(options: ConnectionOptions, make: Callable[[Connection], T]) -> tuple[Portal, T]:
    """A portal for `options`, and `make(connection)` on its shared connection.

    `make` runs first on a new connection that is not opened, so that every argument is
    validated (`ValueError`) before a thread starts or a socket opens.
    """
    candidate = Connection(options)
    made = make(candidate)
    portal = Portal.open(options, candidate)
    if portal.connection is not candidate:
        try:
            made = make(portal.connection)
        except BaseException:
            portal.close()
            raise
    return portal, made
