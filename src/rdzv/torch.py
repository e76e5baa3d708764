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
    from torch.distributed.elastic.rendezvous import api as torch_api
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
except ImportError as error:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "rdzv.torch needs PyTorch; install it with: pip install 'rdzv[torch]'"
    ) from error

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdzv._backend import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL,
    AsyncEtcdBackend,
    SetStateResult,
)
from rdzv._etcd import Connection
from rdzv._portal import open_shared
from rdzv._store import DEFAULT_STORE_PREFIX, AsyncEtcdStore
from rdzv._sync import EtcdBackend, _prepare

# This module is the public face and the `etcd-v3` handler. What both handlers share is in
# `_torch_common`, the store in `_torch_store`, the `etcd-v3-rounds` handler in `_torch_rounds`.
from rdzv._torch_common import (
    CONNECTION_CONF_KEYS,
    PASSWORD_ENVIRONMENT_VARIABLE,
    as_torch_errors,
    conf_value,
    connection_options,
    logger,
    reset_hint,
    warn_unknown_conf,
)
from rdzv._torch_rounds import RoundsRendezvousHandler, create_rounds_handler
from rdzv._torch_store import EtcdStore
from rdzv._validation import validate_ttl

__all__ = [
    "PASSWORD_ENVIRONMENT_VARIABLE",
    "EtcdStore",
    "RoundsRendezvousHandler",
    "TorchEtcdBackend",
    "create_backend",
    "create_handler",
    "create_rounds_handler",
]

# The `--rdzv-conf` keys that `create_backend` reads besides the connection's (`state_key` only
# to refuse it, with a message that says where it belongs).
_BACKEND_CONF_KEYS: frozenset[str] = frozenset(
    {
        "key_prefix",
        "state_key",
        "state_key_file",
        "store_prefix",
        "ttl",
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

# Every `--rdzv-conf` key that `create_handler` reads.
_KNOWN_CONF_KEYS: frozenset[str] = CONNECTION_CONF_KEYS | _BACKEND_CONF_KEYS | _TORCH_CONF_KEYS


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
        with as_torch_errors():
            return self._facade.get_state()

    def set_state(self, state: bytes, token: Any | None = None) -> SetStateResult | None:
        """See `rdzv.AsyncEtcdBackend.set_state`; raises torch's error classes."""
        with as_torch_errors():
            return self._facade.set_state(state, token)


def _state_key(params: torch_api.RendezvousParameters) -> bytes | None:
    if params.get("state_key") is not None:
        raise ValueError(
            "Do not put the state key in --rdzv-conf, where every process listing shows it; "
            "use state_key_file=PATH."
        )
    path = conf_value(params, "state_key_file")
    if path is None:
        return None
    try:
        # Surrounding whitespace is not part of the key: `openssl rand -hex 32 > FILE` works.
        return Path(path).read_bytes().strip()
    except OSError as error:
        raise ValueError(f"The state key file {path!r} cannot be read: {error.strerror}.") from None


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
    warn_unknown_conf(params, _KNOWN_CONF_KEYS)
    options = connection_options(params)
    ttl = validate_ttl(params.get_as_int("ttl", DEFAULT_TTL))
    key_prefix = conf_value(params, "key_prefix") or DEFAULT_KEY_PREFIX
    state_key = _state_key(params)
    store_prefix = conf_value(params, "store_prefix") or DEFAULT_STORE_PREFIX

    def make(connection: Connection) -> tuple[AsyncEtcdBackend, AsyncEtcdStore]:
        backend = AsyncEtcdBackend(
            connection, params.run_id, key_prefix=key_prefix, ttl=ttl, state_key=state_key
        )
        return backend, AsyncEtcdStore(connection, prefix=store_prefix, ttl=ttl)

    with as_torch_errors():
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


def _closed_error(
    params: torch_api.RendezvousParameters, prefix_option: str
) -> torch_api.RendezvousClosedError:
    return torch_api.RendezvousClosedError(
        f"The rendezvous {params.run_id!r} is closed: a job with this --rdzv-id ran and ended, "
        f"and nobody can join it any more. {reset_hint(params, prefix_option)}"
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
        logger.error("torchrun --rdzv-backend=%s cannot start: %s", backend_name, error)
        raise error.with_traceback(None) from None
