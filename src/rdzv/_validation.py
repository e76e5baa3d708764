"""Validation of the parameters users give rdzv: each bad value is a `ValueError` naming it."""

from __future__ import annotations

import math
from typing import Final, TypeGuard

MAX_RUN_ID_LENGTH: Final = 256

# gRPC turns a call's timeout into an absolute deadline in int64 nanoseconds since 1970, which
# overflows for timeouts beyond about 7.4e9 s (the year 2262): every attempt then fails at once,
# and a call retries without end. A day is far below that, and far beyond any wait for etcd that
# makes sense (etcd answers in milliseconds; read_timeout only bounds retries across failures).
MAX_READ_TIMEOUT: Final = 86_400
"""The longest `read_timeout`, in seconds: one day."""

ETCD_MAX_LEASE_TTL: Final = 9_000_000_000
"""The longest lease etcd grants, in seconds (`MaxLeaseTTL` in etcd's lease package)."""

# `rdzv._lease.RollingLease` grants leases of exactly `ttl` seconds; if it ever grants longer
# ones, lower this with it, so that the longest ttl still gets a lease from etcd.
MAX_TTL: Final = ETCD_MAX_LEASE_TTL
"""The longest `ttl`, in seconds: a lease of `ttl` seconds must not exceed etcd's longest."""

MAX_REVISION: Final = 2**63 - 1
"""The largest etcd revision: revisions are int64."""


def shown(value: object) -> str:
    """`repr(value)` for an error message, shortened for huge integers.

    The repr of an integer of more than 4300 digits raises `ValueError` in Python 3.11+, and
    one of a few hundred digits fills the screen.
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def validate_read_timeout(read_timeout: object) -> float:
    """Return `read_timeout` as seconds; raise `ValueError` if it is not one, up to a day."""
    if (
        isinstance(read_timeout, bool)
        or not isinstance(read_timeout, int | float)
        or not 0 < read_timeout <= MAX_READ_TIMEOUT  # false for NaN too
    ):
        raise ValueError(_read_timeout_message(read_timeout))
    return float(read_timeout)


def _read_timeout_message(read_timeout: object) -> str:
    return (
        "The read_timeout must be a positive number of seconds, at most "
        f"{MAX_READ_TIMEOUT} (one day), not {shown(read_timeout)}."
    )


def parse_read_timeout(read_timeout: object) -> float:
    """`validate_read_timeout` for a value that may be text (a configuration option).

    `"0.5"` and `"60"` are accepted like `0.5` and `60`; text that is not a number raises the
    same `ValueError` as any other bad `read_timeout`.
    """
    if isinstance(read_timeout, str):
        try:
            number = float(read_timeout.strip())
        except ValueError:
            number = math.nan  # refused below, with the text in the message
        if math.isfinite(number) and 0 < number <= MAX_READ_TIMEOUT:
            return number
        raise ValueError(_read_timeout_message(read_timeout))
    return validate_read_timeout(read_timeout)


def validate_run_id(run_id: object) -> str:
    """Return `run_id` if it can name a rendezvous; raise `ValueError` saying why not."""
    if not isinstance(run_id, str):
        raise ValueError(f"The run id must be a string, not {type(run_id).__name__}.")
    if not run_id:
        raise ValueError("The run id must not be empty.")
    if len(run_id) > MAX_RUN_ID_LENGTH:
        raise ValueError(f"The run id must be at most {MAX_RUN_ID_LENGTH} characters long.")
    if "/" in run_id or not run_id.isprintable():
        raise ValueError(
            f"The run id {run_id!r} must not contain '/' or control characters: it is one etcd "
            "key segment."
        )
    return run_id


def validate_key_prefix(key_prefix: object) -> str:
    """Return `key_prefix` without trailing slashes; raise `ValueError` if it is not absolute."""
    if not isinstance(key_prefix, str) or not key_prefix.startswith("/"):
        raise ValueError(
            f"The key prefix must be a string that starts with '/', not {key_prefix!r}."
        )
    if not key_prefix.isprintable():
        raise ValueError(f"The key prefix {key_prefix!r} must not contain control characters.")
    return key_prefix.rstrip("/")


def validate_store_prefix(prefix: object) -> str:
    """The store's key prefix, ending in `/` (`ValueError` unless a printable string from `/`)."""
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"The store prefix must be a string that starts with '/', not {prefix!r}.")
    if not prefix.isprintable():
        raise ValueError(f"The store prefix {prefix!r} must not contain control characters.")
    return prefix if prefix.endswith("/") else prefix + "/"


def validate_ttl(ttl: object) -> int:
    """Return `ttl` as whole seconds; raise `ValueError` if it is not from 1 to `MAX_TTL`."""
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not 0 < ttl <= MAX_TTL  # false for NaN too
        or (isinstance(ttl, float) and not ttl.is_integer())
    ):
        raise ValueError(
            f"The TTL (ttl) must be a positive whole number of seconds, at most {MAX_TTL} "
            f"(etcd grants no lease longer), not {shown(ttl)}."
        )
    return int(ttl)


def is_valid_token(token: object) -> TypeGuard[int]:
    """Whether `token` can be an etcd mod revision: an `int` (not a `bool`), 1 to 2**63 - 1."""
    return isinstance(token, int) and not isinstance(token, bool) and 0 < token <= MAX_REVISION


def watch_start_revision(token: object) -> int:
    """The revision a watch of the changes after `token` starts at: 0 (now) for `None`.

    Raises `ValueError` naming the token if no watch can start after it: it is not an etcd
    revision, or it is the last one (the start, `token + 1`, would not be an int64).
    """
    if token is None:
        return 0
    if is_valid_token(token) and token < MAX_REVISION:
        return token + 1
    if token == MAX_REVISION:
        raise ValueError(
            f"Cannot watch from token {token}: it is the last etcd revision, and none can follow."
        )
    raise ValueError(f"Cannot watch from token {shown(token)}: it is not an etcd revision.")
