r"""PyTorch integration: torchrun's `etcd-v3` and `etcd-v3-rounds` backends, and a c10d Store.

After `pip install 'rdzv[torch]'`::

    torchrun --rdzv-backend=etcd-v3 --rdzv-endpoint=10.0.0.1:2379,10.0.0.2:2379 \\
        --rdzv-id=job-42 --nnodes=2 --nproc-per-node=8 train.py

Everything here runs the async core through the synchronous facade's event-loop thread; errors
come out as torch's own classes (`torch.distributed.elastic.rendezvous.api`), so torch's handler
and user code catch them.
"""

from __future__ import annotations

try:
    import torch.distributed as dist

    # torch.distributed re-exports Store only when distributed support is built in, which type
    # checkers cannot see; this is where it is defined.
    from torch._C._distributed_c10d import Store
    from torch.distributed.elastic.rendezvous import api as torch_api
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
except ImportError as error:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "rdzv.torch needs PyTorch; install it with: pip install 'rdzv[torch]'"
    ) from error

import contextlib
import datetime
import logging
import math
import os
import shlex
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rdzv._backend import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL,
    AsyncEtcdBackend,
    SetStateResult,
)
from rdzv._errors import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StoreTimeoutError,
)
from rdzv._etcd import Connection
from rdzv._etcd._connection import DEFAULT_CONNECT_TIMEOUT, validate_connect_timeout
from rdzv._etcd._endpoints import resolve_endpoints
from rdzv._store import DEFAULT_STORE_PREFIX, AsyncEtcdStore
from rdzv._sync import ConnectionOptions, EtcdBackend, Portal, _prepare, open_shared
from rdzv._validation import parse_read_timeout, validate_ttl

__all__ = [
    "PASSWORD_ENVIRONMENT_VARIABLE",
    "EtcdStore",
    "RoundsRendezvousHandler",
    "TorchEtcdBackend",
    "create_backend",
    "create_handler",
    "create_rounds_handler",
]

PASSWORD_ENVIRONMENT_VARIABLE = "RDZV_ETCD_PASSWORD"
DEFAULT_ENDPOINT = "localhost:2379"

_logger = logging.getLogger("rdzv.torch")

# The `--rdzv-conf` keys that `create_backend` reads (`password` and `state_key` only to refuse
# them, with a message that says where they belong).
_RDZV_CONF_KEYS: frozenset[str] = frozenset(
    {
        "ca_cert",
        "cacert",
        "cert",
        "connect_timeout",
        "key",
        "key_prefix",
        "password",
        "password_file",
        "protocol",
        "read_timeout",
        "ssl_cert",
        "ssl_cert_key",
        "state_key",
        "state_key_file",
        "store_prefix",
        "ttl",
        "username",
    }
)

# The keys torch itself reads from `--rdzv-conf` under this backend: its
# `dynamic_rendezvous.create_handler` (the handler's timeouts and keep-alive), and `timeout`,
# which torchrun's launcher always adds (for the etcd-v2 and c10d backends). `local_addr` is not
# one: torchrun passes it as `RendezvousParameters.local_addr`, never among the options.
_TORCH_CONF_KEYS: frozenset[str] = frozenset(
    {
        "close_timeout",
        "heartbeat_timeout",
        "join_timeout",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "last_call_timeout",
        "timeout",
    }
)

# Every `--rdzv-conf` key that `create_handler` reads. Another handler over these parameters
# passes `_warn_unknown_conf` this set with its own keys added.
_KNOWN_CONF_KEYS: frozenset[str] = _RDZV_CONF_KEYS | _TORCH_CONF_KEYS

# (our class, torch's class), most specific first; `StoreTimeoutError` is apart, below.
_TORCH_ERRORS: tuple[tuple[type[RendezvousError], type[Exception]], ...] = (
    (RendezvousConnectionError, torch_api.RendezvousConnectionError),
    (RendezvousStateError, torch_api.RendezvousStateError),
    (RendezvousClosedError, torch_api.RendezvousClosedError),
    (RendezvousTimeoutError, torch_api.RendezvousTimeoutError),
    (RendezvousError, torch_api.RendezvousError),
)


@contextlib.contextmanager
def _as_torch_errors(*, timeout: type[Exception] = dist.DistStoreError) -> Iterator[None]:
    """Re-raise rdzv's errors as torch's, with the same message and the original chained.

    A `StoreTimeoutError` becomes `timeout`: `DistStoreError`, or for a pop that must not wait,
    `QueueEmptyError` (a `DistStoreError` too), as TCPStore raises.
    """
    try:
        yield
    except StoreTimeoutError as error:
        raise timeout(str(error)) from error
    except RendezvousError as error:
        for ours, theirs in _TORCH_ERRORS:
            if isinstance(error, ours):
                raise theirs(str(error)) from error
        raise  # pragma: no cover - the last pair catches every RendezvousError


class TorchEtcdBackend(dynamic_rendezvous.RendezvousBackend):
    """torch's `RendezvousBackend` over `rdzv.EtcdBackend`; its name is `"etcd-v3"`."""

    def __init__(self, facade: EtcdBackend) -> None:
        self._facade = facade

    def __repr__(self) -> str:
        return f"<rdzv.torch.TorchEtcdBackend {self._facade!r}>"

    @property
    def name(self) -> str:
        """`"etcd-v3"`, the name torchrun's `--rdzv-backend` uses."""
        return self._facade.name

    @property
    def facade(self) -> EtcdBackend:
        """The rdzv facade this backend delegates to."""
        return self._facade

    def get_state(self) -> tuple[bytes, Any] | None:
        """See `rdzv.AsyncEtcdBackend.get_state`; raises torch's error classes."""
        with _as_torch_errors():
            return self._facade.get_state()

    def set_state(self, state: bytes, token: Any | None = None) -> SetStateResult | None:
        """See `rdzv.AsyncEtcdBackend.set_state`; raises torch's error classes."""
        with _as_torch_errors():
            return self._facade.set_state(state, token)


def _as_bytes(value: str | bytes) -> bytes:
    # C++ callers pass bytes; Python callers often pass str.
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(Store):
    """A c10d `Store` whose keys live in etcd v3 under a prefix (default `/torch/elastic/store/`).

    Blocking calls (`get`, `wait`, `multi_get`, `queue_pop`) wait with etcd's watch and give up
    after the store's `timeout` (a zero timeout waits forever, as in c10d), raising
    `DistStoreError`. It has torch's extended API (`append`, `multi_get`, `multi_set`, which a
    `PrefixStore` passes on as they are), queues, `list_keys` and `clone`; the table of every
    `torch.distributed.Store` method is in the documentation's "Store methods" page.
    """

    def __init__(
        self,
        loop: Portal,
        store: AsyncEtcdStore,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        super().__init__()  # the pybind11 trampoline needs it
        self._loop = loop
        self._store = store
        # The clones of this store and of its clones, kept alive with it (see `clone`).
        self._clones: list[EtcdStore] = []
        if timeout is not None:
            self.set_timeout(timeout)

    def __repr__(self) -> str:
        return f"<rdzv.torch.EtcdStore prefix={self._store.prefix!r}>"

    def _seconds(self, timeout: datetime.timedelta | None = None) -> float:
        # Read the timeout on every call: C++ (PrefixStore) changes it without calling Python.
        if timeout is None:
            timeout = self.timeout  # type: ignore[attr-defined]  # missing from torch's stub
        seconds = timeout.total_seconds()
        return math.inf if seconds == 0 else seconds

    def set(self, key: str, value: str | bytes) -> None:
        """Write `value` at `key`."""
        with _as_torch_errors():
            self._loop.call(self._store.set, key, _as_bytes(value))

    def get(self, key: str) -> bytes:
        """Return the value at `key`, waiting up to the store's timeout for it to appear."""
        with _as_torch_errors():
            return self._loop.call(self._store.get, key, timeout=self._seconds())

    def add(self, key: str, value: int) -> int:
        """Add `value` to the integer at `key` (0 if absent), atomically; return the sum."""
        with _as_torch_errors():
            return self._loop.call(self._store.add, key, value)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """Set `key` to `desired_value` if it holds `expected_value`; return its value then.

        An empty `expected_value` also matches an absent key (c10d's "set if absent").
        """
        with _as_torch_errors():
            return self._loop.call(
                self._store.compare_set, key, _as_bytes(expected_value), _as_bytes(desired_value)
            )

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        """Wait until every key exists, up to `timeout` (default: the store's timeout)."""
        with _as_torch_errors():
            self._loop.call(self._store.wait, keys, timeout=self._seconds(timeout))

    def check(self, keys: list[str]) -> bool:
        """Whether every key exists now."""
        with _as_torch_errors():
            return self._loop.call(self._store.check, keys)

    def delete_key(self, key: str) -> bool:
        """Delete `key`; whether it existed."""
        with _as_torch_errors():
            return self._loop.call(self._store.delete_key, key)

    def num_keys(self) -> int:
        """The number of keys in the store."""
        with _as_torch_errors():
            return self._loop.call(self._store.num_keys)

    def list_keys(self) -> list[str]:
        """The names of the keys in the store, in etcd's key order (queues are not keys)."""
        with _as_torch_errors():
            return self._loop.call(self._store.list_keys)

    # c10d's C++ side looks these two up by their C++ names.
    deleteKey = delete_key
    getNumKeys = num_keys

    def has_extended_api(self) -> bool:
        """True: `append`, `multi_get` and `multi_set` are the store's own, one transaction each.

        So a `PrefixStore` over this store calls them rather than falling back on `get`, `set`
        and `compare_set` one key at a time.
        """
        return True

    def clone(self) -> EtcdStore:
        """A new store object on the same keys, with the same timeout, for another thread.

        The clone shares this store's event-loop thread and etcd connection: that thread
        already runs the calls of any number of threads at once, each as a task of its own, and
        a store object holds nothing else but its timeout (which each clone sets on its own).
        A connection of its own would cost every clone a thread, a gRPC channel, a login and a
        lease, which nothing would release: torch clones stores (for each new process group)
        and never closes them. So a clone is usable where this store is, and only there: not
        once the connection is closed (`close()` of the facade that owns it), nor in a process
        forked from this one (create a new store there).

        torch's C++ code calls `clone` too, and keeps only the C++ half of the Python object it
        gets; so each clone is kept alive as long as the store it was cloned from.
        """
        twin = EtcdStore(self._loop, self._store, self.timeout)  # type: ignore[attr-defined]  # missing from torch's stub
        twin._clones = self._clones
        self._clones.append(twin)
        return twin

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """The values of `keys`, in one transaction, waiting for missing keys."""
        with _as_torch_errors():
            return self._loop.call(self._store.multi_get, keys, timeout=self._seconds())

    def multi_set(self, keys: list[str], values: Sequence[str | bytes]) -> None:
        """Write every key, in one transaction."""
        with _as_torch_errors():
            self._loop.call(self._store.multi_set, keys, [_as_bytes(v) for v in values])

    def append(self, key: str, value: str | bytes) -> None:
        """Append `value` to the bytes at `key` (creating it)."""
        with _as_torch_errors():
            self._loop.call(self._store.append, key, _as_bytes(value))

    def queue_push(self, key: str, value: bytes | str) -> None:
        """Add `value` at the end of the queue `key`; queues are apart from keys."""
        with _as_torch_errors():
            self._loop.call(self._store.queue_push, key, _as_bytes(value))

    def queue_pop(self, key: str, block: bool = True) -> bytes:
        """Remove and return the oldest item of the queue `key`.

        With `block`, wait up to the store's timeout for one (`DistStoreError` after it);
        without, raise `QueueEmptyError` at once if the queue is empty. Each item goes to one
        popper only, in any number of processes.
        """
        if block:
            with _as_torch_errors():
                return self._loop.call(self._store.queue_pop, key, timeout=self._seconds())
        with _as_torch_errors(timeout=dist.QueueEmptyError):
            return self._loop.call(self._store.queue_pop, key, timeout=0)

    def queue_len(self, key: str) -> int:
        """The number of items in the queue `key` (0 if there is none)."""
        with _as_torch_errors():
            return self._loop.call(self._store.queue_len, key)


def _first(params: torch_api.RendezvousParameters, *names: str) -> str | None:
    """The first of `names` set in `--rdzv-conf` (a name and its legacy aliases)."""
    for name in names:
        value = params.get(name)
        if value:
            return str(value).strip()
    return None


def _password(params: torch_api.RendezvousParameters, username: str | None) -> str | None:
    if params.get("password") is not None:
        raise ValueError(
            "Do not put the etcd password in --rdzv-conf, where every process listing shows it; "
            f"use password_file=PATH or the {PASSWORD_ENVIRONMENT_VARIABLE} environment variable."
        )
    password_file = _first(params, "password_file")
    if username is None:
        if password_file:
            raise ValueError("password_file was given without a username.")
        return None
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as error:
            raise ValueError(
                f"The etcd password file {password_file!r} cannot be read: {error.strerror}."
            ) from None
    password = os.environ.get(PASSWORD_ENVIRONMENT_VARIABLE)
    if password is None:
        raise ValueError(
            f"The etcd user {username!r} needs a password: set password_file=PATH in "
            f"--rdzv-conf, or the {PASSWORD_ENVIRONMENT_VARIABLE} environment variable."
        )
    return password


def _state_key(params: torch_api.RendezvousParameters) -> bytes | None:
    if params.get("state_key") is not None:
        raise ValueError(
            "Do not put the state key in --rdzv-conf, where every process listing shows it; "
            "use state_key_file=PATH."
        )
    path = _first(params, "state_key_file")
    if path is None:
        return None
    try:
        # Surrounding whitespace is not part of the key: `openssl rand -hex 32 > FILE` works.
        return Path(path).read_bytes().strip()
    except OSError as error:
        raise ValueError(f"The state key file {path!r} cannot be read: {error.strerror}.") from None


def _warn_unknown_conf(
    params: torch_api.RendezvousParameters, known: frozenset[str] = _KNOWN_CONF_KEYS
) -> None:
    """Log a warning naming the `--rdzv-conf` keys that nobody reads (a typo, most often).

    torch passes unknown keys along silently, so `read_timout=10` would leave the read timeout
    at its default without a word. It is a warning on the "rdzv.torch" logger, next to
    torchrun's own rendezvous messages, not an error: a key meant for another backend is
    harmless.
    """
    unknown = sorted(set(params.config) - known)
    if unknown:
        _logger.warning(
            "Unknown --rdzv-conf option%s %s, ignored. The options read are: %s.",
            "s" if len(unknown) > 1 else "",
            ", ".join(unknown),
            ", ".join(sorted(known)),
        )


def _read_timeout(params: torch_api.RendezvousParameters) -> float:
    """`read_timeout` in seconds: a positive number up to a day, such as `0.5` (default 60)."""
    return parse_read_timeout(params.get("read_timeout", 60))


def _connect_timeout(params: torch_api.RendezvousParameters) -> float:
    """`connect_timeout` in seconds: a positive number up to a day (default 5)."""
    value = params.get("connect_timeout")
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        return validate_connect_timeout(float(str(value).strip()))
    except ValueError:
        return validate_connect_timeout(str(value))  # refused, with the text in the message


def _connection_options(params: torch_api.RendezvousParameters) -> ConnectionOptions:
    """The connection parameters in torchrun's `params` (`ValueError` for bad ones)."""
    read_timeout = _read_timeout(params)
    connect_timeout = _connect_timeout(params)
    endpoints = params.endpoint.strip() or DEFAULT_ENDPOINT
    # rdzv's one rule for schemes: without a protocol option, an https:// endpoint means https,
    # and no scheme means http (torch's etcd-v2 default); an option must agree with the scheme.
    protocol = params.get("protocol")
    _, protocol = resolve_endpoints(endpoints, None if protocol is None else str(protocol).strip())
    username = _first(params, "username")
    return ConnectionOptions(
        endpoints,
        protocol=protocol,
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
        ca_cert=_first(params, "ca_cert", "cacert"),
        ssl_cert=_first(params, "ssl_cert", "cert"),
        ssl_cert_key=_first(params, "ssl_cert_key", "key"),
        username=username,
        password=_password(params, username),
    )


def _connection(params: torch_api.RendezvousParameters) -> Connection:
    """A new, unopened connection made from torchrun's `params` (`ValueError` for bad ones)."""
    return _connection_options(params).connect()


def create_backend(
    params: torch_api.RendezvousParameters,
) -> tuple[TorchEtcdBackend, EtcdStore]:
    """Create the `etcd-v3` rendezvous backend and its c10d store from torchrun's parameters.

    `params.endpoint` is `host:port`, or several separated by commas (IPv6 in brackets); an
    `https://` prefix on them means https. `--rdzv-conf` options (values arrive as strings):

    | option | default | meaning |
    |---|---|---|
    | `read_timeout` | 60 | seconds any etcd call may take, retries included (> 0, at most 86400) |
    | `connect_timeout` | 5 | seconds to wait for a first answer from any endpoint (> 0) |
    | `protocol` | the endpoints' `http://` or `https://`, else `http` | `http` or `https` |
    | `ca_cert` (alias `cacert`) | system CAs | CA certificate for https |
    | `ssl_cert` (alias `cert`) | none | client certificate for https |
    | `ssl_cert_key` (alias `key`) | none | the client certificate's key |
    | `username` | none | etcd user; its password from `password_file` or `RDZV_ETCD_PASSWORD` |
    | `password_file` | none | a file holding the password |
    | `key_prefix` | `/torch/elastic/rendezvous` | where the rendezvous state lives |
    | `store_prefix` | `/torch/elastic/store/` | where the store's keys live |
    | `ttl` | 7200 | seconds an unwritten state (and store key) lives, at least |
    | `state_key_file` | none | a file holding a secret key (16+ bytes) that signs every state |

    torch's handler reads its own options from `--rdzv-conf` too (see `create_handler`); any
    other option is logged as a warning on the "rdzv.torch" logger, which names it and lists
    the known ones.

    The backend and the store share one connection, with every pair in the process made with
    the same connection options (endpoints, protocol, `read_timeout`, TLS files, user and
    password), on the process's one event-loop thread; closing `backend.facade` releases it.
    Raises `ValueError` for bad parameters, and torch's `RendezvousConnectionError` if etcd does
    not answer within `read_timeout`.
    """
    _warn_unknown_conf(params)
    options = _connection_options(params)
    ttl = validate_ttl(params.get_as_int("ttl", DEFAULT_TTL))
    key_prefix = _first(params, "key_prefix") or DEFAULT_KEY_PREFIX
    state_key = _state_key(params)
    store_prefix = _first(params, "store_prefix") or DEFAULT_STORE_PREFIX

    def make(connection: Connection) -> tuple[AsyncEtcdBackend, AsyncEtcdStore]:
        backend = AsyncEtcdBackend(
            connection, params.run_id, key_prefix=key_prefix, ttl=ttl, state_key=state_key
        )
        return backend, AsyncEtcdStore(connection, prefix=store_prefix, ttl=ttl)

    with _as_torch_errors():
        portal, (backend, store) = open_shared(options, make)
        _prepare(portal, backend)  # the lease and the keep-alive stream, before the first CAS
    return TorchEtcdBackend(EtcdBackend._on(portal, backend)), EtcdStore(portal, store)


def create_handler(
    params: torch_api.RendezvousParameters,
) -> dynamic_rendezvous.DynamicRendezvousHandler:
    """torch's `DynamicRendezvousHandler` over the `etcd-v3` backend and store.

    torchrun finds it through the `torchrun.handlers` entry point `etcd-v3`. The handler's own
    options (`join_timeout`, `last_call_timeout`, `close_timeout`, `heartbeat_timeout`,
    `keep_alive_interval`, `keep_alive_max_attempt`) come from `--rdzv-conf` too.

    Through the entry point, torchrun also gets a refusal, as one line, of a rendezvous that is
    closed already and of a run id it made up for a job of several nodes (see
    `_create_for_torchrun`).
    """
    return _dynamic_handler(params)[0]


def _dynamic_handler(
    params: torch_api.RendezvousParameters,
) -> tuple[dynamic_rendezvous.DynamicRendezvousHandler, Callable[[], None]]:
    """torch's handler over the `etcd-v3` backend, and what releases its connection."""
    backend, store = create_backend(params)
    try:
        handler = dynamic_rendezvous.create_handler(store, backend, params)
    except BaseException:
        backend.facade.close()  # a bad option of torch's own: the connection is nobody's
        raise
    return handler, backend.facade.close


# ----------------------------------------------------------------------------- torchrun


def _generated_by_torchrun(run_id: str) -> bool:
    """Whether `run_id` is one that torchrun made up because `--rdzv-id` was empty.

    torch's launcher (`launch_agent` in `torch.distributed.launcher.api`) replaces an empty run
    id with `str(uuid.uuid4().int)`, a different one on every agent: the decimal digits of a
    random version-4 UUID, which no run id a person picks looks like.
    """
    if not (run_id.isascii() and run_id.isdigit()) or run_id != str(int(run_id)):
        return False
    value = int(run_id)
    if value >= 1 << 128:
        return False
    made_up = uuid.UUID(int=value)
    return made_up.version == 4 and made_up.variant == uuid.RFC_4122


def _refuse_generated_run_id(params: torch_api.RendezvousParameters) -> None:
    """Refuse a run id torchrun made up, when the job wants more than one node to meet."""
    if params.max_nodes > 1 and _generated_by_torchrun(params.run_id):
        nnodes = (
            str(params.max_nodes)
            if params.min_nodes == params.max_nodes
            else f"{params.min_nodes}:{params.max_nodes}"
        )
        raise ValueError(
            f"--rdzv-id is empty, so torchrun made up a random run id for this node alone "
            f"({params.run_id}): with --nnodes={nnodes}, every node would wait in a rendezvous "
            "of its own until join_timeout. Give every node of the job the same --rdzv-id, "
            "such as --rdzv-id=job-42."
        )


def _reset_hint(params: torch_api.RendezvousParameters, prefix_option: str) -> str:
    """What to do about a closed rendezvous: a new `--rdzv-id`, or the `rdzv reset` command.

    `prefix_option` is the `rdzv reset` option that takes the `key_prefix` of `--rdzv-conf`.
    """
    command = ["rdzv", "reset"]
    if params.endpoint.strip():
        command += ["--endpoints", params.endpoint.strip()]
    key_prefix = _first(params, "key_prefix")
    if key_prefix:
        command += [prefix_option, key_prefix]
    command += ["--run-id", params.run_id]
    return (
        "To run the job again, give it a new --rdzv-id, or delete this one's state first: "
        f"{shlex.join(command)}"
    )


def _closed_error(
    params: torch_api.RendezvousParameters, prefix_option: str
) -> torch_api.RendezvousClosedError:
    return torch_api.RendezvousClosedError(
        f"The rendezvous {params.run_id!r} is closed: a job with this --rdzv-id ran and ended, "
        f"and nobody can join it any more. {_reset_hint(params, prefix_option)}"
    )


def _create_for_torchrun(
    backend_name: str, params: torch_api.RendezvousParameters
) -> torch_api.RendezvousHandler:
    """The handler torchrun asked for, refused early when it cannot work, in one line.

    Refused: a run id that torchrun made up (see `_generated_by_torchrun`) for a job of more
    than one node, and a rendezvous that is closed already (a job re-run with the same
    `--rdzv-id`): torch's handler would end with a bare `RendezvousClosedError`. Any error
    (bad options, etcd unreachable, TLS) is logged as one line on the "rdzv.torch" logger,
    which torchrun shows first, and raised without the chain of rdzv's and gRPC's errors
    behind it, which repeated it.
    """
    try:
        _refuse_generated_run_id(params)
        handler: torch_api.RendezvousHandler
        if backend_name == "etcd-v3":
            handler, release = _dynamic_handler(params)
            prefix_option = "--key-prefix"
        else:
            rounds = create_rounds_handler(params)
            handler, release = rounds, rounds._release_connection
            prefix_option = "--rounds-prefix"
        try:
            closed = handler.is_closed()
        except BaseException:
            release()
            raise
        if closed:
            release()
            raise _closed_error(params, prefix_option)
        return handler
    except (ValueError, torch_api.RendezvousError) as error:
        _logger.error("torchrun --rdzv-backend=%s cannot start: %s", backend_name, error)
        raise error.with_traceback(None) from None


# torchrun's `etcd-v3-rounds` handler; last, as it builds on what this module defines.
from rdzv._torch_rounds import RoundsRendezvousHandler, create_rounds_handler  # noqa: E402
