"""TLS: the channel credentials, and telling a TLS misconfiguration from a dead server.

gRPC gives TLS failures no status code of their own (they are UNAVAILABLE, like a dead server),
and retrying cannot fix them, so they are recognised here and raised at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Final

import anyio
import grpc
import grpc.aio

from rdzv._errors import RendezvousTLSError
from rdzv._etcd._classify import fields
from rdzv._etcd._endpoints import Endpoint

# How long the one-off "does this endpoint speak TLS?" probe may take.
PROBE_TIMEOUT: Final = 2.0


def channel_credentials(
    protocol: str,
    ca_cert: str | Path | None,
    ssl_cert: str | Path | None,
    ssl_cert_key: str | Path | None,
) -> grpc.ChannelCredentials | None:
    """gRPC's credentials for `protocol` ("http": none); `ValueError` for unusable files."""
    if protocol == "http":
        if ca_cert or ssl_cert or ssl_cert_key:
            raise ValueError("TLS files (ca_cert, ssl_cert, ssl_cert_key) need protocol='https'.")
        return None
    if (ssl_cert is None) != (ssl_cert_key is None):
        raise ValueError("A client certificate needs both ssl_cert and ssl_cert_key.")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(ca_cert, "CA certificate") if ca_cert else None,
        private_key=_read_file(ssl_cert_key, "client key") if ssl_cert_key else None,
        certificate_chain=_read_file(ssl_cert, "client certificate") if ssl_cert else None,
    )


def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        message = f"The {what} file {str(path)!r} cannot be read: {error.strerror}."
        raise ValueError(message) from None


def handshake_failure(error: grpc.aio.AioRpcError, endpoint: Endpoint) -> RendezvousTLSError | None:
    """The TLS error behind `error` on a TLS channel, if its description names one.

    gRPC's fixed descriptions ("Tls handshake failed", "Handshake read failed", and "TSI_..."
    errors of its transport security layer, such as a client certificate rejected after a TLS
    1.3 handshake) are what tell a TLS failure from a dead server.
    """
    details = (error.details() or "").lower()
    if "handshake" not in details and "tsi_" not in details:
        return None
    return RendezvousTLSError(
        f"The TLS handshake with etcd at {endpoint} failed: check ca_cert, ssl_cert and "
        f"ssl_cert_key, and that etcd serves TLS there. gRPC: {error.details()}",
        **fields(error, endpoint),
    )


def plain_client_met_tls(endpoint: Endpoint) -> RendezvousTLSError:
    """The error for a plain-text client talking to a TLS server."""
    return RendezvousTLSError(
        f"etcd at {endpoint} serves TLS, but this connection uses plain text: connect with "
        "protocol='https'.",
        endpoint=str(endpoint),
    )


async def speaks_tls(endpoint: Endpoint, timeout: float) -> bool:
    """Whether `endpoint` completes a TLS handshake (its certificate unchecked: only asking)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with anyio.fail_after(max(0.0, min(timeout, PROBE_TIMEOUT))):
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=context)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except ssl.SSLError as error:
        # A TLS alert (a server that requires a client certificate) is TLS too; a plain server
        # fails the handshake without one (WRONG_VERSION_NUMBER and the like).
        return "ALERT" in (error.reason or "")
    except (OSError, TimeoutError):
        return False
    return True
