"""The TLS settings of an embedded etcd: `EtcdTLS`."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

__all__ = ["EtcdTLS"]


@dataclass(frozen=True)
class EtcdTLS:
    """TLS settings for the client side of a test etcd; peer traffic stays plain http.

    The server certificate must be valid for the IP address 127.0.0.1 (a subjectAltName
    `IP:127.0.0.1`), since clients connect to that address. With `client_cert_auth`, etcd's own
    JSON gateway connects to etcd with the server certificate as its client certificate, so that
    certificate also needs the `clientAuth` extended key usage (or no extended key usage at all).

    Attributes:
        cert_file: the server certificate (PEM), passed as `--cert-file`.
        key_file: the server certificate's private key (PEM), passed as `--key-file`.
        ca_file: the CA that signed the server certificate and the client certificates; used to
            verify the server when probing it, and passed as `--trusted-ca-file` only with
            `client_cert_auth` (etcd demands client certificates whenever it has that flag).
            `None` trusts the system's CAs when probing.
        client_cert_auth: require clients to present a certificate signed by `ca_file`
            (`--client-cert-auth`).
        client_cert_file: a client certificate (PEM) signed by `ca_file`, used only by this
            module to probe the server: required with `client_cert_auth`.
        client_key_file: the client certificate's private key (PEM).
    """

    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    ca_file: str | os.PathLike[str] | None = None
    client_cert_auth: bool = False
    client_cert_file: str | os.PathLike[str] | None = None
    client_key_file: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be given together")
        if self.client_cert_auth and self.ca_file is None:
            raise ValueError(
                "client_cert_auth needs ca_file, the CA that signs client certificates"
            )
        if self.client_cert_auth and self.client_cert_file is None:
            raise ValueError(
                "client_cert_auth needs client_cert_file and client_key_file, so that the server "
                "can be probed"
            )

    def server_args(self) -> list[str]:
        """The etcd command-line flags for these settings."""
        args = [
            f"--cert-file={os.fspath(self.cert_file)}",
            f"--key-file={os.fspath(self.key_file)}",
        ]
        if self.client_cert_auth and self.ca_file is not None:
            # etcd requires client certificates whenever it has a trusted CA file, whatever
            # --client-cert-auth says; so the CA is only passed when they are wanted.
            args += [f"--trusted-ca-file={os.fspath(self.ca_file)}", "--client-cert-auth"]
        return args

    def client_ssl_context(self) -> ssl.SSLContext:
        """An `ssl.SSLContext` that verifies the server and presents the client certificate."""
        cafile = None if self.ca_file is None else os.fspath(self.ca_file)
        context = ssl.create_default_context(cafile=cafile)
        if self.client_cert_file is not None and self.client_key_file is not None:
            context.load_cert_chain(
                os.fspath(self.client_cert_file), os.fspath(self.client_key_file)
            )
        return context
