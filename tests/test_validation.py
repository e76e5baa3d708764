"""Bad parameters are clear errors raised before anything is sent (no etcd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

import rdzv
from rdzv._etcd import Endpoint, parse_endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:2379", (Endpoint("10.0.0.1", 2379),)),
        ("etcd-a:1,etcd-b:2", (Endpoint("etcd-a", 1), Endpoint("etcd-b", 2))),
        (" host ", (Endpoint("host", 2379),)),
        ("[::1]:2380", (Endpoint("::1", 2380),)),
        ("::1", (Endpoint("::1", 2379),)),
        ("http://h:5/", (Endpoint("h", 5),)),
    ],
)
def test_endpoints_are_parsed(text: str, expected: tuple[Endpoint, ...]) -> None:
    """host:port lists, default ports, bracketed IPv6 and URL prefixes are understood."""
    assert parse_endpoints(text) == expected


def test_ipv6_endpoint_prints_in_brackets() -> None:
    """An IPv6 endpoint formats as a gRPC target with brackets."""
    assert str(Endpoint("::1", 2379)) == "[::1]:2379"


@pytest.mark.parametrize("text", ["", " , ", "h:0", "h:70000", "h:x", "[::1", "[zz]:1", "a b:1"])
def test_malformed_endpoints_raise_value_error(text: str) -> None:
    """Empty lists, bad ports and bad addresses raise ValueError naming the endpoint."""
    with pytest.raises(ValueError, match="endpoint"):
        rdzv.connect(text)


@pytest.mark.parametrize("protocol", ["ftp", "", "http2"])
def test_unknown_protocol_is_rejected(protocol: str) -> None:
    """Only http and https are protocols."""
    with pytest.raises(ValueError, match=r"^The protocol must be HTTP or HTTPS\.$"):
        rdzv.connect("h:1", protocol=protocol)


def test_protocol_is_case_insensitive() -> None:
    """HTTP and Https are accepted."""
    assert "http://" in repr(rdzv.connect("h:1", protocol="HTTP"))
    assert "https://" in repr(rdzv.connect("h:1", protocol="Https"))


@pytest.mark.parametrize("timeout", [0, -10, True, "60", float("nan"), float("inf")])
def test_non_positive_read_timeout_is_rejected(timeout: object) -> None:
    """The read timeout must be a positive number."""
    with pytest.raises(ValueError, match="read timeout must be a positive integer"):
        rdzv.connect("h:1", read_timeout=timeout)  # type: ignore[arg-type]


def test_username_without_password_is_rejected() -> None:
    """Authentication needs both a username and a password."""
    with pytest.raises(ValueError, match="both a username and a password"):
        rdzv.connect("h:1", username="root")


def test_tls_files_need_https() -> None:
    """Certificates with protocol http are a mistake, not silently ignored."""
    with pytest.raises(ValueError, match="need protocol='https'"):
        rdzv.connect("h:1", ca_cert="/ca.pem")


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    """A CA file that cannot be read is a ValueError naming the file."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=r"nope\.pem"):
        rdzv.connect("h:1", protocol="https", ca_cert=missing)


def test_password_never_appears_in_repr() -> None:
    """The connection's repr shows the user but never the password."""
    connection = rdzv.connect("h:1", username="alice", password="s3cret-pw")
    assert "alice" in repr(connection)
    assert "s3cret-pw" not in repr(connection)


@pytest.mark.parametrize("run_id", ["", "a/b", "tab\there", "x" * 257, 42])
def test_bad_run_ids_are_rejected(run_id: object) -> None:
    """Empty, slashed, control-character, overlong and non-string run ids raise ValueError."""
    connection = rdzv.connect("h:1")
    with pytest.raises(ValueError, match="run id"):
        rdzv.AsyncEtcdBackend(connection, run_id)  # type: ignore[arg-type]


def test_unicode_run_id_is_accepted() -> None:
    """A printable unicode run id names a key."""
    backend = rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job-ü-λ")
    assert backend.key == "/torch/elastic/rendezvous/job-ü-λ"


@pytest.mark.parametrize("prefix", ["no/leading/slash", "", 5])
def test_key_prefix_must_start_with_slash(prefix: object) -> None:
    """A key prefix without a leading slash raises ValueError."""
    with pytest.raises(ValueError, match="key prefix"):
        rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", key_prefix=prefix)  # type: ignore[arg-type]


def test_trailing_slash_of_key_prefix_is_dropped() -> None:
    """A key prefix with a trailing slash names the same key as one without."""
    backend = rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", key_prefix="/p/")
    assert backend.key == "/p/job"


@pytest.mark.parametrize("ttl", [0, -1, 1.5, "60", True, None])
def test_bad_ttl_is_rejected(ttl: object) -> None:
    """The TTL must be a positive whole number of seconds."""
    with pytest.raises(ValueError, match="TTL"):
        rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", ttl=ttl)  # type: ignore[arg-type]
