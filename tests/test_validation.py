"""Bad parameters are clear errors raised before anything is sent.

Most tests need no etcd; those that take `etcd_endpoints` or `backend` check against a real etcd
that a limit holds there (the longest ttl gets a lease) or that an input means what it says.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import api as torch_api

import rdzv
from rdzv._etcd import Endpoint, parse_endpoints
from rdzv._validation import (
    MAX_READ_TIMEOUT,
    MAX_REVISION,
    MAX_TTL,
    parse_read_timeout,
    validate_read_timeout,
)
from rdzv.torch import create_backend
from support import run_cli, torch_params

pytestmark = pytest.mark.anyio

# Integers whose repr is long, or (over 4300 digits) raises ValueError itself: ids by hand.
HUGE = pytest.param(10**400, id="10**400")
HUGER = pytest.param(10**5000, id="10**5000")


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


@pytest.mark.parametrize(
    "text",
    [
        "",
        " , ",
        "h:0",
        "h:70000",
        "h:x",
        "[::1",
        "[zz]:1",
        "a b:1",
        "h:²",
        "h:٣",
        pytest.param("h:" + "9" * 5000, id="h:99...9"),
        "grpc://h:1",
    ],
)
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
    """The read timeout must be a positive number of seconds."""
    with pytest.raises(ValueError, match="read_timeout must be a positive number of seconds"):
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


# --------------------------------------------------------------------------------- read_timeout


@pytest.mark.parametrize("timeout", [MAX_READ_TIMEOUT + 0.001, 7.5e9, 8e9, 10**10, HUGE, HUGER])
def test_read_timeout_beyond_a_day_is_rejected(timeout: object) -> None:
    """A read timeout over a day (which gRPC's deadline cannot hold near 7.4e9 s) is refused."""
    with pytest.raises(ValueError, match=r"read_timeout .* at most 86400 \(one day\)"):
        rdzv.connect("h:1", read_timeout=timeout)  # type: ignore[arg-type]


def test_read_timeout_beyond_a_day_is_rejected_by_the_facade() -> None:
    """EtcdBackend refuses a read timeout over a day before it starts a thread."""
    with pytest.raises(ValueError, match="read_timeout"):
        # The bad key prefix, checked later but before any connection, turns a regression into
        # a failure instead of the endless retries of a read timeout beyond gRPC's deadline.
        rdzv.EtcdBackend("h:1", "job", read_timeout=10**10, key_prefix="relative")


PREFIX = "/rdzv-test/validation"  # torchrun's key and store prefixes go under it; nothing connects


def test_read_timeout_beyond_a_day_is_rejected_by_torch() -> None:
    """rdzv.torch's read_timeout option over a day is a ValueError naming read_timeout."""
    # The bad ttl, checked later but before any connection, turns a regression into a failure
    # instead of the endless retries of a read timeout beyond gRPC's deadline.
    params = torch_params("h:1", PREFIX, read_timeout="10000000000", ttl="0")
    with pytest.raises(ValueError, match=r"read_timeout .* at most 86400"):
        create_backend(params)


async def test_longest_read_timeout_opens_a_connection(etcd_endpoints: str) -> None:
    """A read timeout of exactly one day still lets a connection open and read at once."""
    started = time.monotonic()
    async with rdzv.connect(etcd_endpoints, read_timeout=MAX_READ_TIMEOUT) as connection:
        assert connection.read_timeout == MAX_READ_TIMEOUT
        await connection.status()
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------------------------ ttl

TOO_LONG_TTLS = [MAX_TTL + 1, 10**10, 2**62, 2**64, 1e300, HUGER]


@pytest.mark.parametrize("ttl", TOO_LONG_TTLS)
def test_ttl_beyond_etcds_longest_lease_is_rejected_by_the_backend(ttl: object) -> None:
    """AsyncEtcdBackend refuses a ttl whose leases etcd would not grant, naming ttl."""
    with pytest.raises(ValueError, match=r"TTL \(ttl\) .* at most 9000000000"):
        rdzv.AsyncEtcdBackend(rdzv.connect("h:1"), "job", ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", TOO_LONG_TTLS)
def test_ttl_beyond_etcds_longest_lease_is_rejected_by_the_store(ttl: object) -> None:
    """AsyncEtcdStore refuses a ttl whose leases etcd would not grant, naming ttl."""
    with pytest.raises(ValueError, match=r"TTL \(ttl\)"):
        rdzv.AsyncEtcdStore(rdzv.connect("h:1"), ttl=ttl)  # type: ignore[arg-type]


def test_ttl_beyond_etcds_longest_lease_is_rejected_by_the_facade() -> None:
    """EtcdBackend refuses a ttl whose leases etcd would not grant, before it connects."""
    with pytest.raises(ValueError, match=r"TTL \(ttl\)"):
        rdzv.EtcdBackend("h:1", "job", ttl=10**10, read_timeout=1)


def test_ttl_beyond_etcds_longest_lease_is_rejected_by_torch() -> None:
    """rdzv.torch's ttl option beyond etcd's longest lease is a ValueError naming ttl."""
    with pytest.raises(ValueError, match=r"TTL \(ttl\)"):
        create_backend(torch_params("h:1", PREFIX, ttl=str(2**62), read_timeout="1"))


async def test_longest_ttl_gets_a_lease_from_etcd(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """With the longest ttl, etcd grants the backend's and the store's leases: writes land."""
    backend = rdzv.AsyncEtcdBackend(connection, "job", key_prefix=etcd_key_prefix, ttl=MAX_TTL)
    result = await backend.set_state(b"long-lived")
    assert result is not None
    assert result[2]
    store = rdzv.AsyncEtcdStore(connection, prefix=f"{etcd_key_prefix}/store/", ttl=MAX_TTL)
    await store.set("k", b"v")
    assert await store.get("k", timeout=5) == b"v"


# --------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("token", [MAX_REVISION + 1, 2**64, HUGE])
async def test_token_beyond_int64_is_an_invalid_token(
    backend: rdzv.AsyncEtcdBackend, token: int
) -> None:
    """A token above 2**63 - 1 never writes: it returns the current state, or None."""
    assert await backend.set_state(b"x", token) is None
    current = await _write(backend, b"first")
    assert await backend.set_state(b"second", token) == (b"first", current, False)
    assert await backend.get_state() == (b"first", current)


async def test_largest_revision_is_a_valid_but_stale_token(backend: rdzv.AsyncEtcdBackend) -> None:
    """The token 2**63 - 1 is a revision etcd has not reached: a stale token, nothing written."""
    current = await _write(backend, b"first")
    assert await backend.set_state(b"second", MAX_REVISION) == (b"first", current, False)


async def test_watch_from_the_last_revision_names_the_token(
    backend: rdzv.AsyncEtcdBackend,
) -> None:
    """No watch can start after revision 2**63 - 1: a ValueError naming that token."""
    with pytest.raises(ValueError, match=f"token {MAX_REVISION}: it is the last etcd revision"):
        async for _ in backend.watch(MAX_REVISION):
            pass


@pytest.mark.parametrize("token", [MAX_REVISION + 1, 0, True, 1.5, "7", HUGER])
async def test_watch_from_a_non_revision_names_the_token(
    backend: rdzv.AsyncEtcdBackend, token: object
) -> None:
    """A watch from a token that is no etcd revision is a ValueError naming the token."""
    with pytest.raises(ValueError, match=r"^Cannot watch from token .+: it is not an etcd"):
        async for _ in backend.watch(token):
            pass


# ------------------------------------------------------------------------------------ endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2379,127.0.0.1:2379", (Endpoint("127.0.0.1", 2379),)),
        ("h,h:2379", (Endpoint("h", 2379),)),
        ("b:1,a:1,B:1,A:1", (Endpoint("b", 1), Endpoint("a", 1))),
        ("[::1]:1,[0:0::1]:1,[::1]:2", (Endpoint("::1", 1), Endpoint("::1", 2))),
        ("https://h:1,h:1", (Endpoint("h", 1),)),
    ],
)
def test_repeated_endpoints_are_kept_once_in_first_order(
    text: str, expected: tuple[Endpoint, ...]
) -> None:
    """An endpoint listed twice (any host case or address spelling) is kept where it first is."""
    assert parse_endpoints(text) == expected
    assert rdzv.connect(text).endpoints == expected


def test_sequence_of_endpoints_drops_repeats() -> None:
    """A sequence of endpoints drops repeats as a comma-separated string does."""
    assert parse_endpoints(["h:1", "H:1", "g:1"]) == (Endpoint("h", 1), Endpoint("g", 1))


# ------------------------------------------------------------------------------ https:// scheme


@pytest.mark.parametrize(
    ("endpoints", "protocol"),
    [
        ("https://h:1", "https"),
        ("HTTPS://h:1,h:2", "https"),
        ("http://h:1,http://h:2", "http"),
        ("h:1", "http"),
    ],
)
def test_scheme_sets_the_protocol_when_none_is_given(endpoints: str, protocol: str) -> None:
    """Without a protocol, the endpoints' scheme decides; without a scheme, http."""
    assert repr(rdzv.connect(endpoints)).startswith(f"<rdzv.Connection {protocol}://")


@pytest.mark.parametrize("protocol", ["https", "HTTPS"])
def test_protocol_agreeing_with_the_scheme_is_accepted(protocol: str) -> None:
    """An explicit protocol that agrees with the scheme is accepted, in any case."""
    assert "https://" in repr(rdzv.connect("https://h:1", protocol=protocol))


@pytest.mark.parametrize(
    ("endpoints", "protocol", "scheme"),
    [("https://h:1", "http", "https"), ("http://h:1,h:2", "HTTPS", "http")],
)
def test_protocol_contradicting_the_scheme_is_rejected(
    endpoints: str, protocol: str, scheme: str
) -> None:
    """A protocol that contradicts the endpoints' scheme is a ValueError naming both."""
    with pytest.raises(ValueError, match=f"protocol='{protocol}' contradicts the {scheme}://"):
        rdzv.connect(endpoints, protocol=protocol)


@pytest.mark.parametrize("endpoints", ["http://a:1,https://b:1", ["https://a:1", "HTTP://b:1"]])
def test_mixed_schemes_are_rejected(endpoints: str | list[str]) -> None:
    """Endpoints whose schemes disagree are a ValueError naming them."""
    with pytest.raises(ValueError, match="mix http:// and https://"):
        rdzv.connect(endpoints)


def test_facade_rejects_a_protocol_contradicting_the_scheme() -> None:
    """EtcdBackend refuses protocol http for https:// endpoints before it connects."""
    with pytest.raises(ValueError, match="contradicts the https:// scheme"):
        rdzv.EtcdBackend("https://h:1", "job", protocol="http", read_timeout=1)


async def test_https_endpoint_speaks_tls(etcd_endpoints: str) -> None:
    """An https:// endpoint without a protocol uses TLS: against a plain-text etcd, it fails."""
    endpoints = ",".join(f"https://{item}" for item in etcd_endpoints.split(","))
    with pytest.raises(rdzv.RendezvousTLSError):
        async with rdzv.connect(endpoints, read_timeout=30):
            pass


_NO_CONNECTION_ENVIRONMENT: dict[str, str | None] = {
    name: None for name in ("RDZV_ENDPOINTS", "ETCDCTL_ENDPOINTS", "RDZV_PROTOCOL")
}
"""For `run_cli`: no connection option from the environment (the tests name their own)."""


def test_cli_rejects_mixed_schemes() -> None:
    """`rdzv inspect` with http:// and https:// endpoints is a usage error naming them."""
    outcome = run_cli(
        "inspect",
        "--endpoints",
        "http://a:1,https://b:1",
        "--run-id",
        "job",
        env=_NO_CONNECTION_ENVIRONMENT,
    )
    assert outcome.exit_code == 2
    assert "mix http:// and https://" in outcome.stderr


def test_cli_rejects_a_protocol_contradicting_the_scheme() -> None:
    """`rdzv inspect --protocol http` with https:// endpoints is a usage error naming both."""
    outcome = run_cli(
        "inspect",
        "--endpoints",
        "https://a:1",
        "--protocol",
        "http",
        "--run-id",
        "job",
        env=_NO_CONNECTION_ENVIRONMENT,
    )
    assert outcome.exit_code == 2
    assert "protocol='http' contradicts the https:// scheme" in outcome.stderr


def test_torch_rejects_a_protocol_contradicting_the_scheme() -> None:
    """rdzv.torch's protocol option must agree with the scheme of --rdzv-endpoint."""
    with pytest.raises(ValueError, match="protocol='http' contradicts the https:// scheme"):
        create_backend(torch_params("https://h:1", PREFIX, protocol="http", read_timeout="1"))


def test_torch_rejects_mixed_schemes() -> None:
    """rdzv.torch refuses --rdzv-endpoint entries whose schemes disagree."""
    with pytest.raises(ValueError, match="mix http:// and https://"):
        create_backend(torch_params("http://a:1,https://b:1", PREFIX, read_timeout="1"))


def test_torch_https_endpoint_speaks_tls(etcd_endpoints: str) -> None:
    """Under torchrun, an https:// endpoint without a protocol option uses TLS, as elsewhere."""
    endpoints = ",".join(f"https://{item}" for item in etcd_endpoints.split(","))
    with pytest.raises(torch_api.RendezvousConnectionError) as caught:
        create_backend(torch_params(endpoints, PREFIX, read_timeout="30"))
    assert isinstance(caught.value.__cause__, rdzv.RendezvousTLSError)


# -------------------------------------------------------------------------------------- helpers


async def _write(backend: rdzv.AsyncEtcdBackend, state: bytes) -> int:
    """Write the first state of `backend`'s key; return its token."""
    result = await backend.set_state(state)
    assert result is not None
    assert result[2]
    return result[1]


@pytest.mark.parametrize("bound", [0, -1, 1.5, True, "10"])
def test_bad_max_in_flight_is_rejected(bound: object) -> None:
    """A bound on requests in flight that is not a positive int is a ValueError naming it."""
    with pytest.raises(ValueError, match="max_in_flight"):
        rdzv.connect("127.0.0.1:2379", max_in_flight=bound)  # type: ignore[arg-type]


# ------------------------------------------------------------------- read_timeout as text


@pytest.mark.parametrize(("text", "seconds"), [("0.5", 0.5), ("60", 60.0), (" 2.5 ", 2.5)])
def test_read_timeout_text_is_read_as_seconds(text: str, seconds: float) -> None:
    """A read_timeout option given as text accepts what rdzv.connect accepts, fractions too."""
    assert parse_read_timeout(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1", "abc", "", "nan", "inf", "86401", "1e10"])
def test_bad_read_timeout_text_gets_the_one_message(text: str) -> None:
    """Bad text gets the same message as a bad number: one rule, one message."""
    with pytest.raises(ValueError, match="read_timeout") as from_text:
        parse_read_timeout(text)
    with pytest.raises(ValueError, match="read_timeout") as from_number:
        validate_read_timeout(0)
    assert str(from_text.value) == str(from_number.value).replace("not 0.", f"not {text!r}.")


def test_fractional_read_timeout_is_accepted() -> None:
    """A read_timeout of 0.5 s is valid: it is a positive number of seconds, not an integer."""
    assert rdzv.connect("h:1", read_timeout=0.5).read_timeout == 0.5
