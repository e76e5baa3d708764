"""The etcd that `demo` and `serve` start."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rdzv._server import EtcdServer

EMBEDDED_COMPACTION_RETENTION = 100_000
"""Revisions of history that the etcd of `demo` and `serve` keeps: it compacts older ones every
five minutes, so that its memory stays bounded however many rendezvous run on it."""


def embedded_etcd(name: str, **options: Any) -> EtcdServer:
    """The etcd that `demo` and `serve` start: an `EtcdServer` that compacts its history."""
    from rdzv._server import EtcdServer

    return EtcdServer(name=name, auto_compaction_retention=EMBEDDED_COMPACTION_RETENTION, **options)
