"""Validation of the parameters users give rdzv: each bad value is a `ValueError` naming it."""

from __future__ import annotations

from typing import Final

MAX_RUN_ID_LENGTH: Final = 256


def validate_read_timeout(read_timeout: object) -> float:
    """Return `read_timeout` as seconds, or raise `ValueError` if it is not a positive number."""
    if isinstance(read_timeout, bool) or not isinstance(read_timeout, int | float):
        raise ValueError("The read timeout must be a positive integer.")
    if not read_timeout > 0 or read_timeout == float("inf"):
        raise ValueError("The read timeout must be a positive integer.")
    return float(read_timeout)


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


def validate_ttl(ttl: object) -> int:
    """Return `ttl` as whole seconds; raise `ValueError` if it is not a positive integer."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ValueError(f"The TTL must be a positive whole number of seconds, not {ttl!r}.")
    if isinstance(ttl, float) and not ttl.is_integer():
        raise ValueError(f"The TTL must be a positive whole number of seconds, not {ttl!r}.")
    return int(ttl)


def is_valid_token(token: object) -> bool:
    """Whether `token` can be an etcd mod revision (a positive `int`, not a `bool`)."""
    return isinstance(token, int) and not isinstance(token, bool) and token > 0
