"""A TCP proxy that injects network faults between a client and etcd, for tests.

`FaultProxy` listens on a free loopback port and passes every connection on to one etcd client
endpoint, byte for byte, until a test tells it to misbehave: hold, drop or delay the bytes of one
direction, cut every connection, or refuse new ones. It runs on its own daemon thread with its
own event loop, so it needs nothing from the caller's loop and never blocks it for long, and its
control methods can be called from any thread or coroutine. A peer that resets or closes its
connection is normal for a proxy: the other side of that connection is reset, and nothing is
logged.

The proxy knows nothing of gRPC or HTTP/2: it moves bytes. gRPC sends every call of a channel
over one TCP connection, so a fault applies to every call of that channel at once.

Only the standard library is used (it is re-exported by `rdzv.testing`, which stays cheap to
import).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal

__all__ = ["FaultProxy"]

Direction = Literal["requests", "responses", "both"]

_HOST: Final = "127.0.0.1"
_READ_SIZE: Final = 64 * 1024
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0
_CONTROL_TIMEOUT: Final = 10.0
_CONNECT_TIMEOUT: Final = 10.0
# Waits re-evaluate their predicate at every change of the counters, and at least this often.
_POLL_INTERVAL: Final = 0.05
_DIRECTIONS: Final = ("requests", "responses")


class _Mode(enum.Enum):
    FORWARD = "forward"
    HOLD = "hold"
    DROP = "drop"


class _Flow:
    """The fault state and the counters of one direction, shared by all its connections."""

    def __init__(self) -> None:
        self.mode = _Mode.FORWARD
        self.delay = 0.0
        self.forwarded = 0
        self.held = 0
        self.dropped = 0


class _Chunk:
    """Bytes read from one side and not yet passed on to the other."""

    __slots__ = ("arrived", "data", "released", "sequence")

    def __init__(self, sequence: int, arrived: float, data: bytes, released: bool) -> None:
        self.sequence = sequence  # the order of arrival among all the proxy's chunks
        self.arrived = arrived
        self.data = data
        self.released = released  # let through by a partial release, even while holding


class _Pump:
    """One direction of one proxied connection: what has been read and not yet passed on.

    Every field is guarded by the proxy's lock; `wake` belongs to the proxy's loop.
    """

    def __init__(self, flow: _Flow, writer: asyncio.StreamWriter) -> None:
        self.flow = flow
        self.writer = writer
        self.pending: deque[_Chunk] = deque()
        self.eof = False
        # Bytes of this stream were discarded: passing on what follows would leave a gap.
        self.broken = False
        self.wake = asyncio.Event()

    def discard(self) -> None:
        """Count what is pending as dropped and forget it (lock held)."""
        size = sum(len(chunk.data) for chunk in self.pending)
        self.pending.clear()
        self.flow.held -= size
        self.flow.dropped += size
        self.broken = self.broken or size > 0


class _Link:
    """One client connection and its connection to the target."""

    def __init__(
        self,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        requests: _Flow,
        responses: _Flow,
    ) -> None:
        self.client = client
        self.upstream = upstream
        # Requests are written to the target, responses to the client.
        self.requests = _Pump(requests, upstream)
        self.responses = _Pump(responses, client)
        self.closed = False

    @property
    def pumps(self) -> tuple[_Pump, _Pump]:
        return self.requests, self.responses


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once with a TCP reset, dropping whatever it still had to send."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _parse_target(target: str) -> tuple[str, int]:
    """`"host:port"` (IPv6 hosts in brackets) as a host and a port; `ValueError` if malformed."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a 'host:port' string, not {type(target).__name__}")
    host, separator, port_text = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target must be 'host:port', such as '127.0.0.1:2379', not {target!r}")
    return host, int(port_text)


def _directions(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return _DIRECTIONS
    if direction in _DIRECTIONS:
        return (direction,)
    raise ValueError(f"direction must be 'requests', 'responses' or 'both', not {direction!r}")


# Proxies still running, closed at interpreter exit (their thread is a daemon thread anyway).
_LIVE: weakref.WeakSet[FaultProxy] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for proxy in list(_LIVE):
        with contextlib.suppress(Exception):
            proxy.close()


atexit.register(_close_all_at_exit)


class FaultProxy:
    """A loopback TCP proxy in front of one etcd endpoint that misbehaves on demand.

    Connect the code under test to `endpoint` instead of the etcd endpoint; every connection is
    passed on to `target`, byte for byte, until a fault is switched on:

        with EtcdServer() as server, FaultProxy(server.endpoint) as proxy:
            async with rdzv.connect(proxy.endpoint, read_timeout=2) as connection:
                proxy.hold("responses")  # etcd still gets and applies every request
                ...

    Faults apply to a direction: `"requests"` (bytes from the client to etcd), `"responses"`
    (bytes from etcd to the client) or `"both"`, and to every connection of that direction, the
    current ones and those that open later. Each direction is, at any time, forwarding (the
    default), holding (`hold`) or dropping (`drop`), and may add a delay (`delay`). Besides,
    `cut()` resets every current connection and `refuse_new()` resets new ones as soon as they
    are accepted. `restore()` switches every fault off.

    What each fault models. TCP never loses bytes from the middle of a stream: a network fault
    shows as bytes that arrive late, or as a connection that ends.

    - `hold`: a partition, or a peer that stalls. Nothing is lost: the bytes arrive, in order,
      when released, as TCP would deliver them once the network heals. Holding responses makes
      lost answers (etcd applies a request whose answer never comes in time); holding requests
      makes requests that land late, after their client gave up.
    - `delay`: a slow link, every byte late by the same time, order kept.
    - `drop`: a path that dies silently (a host that vanished, a firewall that starts discarding
      packets): the bytes vanish and nobody is told, until the client's own timeout notices.
      A connection that lost bytes so can never carry its stream on; when the drop ends, it is
      reset, as its peers would reset it once TCP gives up, and the client connects again.
      Connections that sent nothing while dropping go on unharmed.
    - `cut`: a peer that crashed or restarted: its connections are reset at once.
    - `refuse_new`: a server that is down, or not accepting connections.

    gRPC multiplexes all the calls of a channel on one TCP connection: a fault hits every call
    of the channel at once, not a single call. The proxy moves bytes and never parses them.

    The end of a stream (a half-close) travels like a byte: it is held with the bytes before it,
    swallowed while its direction drops, and passed on once everything before it is. A
    connection reset by either side is reset on the other side at once, with whatever was held
    for it.

    The proxy runs on a daemon thread of its own, with its own asyncio event loop: it works
    under async tests (it never uses their loop) and in plain synchronous code. Every method is
    thread-safe and returns at once, except `close()`, `cut()` and a call that ends a drop,
    which wait (milliseconds) until the proxy's thread has reset the connections, and
    `wait_for`, which blocks by design (in coroutines, use `wait_for_async`). The proxy talks
    to nothing but `target` and the loopback clients that connect to it. It keeps its port
    until `close()`, and cannot be started again after.

    Args:
        target: the etcd client endpoint to pass connections on to, `"host:port"` (an IPv6
            host in brackets). The host is resolved once, by `start()`.
    """

    def __init__(self, target: str) -> None:
        self._target_host, self._target_port = _parse_target(target)
        self._target = target
        self._address: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._sequence = 0
        self._flows = {direction: _Flow() for direction in _DIRECTIONS}
        self._refusing = False
        self._accepted = 0
        self._refused = 0
        self._links: set[_Link] = set()
        # Every connection's writer, for the proxy's loop alone: all are closed at shutdown.
        self._writers: set[asyncio.StreamWriter] = set()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._started = False
        self._closed = False
        self._lifecycle = threading.Lock()

    # ---------------------------------------------------------------------------- lifecycle

    @property
    def target(self) -> str:
        """The endpoint that connections are passed on to, as given."""
        return self._target

    @property
    def endpoint(self) -> str:
        """`"127.0.0.1:PORT"`: where to connect instead of `target`. Known after `start()`."""
        if self._port is None:
            raise RuntimeError("the FaultProxy has not been started: call start() first")
        return f"{_HOST}:{self._port}"

    def start(self) -> None:
        """Listen on a free loopback port and start passing connections on to `target`.

        Raises:
            RuntimeError: the proxy was already started (a proxy starts once), or its thread
                did not start.
            OSError: `target`'s host cannot be resolved, or no port could be bound.
        """
        with self._lifecycle:
            if self._started:
                raise RuntimeError("a FaultProxy can be started only once")
            self._started = True
            infos = socket.getaddrinfo(
                self._target_host, self._target_port, type=socket.SOCK_STREAM
            )
            sockaddr = infos[0][4]
            self._address = (str(sockaddr[0]), int(sockaddr[1]))
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind((_HOST, 0))
                listener.listen(128)
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            self._listener = listener
            self._port = int(listener.getsockname()[1])
            self._thread = threading.Thread(
                target=self._run,
                name=f"rdzv-fault-proxy-{self._port}",
                daemon=True,
            )
            self._thread.start()
            if not self._ready.wait(_START_TIMEOUT):
                raise RuntimeError("the FaultProxy's thread did not start in time")
            if self._startup_error is not None:
                self._join()
                raise RuntimeError("the FaultProxy failed to start") from self._startup_error
            _LIVE.add(self)

    def close(self) -> None:
        """Reset every connection, stop listening and end the proxy's thread.

        Closing twice, or closing a proxy that never started, does nothing. The thread is gone
        when this returns.
        """
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            _LIVE.discard(self)
            loop, stop = self._loop, self._stop
            if loop is not None and stop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has already ended
                    loop.call_soon_threadsafe(stop.set)
            self._join()
            if self._listener is not None:
                self._listener.close()
            with self._changed:
                self._bump()

    def _join(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_STOP_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.endpoint if self._port is not None else "not started"
        return f"<FaultProxy {where} -> {self._target}>"

    # ------------------------------------------------------------------------------ faults

    def hold(self, direction: Direction = "both") -> None:
        """Keep the bytes of `direction` buffered instead of passing them on, until `release`.

        The connections stay open and the sender sees its bytes leave; the receiver gets
        nothing. Holding requests makes a request land late (release it after the client gave
        up); holding responses lets etcd apply a request whose answer the client never gets.
        Held bytes are kept in memory.

        Args:
            direction: `"requests"`, `"responses"` or `"both"`.
        """
        self._set(direction, mode=_Mode.HOLD)

    def release(self, direction: Direction = "both", *, nbytes: int | None = None) -> None:
        """Forward `direction` again: first what was held, in order, then new bytes.

        This also ends a `drop` of that direction, resetting the connections that lost bytes
        (see `drop`). A `delay` still applies, counted from when each byte reached the proxy.

        With `nbytes`, only the first `nbytes` bytes held (in their order of arrival, over all
        the connections) are passed on, and the direction keeps holding the rest and whatever
        comes next. This separates a request from what its client sent after giving up: a
        gRPC client that times out cancels its call (an HTTP/2 RST_STREAM frame), and etcd,
        given the request and the cancellation together, may or may not apply the request.
        Note `held(direction)` once the request is held, let the call fail, and release that
        many bytes: etcd gets the request alone.

        Args:
            direction: `"requests"`, `"responses"` or `"both"`; only one of the first two
                with `nbytes`.
            nbytes: how many held bytes to let through, or `None` for all of them and an end
                to holding.

        Raises:
            ValueError: `nbytes` is negative, or given with `"both"`.
        """
        if nbytes is None:
            self._set(direction, mode=_Mode.FORWARD)
            return
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int or None, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be zero or more, not {nbytes}")
        if direction == "both":
            raise ValueError("release(nbytes=...) needs one direction: 'requests' or 'responses'")
        [name] = _directions(direction)
        with self._changed:
            flow = self._flows[name]
            pumps = [pump for link in self._links for pump in link.pumps if pump.flow is flow]
            # Stable: the two halves of a chunk split before keep their order.
            waiting = sorted(
                ((chunk, pump) for pump in pumps for chunk in pump.pending if not chunk.released),
                key=lambda item: item[0].sequence,
            )
            budget = nbytes
            for chunk, pump in waiting:
                if budget <= 0:
                    break
                if len(chunk.data) > budget:
                    # Split the chunk: its first `budget` bytes go, the rest stays held.
                    rest = _Chunk(chunk.sequence, chunk.arrived, chunk.data[budget:], False)
                    chunk.data = chunk.data[:budget]
                    pump.pending.insert(pump.pending.index(chunk) + 1, rest)
                chunk.released = True
                budget -= len(chunk.data)
            self._bump()
        self._wake_pumps()

    def drop(self, direction: Direction = "both") -> None:
        """Discard the bytes of `direction` silently, until `release` or `restore`: a black hole.

        This models a path that dies without a word: the connections stay open, nothing tells
        either side, and a client notices only by its own timeout. Bytes held for that direction
        are discarded too.

        A stream that lost bytes cannot go on: its receiver would get the bytes after the gap,
        which no real network delivers, and gRPC would see garbage. So when the drop ends
        (`release`, `restore`, or `hold` of that direction), every connection that lost bytes
        of that direction is reset on both sides, and that call returns once they are; the
        client then connects again. A connection that lost nothing goes on as it was. To model
        a partition that heals, with every byte delivered late, use `hold` instead.

        Args:
            direction: `"requests"`, `"responses"` or `"both"`.
        """
        self._set(direction, mode=_Mode.DROP)

    def delay(self, seconds: float, direction: Direction = "both") -> None:
        """Pass each byte of `direction` on `seconds` after it reached the proxy (0: no delay).

        Order is kept. The delay applies to the bytes not yet passed on, so lowering it lets
        waiting bytes go sooner. It adds to a hold: held bytes go when released and delayed.

        Args:
            seconds: the delay, zero or more.
            direction: `"requests"`, `"responses"` or `"both"`.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"seconds must be zero or more, not {seconds!r}")
        self._set(direction, delay=float(seconds))

    def cut(self) -> None:
        """Reset every current connection, on both sides, discarding what was held for them.

        Both the client and etcd see their connection reset (a TCP RST) at once. New
        connections are not affected: a client that reconnects gets a fresh connection, under
        the faults in force. Returns once the connections are closed.
        """
        self._call_in_loop(self._cut_now)

    def refuse_new(self, refuse: bool = True) -> None:
        """Reset each new client connection as soon as it is accepted (or, with False, stop).

        The proxy keeps listening, so clients see their connections reset rather than refused,
        and the port is never given up. Current connections are not affected: `cut()` them.

        Args:
            refuse: whether to refuse new connections from now on.
        """
        with self._changed:
            self._refusing = bool(refuse)
            self._bump()

    def restore(self) -> None:
        """Switch every fault off: forward both ways (held bytes first), no delay, accept all.

        Bytes dropped before are gone for good, and the connections that lost them are reset
        (see `drop`); connections cut before stay closed.
        """
        with self._changed:
            self._refusing = False
        self._set("both", mode=_Mode.FORWARD, delay=0.0)

    def _set(
        self, direction: Direction, *, mode: _Mode | None = None, delay: float | None = None
    ) -> None:
        names = _directions(direction)
        broken: list[_Link] = []
        with self._changed:
            for name in names:
                flow = self._flows[name]
                if flow.mode is _Mode.DROP and mode not in (None, _Mode.DROP):
                    # The drop ends: a stream with a gap is reset, never passed on.
                    broken += [
                        link
                        for link in self._links
                        if any(pump.flow is flow and pump.broken for pump in link.pumps)
                    ]
                if mode is not None:
                    flow.mode = mode
                if delay is not None:
                    flow.delay = delay
                if mode is _Mode.DROP:
                    for link in self._links:
                        for pump in link.pumps:
                            if pump.flow is flow:
                                pump.discard()
            for link in broken:
                self._forget(link)  # its pumps stop at once: nothing after the gap goes out
            self._bump()
        if broken:
            self._call_in_loop(lambda: self._reset_links(broken))
        self._wake_pumps()

    # ---------------------------------------------------------------------------- counters

    def forwarded(self, direction: Direction = "both") -> int:
        """Bytes of `direction` passed on so far (written to the socket toward the receiver)."""
        with self._lock:
            return sum(self._flows[name].forwarded for name in _directions(direction))

    def held(self, direction: Direction = "both") -> int:
        """Bytes of `direction` received and not yet passed on: held, or waiting out a delay."""
        with self._lock:
            return sum(self._flows[name].held for name in _directions(direction))

    def dropped(self, direction: Direction = "both") -> int:
        """Bytes of `direction` discarded: while dropping, or held for a connection that ended."""
        with self._lock:
            return sum(self._flows[name].dropped for name in _directions(direction))

    @property
    def connections_accepted(self) -> int:
        """Client connections accepted and passed on so far (refused ones not included)."""
        with self._lock:
            return self._accepted

    @property
    def connections_open(self) -> int:
        """Client connections open now, each with its connection to `target`."""
        with self._lock:
            return len(self._links)

    @property
    def connections_refused(self) -> int:
        """Client connections reset at once because `refuse_new` was on."""
        with self._lock:
            return self._refused

    def _counters(self) -> str:
        with self._lock:
            requests, responses = self._flows["requests"], self._flows["responses"]
            return (
                f"requests forwarded/held/dropped={requests.forwarded}/{requests.held}/"
                f"{requests.dropped}, responses forwarded/held/dropped={responses.forwarded}/"
                f"{responses.held}/{responses.dropped}, connections accepted/open/refused="
                f"{self._accepted}/{len(self._links)}/{self._refused}"
            )

    # ------------------------------------------------------------------------------- waits

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until `predicate()` is true, for at most `timeout` seconds.

        The predicate is called at once, again whenever the proxy's counters change, and at
        least every 50 ms; typically it reads them:

            before = proxy.forwarded("requests")
            ...  # start a call
            proxy.wait_for(lambda: proxy.forwarded("requests") > before, timeout=5)

        Do not call this in a coroutine: it would block its event loop (and whatever client
        runs on it). Use `wait_for_async` there.

        Raises:
            TimeoutError: the predicate was still false after `timeout` seconds; the message
                shows the counters.
            RuntimeError: called in a thread that runs an asyncio event loop.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread: blocking it is fine
            pass
        else:
            raise RuntimeError(
                "FaultProxy.wait_for would block this thread's running event loop: "
                "use `await proxy.wait_for_async(...)` in coroutines"
            )
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                version = self._version
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(self._timeout_message(timeout))
            with self._changed:
                if self._version == version:
                    self._changed.wait(min(remaining, _POLL_INTERVAL))

    async def wait_for_async(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait, without blocking the running event loop, until `predicate()` is true.

        The same as `wait_for`, for coroutines: the predicate is called at once, whenever the
        proxy's counters change, and at least every 50 ms, for at most `timeout` seconds.

        Raises:
            TimeoutError: the predicate was still false after `timeout` seconds; the message
                shows the counters.
        """
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        waiter = (loop, changed)
        with self._lock:
            self._async_waiters.add(waiter)
        try:
            deadline = loop.time() + timeout
            while True:
                changed.clear()
                if predicate():
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(self._timeout_message(timeout))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, _POLL_INTERVAL))
        finally:
            with self._lock:
                self._async_waiters.discard(waiter)

    def _timeout_message(self, timeout: float) -> str:
        return f"the condition was still false after {timeout} s ({self._counters()})"

    def _bump(self) -> None:
        """Note a change of state or counters and wake every waiter (lock held)."""
        self._version += 1
        self._changed.notify_all()
        for loop, event in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                self._async_waiters.discard((loop, event))

    # ------------------------------------------------------------- the proxy's own thread

    def _wake_pumps(self) -> None:
        """Let every pump look at the fault state again (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has ended: nothing to wake
            loop.call_soon_threadsafe(self._wake_pumps_now)

    def _wake_pumps_now(self) -> None:
        with self._lock:
            pumps = [pump for link in self._links for pump in link.pumps]
        for pump in pumps:
            pump.wake.set()

    def _call_in_loop(self, function: Callable[[], None]) -> None:
        """Run `function` on the proxy's loop and wait until it has run."""
        loop = self._loop
        if loop is None or self._closed:
            return
        if self._thread is threading.current_thread():
            function()
            return
        done = threading.Event()

        def run() -> None:
            try:
                function()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop has ended
            return
        # A loop that stops first (a concurrent close) never runs it: stop waiting then.
        deadline = time.monotonic() + _CONTROL_TIMEOUT
        thread = self._thread
        while not done.wait(_POLL_INTERVAL):
            if thread is None or not thread.is_alive() or time.monotonic() > deadline:
                return

    def _cut_now(self) -> None:
        with self._changed:
            links = list(self._links)
            for link in links:
                self._forget(link)
            self._bump()
        self._reset_links(links)

    def _reset_links(self, links: list[_Link]) -> None:
        """Reset both sides of `links`, which were forgotten already (in the proxy's loop)."""
        for link in links:
            _reset(link.client)
            _reset(link.upstream)
            for pump in link.pumps:
                pump.wake.set()

    def _forget(self, link: _Link) -> None:
        """Drop a link from the open ones, discarding what it held (lock held)."""
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for pump in link.pumps:
            pump.discard()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop))
        except BaseException as error:  # reported by start(), which waits for _ready
            self._startup_error = error
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._listener is not None
        self._stop = asyncio.Event()
        self._loop = loop
        handlers: set[asyncio.Task[None]] = set()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # A task of our own rather than asyncio's: cancelling it at shutdown stays quiet.
            self._writers.add(writer)
            task = loop.create_task(self._serve_client(reader, writer))
            handlers.add(task)
            task.add_done_callback(handlers.discard)

        server = await asyncio.start_server(accept, sock=self._listener)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            self._cut_now()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            # Handlers cancelled before they ran never closed their connections.
            for writer in list(self._writers):
                if not writer.transport.is_closing():
                    _reset(writer)
            self._writers.clear()

    async def _serve_client(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        upstream: asyncio.StreamWriter | None = None
        link: _Link | None = None
        tasks: list[asyncio.Future[None]] = []
        try:
            with self._changed:
                refuse = self._refusing or self._closed
                if refuse:
                    self._refused += 1
                else:
                    self._accepted += 1
                self._bump()
            if refuse:
                return
            assert self._address is not None
            try:
                upstream_reader, target = await asyncio.wait_for(
                    asyncio.open_connection(*self._address), _CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                # The target is down: the client sees its connection reset, as from a dead
                # server (the finally clause resets it).
                return
            upstream = target
            self._writers.add(target)
            link = _Link(client, target, self._flows["requests"], self._flows["responses"])
            with self._changed:
                self._links.add(link)
                self._bump()
            tasks = [
                asyncio.ensure_future(self._read(link, link.requests, client_reader)),
                asyncio.ensure_future(self._write(link, link.requests)),
                asyncio.ensure_future(self._read(link, link.responses, upstream_reader)),
                asyncio.ensure_future(self._write(link, link.responses)),
            ]
            # Both streams ended and were passed on: close both sides gracefully. If a side
            # failed instead, the finally clause resets both: a peer that went away (a reset, or
            # a socket that cannot take the end of a stream any more) is normal for a proxy.
            try:
                await asyncio.gather(*tasks)
            except OSError:
                return
            client.close()
            target.close()
        finally:
            if link is not None:
                with self._changed:
                    self._forget(link)
                    self._bump()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client, upstream):
                if writer is not None:
                    if not writer.transport.is_closing():
                        _reset(writer)
                    self._writers.discard(writer)

    async def _read(self, link: _Link, pump: _Pump, reader: asyncio.StreamReader) -> None:
        """Read one side of a connection into its pump until the end of its stream."""
        while True:
            data = await reader.read(_READ_SIZE)
            with self._changed:
                if link.closed:
                    return
                if not data:
                    pump.eof = True
                elif pump.flow.mode is _Mode.DROP:
                    pump.flow.dropped += len(data)
                    pump.broken = True
                else:
                    self._sequence += 1
                    chunk = _Chunk(self._sequence, time.monotonic(), data, released=False)
                    pump.pending.append(chunk)
                    pump.flow.held += len(data)
                self._bump()
            pump.wake.set()
            if not data:
                return

    async def _write(self, link: _Link, pump: _Pump) -> None:
        """Pass a pump's bytes on as its direction's faults allow, then its end of stream."""
        while True:
            pump.wake.clear()
            wait: float | None = None
            wrote = False
            with self._changed:
                if link.closed:
                    return
                flow = pump.flow
                chunk = pump.pending[0] if pump.pending else None
                if chunk is not None and (flow.mode is _Mode.FORWARD or chunk.released):
                    data = chunk.data
                    wait = chunk.arrived + flow.delay - time.monotonic()
                    if wait <= 0:
                        pump.pending.popleft()
                        flow.held -= len(data)
                        flow.forwarded += len(data)
                        pump.writer.write(data)
                        wrote = True
                        self._bump()
                elif flow.mode is _Mode.FORWARD and pump.eof:
                    if pump.writer.can_write_eof():
                        pump.writer.write_eof()
                    return
            if wrote:
                await pump.writer.drain()
            elif wait is None:
                await pump.wake.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pump.wake.wait(), wait)
