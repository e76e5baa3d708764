"""etcd's JSON gateway: the v3 API over HTTP, through which an embedded etcd is probed.

The standard library speaks it, so that probing a server needs no gRPC client.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from rdzv._server._tls import EtcdTLS

__all__ = ["Gateway", "uint"]


def uint(value: Any) -> int:
    """A uint64 field of etcd's JSON gateway: a decimal string, or absent when zero."""
    if value is None:
        return 0
    return int(value)


class Gateway:
    """Posts JSON to etcd's gateway, over https with the client side of `tls`, or plain http."""

    def __init__(self, tls: EtcdTLS | None) -> None:
        # No proxies: an http_proxy in the environment must not see loopback traffic.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=tls.client_ssl_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def post(
        self, client_url: str, path: str, body: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """The JSON object that the etcd at `client_url` answers to `body` at `path`.

        Raises:
            OSError: no answer within `timeout`, an HTTP error (`HTTPError`), or an answer that
                is not HTTP or not a JSON object (`ConnectionError`).
            ValueError: the answer was not JSON.
        """
        request = urllib.request.Request(
            client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            raise
        except http.client.HTTPException as exc:
            raise ConnectionError(f"bad answer from {client_url}: {exc!r}") from exc
        result = json.loads(payload)
        if not isinstance(result, dict):
            raise ConnectionError(f"unexpected answer from {client_url}: {payload!r}")
        return result
