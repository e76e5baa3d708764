"""rdzv.torch: torch's RendezvousBackend tests, create_backend's parameters, the entry point."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import (
    RendezvousInfo,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous import api as torch_api
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

import rdzv
from rdzv._etcd import parse_endpoints
from rdzv.testing import EtcdServer
from rdzv.torch import (
    _KNOWN_CONF_KEYS,
    PASSWORD_ENVIRONMENT_VARIABLE,
    EtcdStore,
    TorchEtcdBackend,
    create_backend,
    create_handler,
)
from support import RawEtcd, closed_port, present, torch_backend_of, torch_params

CONNECTION_FAILED = r"^The connection to etcd has failed: no answer within "

MakeBackend = Callable[[RendezvousParameters], tuple[TorchEtcdBackend, EtcdStore]]


# ------------------------------------------------------------------------------ helpers


def _connection(backend: TorchEtcdBackend) -> rdzv.Connection:
    """The connection that a create_backend pair shares (no public accessor exists)."""
    return backend.facade.connection


def _raw_get(raw: RawEtcd, key: str) -> tuple[bytes, int] | None:
    """The raw value at `key` and the granted TTL of its lease (0 without one), or None."""
    found = raw.get(key)
    if found is None:
        return None
    return bytes(found.value), raw.granted_ttl(found.lease) if found.lease else 0


@pytest.fixture
def make_backend() -> Iterator[MakeBackend]:
    """create_backend, with every pair it made closed at teardown."""
    made: list[TorchEtcdBackend] = []

    def make(params: RendezvousParameters) -> tuple[TorchEtcdBackend, EtcdStore]:
        backend, store = create_backend(params)
        made.append(backend)
        return backend, store

    yield make
    for backend in made:
        backend.facade.close()


@pytest.fixture
def params(etcd_endpoints: str, etcd_key_prefix: str) -> RendezvousParameters:
    """Parameters like upstream's CreateBackendTest: protocol "hTTp", read timeout "10"."""
    return torch_params(etcd_endpoints, etcd_key_prefix, protocol="hTTp", read_timeout="10")


@pytest.fixture
def backend(make_backend: MakeBackend, params: RendezvousParameters) -> TorchEtcdBackend:
    """A TorchEtcdBackend for run id "job" under this test's key prefix."""
    return make_backend(params)[0]


def _set_state(
    backend: TorchEtcdBackend, state: bytes, token: object = None
) -> tuple[bytes, object, bool]:
    result = backend.set_state(state, token)
    assert result is not None
    return result


# ------------------------------------------- torch's RendezvousBackendTestMixin, case by case


def test_get_state_returns_backend_state(backend: TorchEtcdBackend) -> None:
    """get_state returns the state that set_state wrote, with a token."""
    backend.set_state(b"x")
    result = backend.get_state()
    assert result is not None
    state, token = result
    assert state == b"x"
    assert token is not None


def test_get_state_returns_none_if_backend_state_does_not_exist(
    backend: TorchEtcdBackend,
) -> None:
    """get_state returns None when nothing was written."""
    assert backend.get_state() is None


def test_get_state_raises_error_if_backend_state_is_corrupt(
    backend: TorchEtcdBackend, raw_etcd_sync: RawEtcd
) -> None:
    """A foreign value at the state's key makes get_state raise torch's RendezvousStateError."""
    raw_etcd_sync.put(backend.facade.key, b"non_base64")
    with pytest.raises(torch_api.RendezvousStateError) as caught:
        backend.get_state()
    assert isinstance(caught.value.__cause__, rdzv.RendezvousStateError)


def test_set_state_sets_backend_state_if_it_does_not_exist(backend: TorchEtcdBackend) -> None:
    """set_state without a token creates the state."""
    state, token, has_set = _set_state(backend, b"x")
    assert state == b"x"
    assert token is not None
    assert has_set


def test_set_state_sets_backend_state_if_token_is_current(backend: TorchEtcdBackend) -> None:
    """set_state with the current token writes, and the token changes."""
    _, token1, has_set1 = _set_state(backend, b"x")
    state2, token2, has_set2 = _set_state(backend, b"y", token1)
    assert state2 == b"y"
    assert token1 != token2
    assert has_set1
    assert has_set2


def test_set_state_returns_current_backend_state_if_token_is_old(
    backend: TorchEtcdBackend,
) -> None:
    """set_state with an old token returns the current state and token, writing nothing."""
    _, token1, _ = _set_state(backend, b"x")
    state2, token2, _ = _set_state(backend, b"y", token1)
    state3, token3, has_set = _set_state(backend, b"z", token1)
    assert state2 == state3
    assert token2 == token3
    assert not has_set


def test_set_state_returns_current_backend_state_if_token_is_none(
    backend: TorchEtcdBackend,
) -> None:
    """set_state without a token on an existing state returns that state, writing nothing."""
    state1, token1, _ = _set_state(backend, b"x")
    state2, token2, has_set = _set_state(backend, b"y")
    assert state1 == state2
    assert token1 == token2
    assert not has_set


def test_set_state_returns_current_backend_state_if_token_is_invalid(
    backend: TorchEtcdBackend,
) -> None:
    """set_state with a token that is not ours returns the current state, writing nothing."""
    state1, token1, _ = _set_state(backend, b"x")
    assert _set_state(backend, b"y", token="invalid") == (state1, token1, False)


# ------------------------------------------------- torch's CreateBackendTest, for etcd-v3


def test_create_backend_returns_etcd_v3_backend_and_etcd_store(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """create_backend returns a backend named "etcd-v3" and an EtcdStore."""
    backend, store = make_backend(params)
    assert backend.name == "etcd-v3"
    assert isinstance(store, EtcdStore)


def test_create_backend_accepts_protocol_in_any_case(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """protocol "hTTp" means plain-text http, which the test etcd speaks."""
    backend, _ = make_backend(params)
    assert repr(_connection(backend)).startswith("<rdzv.Connection http://")
    assert _set_state(backend, b"dummy_state")[2]


def test_create_backend_defaults_to_http(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """Without a protocol option, the connection is plain-text http."""
    del params.config["protocol"]
    backend, _ = make_backend(params)
    assert repr(_connection(backend)).startswith("<rdzv.Connection http://")
    assert _set_state(backend, b"dummy_state")[2]


def test_create_backend_reads_the_read_timeout(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """read_timeout "10" becomes the connection's read timeout."""
    backend, _ = make_backend(params)
    assert _connection(backend).read_timeout == 10


def test_create_backend_defaults_the_read_timeout_to_60(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """Without a read_timeout option, the read timeout is 60 seconds."""
    del params.config["read_timeout"]
    backend, _ = make_backend(params)
    assert _connection(backend).read_timeout == 60


def test_backend_writes_the_state_at_key_prefix_and_run_id(
    make_backend: MakeBackend,
    params: RendezvousParameters,
    raw_etcd_sync: RawEtcd,
    etcd_key_prefix: str,
) -> None:
    """The key_prefix option decides the state's etcd key: {key_prefix}/{run_id}."""
    backend, _ = make_backend(params)
    assert backend.facade.key == f"{etcd_key_prefix}/rdzv/job"
    backend.set_state(b"dummy_state")
    raw = _raw_get(raw_etcd_sync, f"{etcd_key_prefix}/rdzv/job")
    assert raw is not None
    assert raw[0].endswith(b"dummy_state")


def test_store_writes_keys_under_store_prefix(
    make_backend: MakeBackend,
    params: RendezvousParameters,
    raw_etcd_sync: RawEtcd,
    etcd_key_prefix: str,
) -> None:
    """The store_prefix option decides where store keys live; values are stored plainly."""
    _, store = make_backend(params)
    store.set("dummy_key", "dummy_value")
    raw = _raw_get(raw_etcd_sync, f"{etcd_key_prefix}/store/dummy_key")
    assert raw is not None
    assert raw[0] == b"dummy_value"


def test_ttl_option_reaches_the_backend_and_the_store(
    make_backend: MakeBackend,
    params: RendezvousParameters,
    raw_etcd_sync: RawEtcd,
    etcd_key_prefix: str,
) -> None:
    """ttl "30" is the backend's ttl, and state and store keys get leases of exactly ttl."""
    params.config["ttl"] = "30"
    backend, store = make_backend(params)
    assert backend.facade.ttl == 30
    backend.set_state(b"dummy_state")
    store.set("dummy_key", "dummy_value")
    state = _raw_get(raw_etcd_sync, backend.facade.key)
    stored = _raw_get(raw_etcd_sync, f"{etcd_key_prefix}/store/dummy_key")
    assert state is not None
    assert stored is not None
    assert (state[1], stored[1]) == (30, 30)


def test_create_backend_defaults_the_ttl_to_7200(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """Without a ttl option, the backend's ttl is rdzv's default, 7200 s."""
    backend, _ = make_backend(params)
    assert backend.facade.ttl == 7200


def test_create_backend_raises_error_if_protocol_is_invalid(params: RendezvousParameters) -> None:
    """An unknown protocol is a ValueError with upstream's message."""
    params.config["protocol"] = "dummy"
    with pytest.raises(ValueError, match=r"^The protocol must be HTTP or HTTPS.$"):
        create_backend(params)


@pytest.mark.parametrize("read_timeout", ["0", "-10", "86401", "nan", "ten"])
def test_create_backend_raises_error_if_read_timeout_is_invalid(
    params: RendezvousParameters, read_timeout: str
) -> None:
    """A read timeout that is not a number from above 0 to a day is the library's ValueError."""
    params.config["read_timeout"] = read_timeout
    with pytest.raises(ValueError, match=r"^The read_timeout must be a positive number"):
        create_backend(params)


def test_create_backend_accepts_a_fractional_read_timeout(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """read_timeout "0.5" is half a second, as the library accepts it."""
    params.config["read_timeout"] = "0.5"
    backend, _ = make_backend(params)
    assert _connection(backend).read_timeout == 0.5


@pytest.mark.slow
def test_create_backend_raises_error_if_etcd_is_unreachable(etcd_key_prefix: str) -> None:
    """With nothing listening, create_backend raises torch's RendezvousConnectionError."""
    params = torch_params(f"127.0.0.1:{closed_port()}", etcd_key_prefix, read_timeout="2")
    started = time.monotonic()
    with pytest.raises(torch_api.RendezvousConnectionError, match=CONNECTION_FAILED):
        create_backend(params)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_get_waits_for_store_prefix_key(
    make_backend: MakeBackend, params: RendezvousParameters
) -> None:
    """store.get("MASTER_ADDR") in one thread waits for another thread to set it 2 s later."""
    backend, store = make_backend(params)
    store.set_timeout(datetime.timedelta(seconds=30))
    backend.set_state(b"dummy_state")
    getting = threading.Event()
    values: dict[str, str] = {}
    elapsed: list[float] = []

    def get() -> None:
        started = time.monotonic()
        getting.set()
        values["MASTER_ADDR"] = store.get("MASTER_ADDR").decode()
        elapsed.append(time.monotonic() - started)

    def set_later() -> None:
        getting.wait(timeout=30)
        time.sleep(2)
        store.set("MASTER_ADDR", b"foo")

    threads = [threading.Thread(target=get), threading.Thread(target=set_later)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    assert values == {"MASTER_ADDR": "foo"}
    assert elapsed[0] >= 2


# ----------------------------------------------------------------- more of create_backend


@pytest.mark.parametrize("option", ["cert", "key", "cacert", "ssl_cert", "ssl_cert_key", "ca_cert"])
def test_tls_options_are_read_and_need_https(params: RendezvousParameters, option: str) -> None:
    """Each TLS option and alias reaches the connection, which refuses it with plain http."""
    params.config[option] = "/nonexistent/file.pem"
    with pytest.raises(ValueError, match=r"need protocol='https'"):
        create_backend(params)


@pytest.mark.parametrize("option", ["cert", "key"])
def test_cert_and_key_aliases_are_the_client_certificate_pair(
    params: RendezvousParameters, option: str
) -> None:
    """With https, cert or key alone is half of a client certificate pair."""
    params.config["protocol"] = "https"
    params.config[option] = "/nonexistent/file.pem"
    with pytest.raises(ValueError, match=r"needs both ssl_cert and ssl_cert_key"):
        create_backend(params)


def test_cacert_alias_is_the_ca_certificate(params: RendezvousParameters) -> None:
    """With https, cacert names the CA certificate file, which is read."""
    params.config["protocol"] = "https"
    params.config["cacert"] = "/nonexistent/ca.pem"
    with pytest.raises(ValueError, match=r"CA certificate file '/nonexistent/ca.pem'"):
        create_backend(params)


def test_username_with_password_file_authenticates(
    params: RendezvousParameters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """username + password_file reach etcd, whose refusal names the user, not the password."""
    monkeypatch.delenv(PASSWORD_ENVIRONMENT_VARIABLE, raising=False)
    password_file = tmp_path / "password"
    password_file.write_text("s3cret-from-file\n")
    params.config["username"] = "alice"
    params.config["password_file"] = str(password_file)
    with pytest.raises(torch_api.RendezvousConnectionError) as caught:
        create_backend(params)
    assert isinstance(caught.value.__cause__, rdzv.RendezvousAuthError)
    assert "alice" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in str(caught.value.__cause__)


def test_username_with_password_environment_variable_authenticates(
    params: RendezvousParameters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """username + RDZV_ETCD_PASSWORD reach etcd, whose refusal names the user only."""
    monkeypatch.setenv(PASSWORD_ENVIRONMENT_VARIABLE, "s3cret-from-env")
    params.config["username"] = "alice"
    with pytest.raises(torch_api.RendezvousConnectionError) as caught:
        create_backend(params)
    assert isinstance(caught.value.__cause__, rdzv.RendezvousAuthError)
    assert "alice" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_password_option_is_refused(params: RendezvousParameters) -> None:
    """A password in --rdzv-conf is refused, pointing to password_file."""
    params.config["username"] = "alice"
    params.config["password"] = "s3cret"
    with pytest.raises(ValueError, match=r"password_file") as caught:
        create_backend(params)
    assert "s3cret" not in str(caught.value)


def test_username_without_password_is_refused(
    params: RendezvousParameters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A username with neither password_file nor RDZV_ETCD_PASSWORD is a ValueError."""
    monkeypatch.delenv(PASSWORD_ENVIRONMENT_VARIABLE, raising=False)
    params.config["username"] = "alice"
    with pytest.raises(ValueError, match=r"'alice' needs a password"):
        create_backend(params)


def test_password_file_without_username_is_refused(
    params: RendezvousParameters, tmp_path: Path
) -> None:
    """A password_file without a username is a ValueError."""
    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    params.config["password_file"] = str(password_file)
    with pytest.raises(ValueError, match=r"without a username"):
        create_backend(params)


def test_endpoint_list_fails_over_to_a_live_endpoint(
    make_backend: MakeBackend, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With a dead endpoint listed first, the backend works through the next one."""
    endpoints = f"127.0.0.1:{closed_port()},{etcd_endpoints}"
    backend, store = make_backend(torch_params(endpoints, etcd_key_prefix, read_timeout="10"))
    assert _set_state(backend, b"x")[2]
    store.set("key", "value")
    assert store.get("key") == b"value"


def test_ipv6_endpoint_in_brackets_parses() -> None:
    """An IPv6 endpoint in brackets parses to its address and port."""
    assert parse_endpoints("[::1]:2379,127.0.0.1:2380") == (
        rdzv.Endpoint("::1", 2379),
        rdzv.Endpoint("127.0.0.1", 2380),
    )


def test_ipv6_endpoint_in_brackets_is_accepted_by_create_backend(
    make_backend: MakeBackend, etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """create_backend takes a bracketed IPv6 endpoint in its list (here a dead one, skipped)."""
    port = closed_port()
    endpoints = f"[::1]:{port},{etcd_endpoints}"
    backend, _ = make_backend(torch_params(endpoints, etcd_key_prefix, read_timeout="10"))
    assert _connection(backend).endpoints[0] == rdzv.Endpoint("::1", port)
    assert _set_state(backend, b"x")[2]


# ---------------------------------------------------------------------- unknown options


def _conf_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "rdzv.torch" and record.levelno == logging.WARNING
    ]


def test_an_unknown_conf_key_is_logged_with_the_known_ones(
    make_backend: MakeBackend, params: RendezvousParameters, caplog: pytest.LogCaptureFixture
) -> None:
    """A misspelt option (read_timout) is named in a warning that lists rdzv's and torch's keys."""
    params.config["read_timout"] = "10"
    with caplog.at_level(logging.WARNING, logger="rdzv.torch"):
        make_backend(params)
    (message,) = _conf_warnings(caplog)
    assert "Unknown --rdzv-conf option read_timout," in message
    known = message.split("The options read are: ", 1)[1].rstrip(".").split(", ")
    assert {"read_timeout", "state_key_file", "join_timeout", "keep_alive_interval"} <= set(known)
    assert "read_timout" not in known


def test_torch_handler_options_are_known(
    make_backend: MakeBackend, params: RendezvousParameters, caplog: pytest.LogCaptureFixture
) -> None:
    """The dynamic handler's options, and the timeout torchrun always adds, warn of nothing."""
    for option in (
        "join_timeout",
        "last_call_timeout",
        "close_timeout",
        "heartbeat_timeout",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "timeout",
    ):
        params.config[option] = "30"
    with caplog.at_level(logging.WARNING, logger="rdzv.torch"):
        make_backend(params)
    assert _conf_warnings(caplog) == []


def test_known_conf_keys_include_every_rdzv_option() -> None:
    """Every option of create_backend's table is a known key, so none of them warns."""
    documented = {
        line.split("`")[1]
        for line in (create_backend.__doc__ or "").splitlines()
        if line.strip().startswith("| `")
    }
    aliases = {"cacert", "cert", "key"}
    assert documented | aliases <= _KNOWN_CONF_KEYS
    assert len(documented) == 12


# ---------------------------------------------------------------------- torch's errors


@pytest.mark.slow
def test_unreachable_etcd_raises_torch_connection_error(
    make_backend: MakeBackend, etcd_key_prefix: str
) -> None:
    """Once etcd is gone, get_state raises torch's RendezvousConnectionError, ours chained."""
    with EtcdServer(name="rdzv-stopped") as server:
        backend, _ = make_backend(torch_params(server.endpoint, etcd_key_prefix, read_timeout="2"))
        backend.set_state(b"x")
    started = time.monotonic()
    with pytest.raises(torch_api.RendezvousConnectionError, match=CONNECTION_FAILED) as caught:
        backend.get_state()
    assert isinstance(caught.value.__cause__, rdzv.RendezvousConnectionError)
    assert time.monotonic() - started < 30


# ----------------------------------------------------------------- entry point, handlers


def test_entry_point_is_registered() -> None:
    """The installed package declares the torchrun.handlers entry point etcd-v3."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="torchrun.handlers")}
    assert "etcd-v3" in names


def _close_handler(handler: torch_api.RendezvousHandler) -> None:
    handler.shutdown()
    torch_backend_of(handler).facade.close()


def test_torch_registry_creates_an_etcd_v3_handler(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """torch's handler registry creates a DynamicRendezvousHandler named etcd-v3."""
    handler = rendezvous_handler_registry.create_handler(
        torch_params(etcd_endpoints, etcd_key_prefix, read_timeout="10")
    )
    try:
        assert isinstance(handler, DynamicRendezvousHandler)
        assert handler.get_backend() == "etcd-v3"
    finally:
        _close_handler(handler)


@pytest.mark.slow
def test_three_handlers_complete_one_rendezvous(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Three handlers in threads get ranks 0, 1 and 2 of a world of 3."""
    nodes = 3
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=etcd_endpoints,
        run_id="job",
        min_nodes=nodes,
        max_nodes=nodes,
        local_addr="127.0.0.1",
        key_prefix=f"{etcd_key_prefix}/rdzv",
        store_prefix=f"{etcd_key_prefix}/store/",
        read_timeout="10",
        join_timeout="60",
        last_call_timeout="1",
        close_timeout="10",
    )
    handlers = [create_handler(params) for _ in range(nodes)]
    infos: dict[int, RendezvousInfo] = {}
    errors: list[BaseException] = []

    def join(index: int) -> None:
        try:
            infos[index] = handlers[index].next_rendezvous()
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(nodes)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads), "a handler did not finish"
        assert errors == []
        assert sorted(info.rank for info in infos.values()) == [0, 1, 2]
        assert {info.world_size for info in infos.values()} == {nodes}
    finally:
        for handler in handlers:
            _close_handler(handler)


# ------------------------------------------------------------------------------ signed states


def test_state_key_file_signs_states_and_rejects_unsigned_ones(
    make_backend: MakeBackend, etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """With state_key_file, states round-trip signed; an unsigned one is torch's state error."""
    key_file = tmp_path / "state.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    signed, _ = make_backend(
        torch_params(etcd_endpoints, etcd_key_prefix, state_key_file=str(key_file))
    )
    unsigned, _ = make_backend(torch_params(etcd_endpoints, etcd_key_prefix))
    _, token, written = present(signed.set_state(b"signed"))
    assert written
    assert signed.get_state() == (b"signed", token)
    unsigned.set_state(b"injected", token)
    with pytest.raises(torch_api.RendezvousStateError, match="not signed"):
        signed.get_state()


def test_state_key_in_the_conf_is_refused(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """A state key given on the command line is refused: it belongs in state_key_file."""
    with pytest.raises(ValueError, match="state_key_file"):
        create_backend(torch_params(etcd_endpoints, etcd_key_prefix, state_key="x" * 32))
