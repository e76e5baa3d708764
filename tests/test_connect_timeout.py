"""connect_timeout: a connection that never reached etcd fails in seconds, naming every endpoint.

An established connection still rides out an outage within its read timeout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import api as torch_api

import rdzv
from rdzv._torch_rounds import create_rounds_handler
from rdzv.testing import FaultProxy
from rdzv.torch import create_backend
from support import closed_port, torch_params

pytestmark = pytest.mark.anyio

# Far beyond any connect timeout used here: a test that waits this long has hung.
HUNG = 30.0

# What each torchrun backend makes of its parameters: where the connection options are read.
CREATE: dict[str, Callable[[RendezvousParameters], object]] = {
    "etcd-v3": create_backend,
    "etcd-v3-rounds": create_rounds_handler,
}


@pytest.mark.slow
async def test_refused_endpoint_fails_within_the_default_connect_timeout() -> None:
    """With read_timeout=60, a refused endpoint fails in seconds, not after the read timeout."""
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError, match=r"\(connect_timeout\)"):
        async with rdzv.connect(f"127.0.0.1:{closed_port()}", read_timeout=60):
            pass
    assert time.monotonic() - started < HUNG


@pytest.mark.slow
async def test_connect_error_names_each_endpoint_and_why() -> None:
    """The error lists every endpoint with the reason it did not answer, and the fix."""
    endpoints = (f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}")
    with pytest.raises(rdzv.RendezvousConnectionError) as caught:
        async with rdzv.connect(",".join(endpoints), read_timeout=60, connect_timeout=1):
            pass
    message = str(caught.value)
    assert all(f"{endpoint}: UNAVAILABLE: " in message for endpoint in endpoints), message
    assert message.endswith("or raise connect_timeout."), message
    assert caught.value.endpoints == endpoints
    assert caught.value.waited is not None


@pytest.mark.slow
async def test_a_silent_first_endpoint_leaves_time_to_try_the_next(proxy: FaultProxy) -> None:
    """An endpoint that accepts but never answers does not take the whole connect timeout."""
    proxy.hold()
    dead = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError) as caught:
        async with rdzv.connect(f"{proxy.endpoint},{dead}", read_timeout=60, connect_timeout=8):
            pass
    assert time.monotonic() - started < HUNG
    message = str(caught.value)
    assert f" {proxy.endpoint}: " in message, message
    assert f" {dead}: UNAVAILABLE: " in message, message
    assert "not tried" not in message, message


@pytest.mark.slow
async def test_an_established_connection_outlasts_the_connect_timeout(
    proxy: FaultProxy, etcd_key_prefix: str
) -> None:
    """Once etcd has answered, a call rides out a silence longer than connect_timeout."""
    key = f"{etcd_key_prefix}/k".encode()
    async with rdzv.connect(proxy.endpoint, read_timeout=30, connect_timeout=1) as connection:
        await connection.put(key, b"v")
        proxy.hold()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_release_after, proxy, 3.0)
            found = await connection.get(key)
    assert found is not None
    assert found.value == b"v"


async def _release_after(proxy: FaultProxy, seconds: float) -> None:
    await anyio.sleep(seconds)
    await anyio.to_thread.run_sync(proxy.release)


async def test_connect_timeout_longer_than_read_timeout_is_bounded_by_it() -> None:
    """A connect_timeout above read_timeout waits read_timeout, as before."""
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError, match="raise read_timeout"):
        async with rdzv.connect(f"127.0.0.1:{closed_port()}", read_timeout=1, connect_timeout=20):
            pass
    assert time.monotonic() - started < HUNG


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, True, "5", None, 86_401])
def test_bad_connect_timeout_is_a_value_error_naming_it(timeout: object) -> None:
    """connect_timeout must be a positive number of seconds, at most a day."""
    with pytest.raises(ValueError, match="connect_timeout must be a positive number of seconds"):
        rdzv.connect("h:1", connect_timeout=timeout)  # type: ignore[arg-type]


def test_connect_timeout_is_kept() -> None:
    """The connection reports its connect_timeout, 5 s by default."""
    assert rdzv.connect("h:1").connect_timeout == 5.0
    assert rdzv.connect("h:1", connect_timeout=0.5).connect_timeout == 0.5


@pytest.mark.parametrize("backend", ["etcd-v3", "etcd-v3-rounds"])
def test_torch_conf_connect_timeout_bounds_the_first_connection(
    etcd_key_prefix: str, backend: str
) -> None:
    """--rdzv-conf connect_timeout=1 fails a refused endpoint in time, under both handlers."""
    params = torch_params(
        f"127.0.0.1:{closed_port()}",
        etcd_key_prefix,
        backend=backend,
        read_timeout="60",
        connect_timeout="1",
    )
    started = time.monotonic()
    with pytest.raises(torch_api.RendezvousConnectionError, match=r"within 1\.\d s \(connect_"):
        CREATE[backend](params)
    assert time.monotonic() - started < HUNG


@pytest.mark.parametrize("text", ["abc", "0", "-2", "nan", "inf", "1e9", ""])
@pytest.mark.parametrize("backend", ["etcd-v3", "etcd-v3-rounds"])
def test_bad_torch_conf_connect_timeout_is_a_value_error_naming_it(
    etcd_key_prefix: str, backend: str, text: str
) -> None:
    """A bad connect_timeout in --rdzv-conf is a ValueError naming it, under both handlers."""
    params = torch_params("h:1", etcd_key_prefix, backend=backend, connect_timeout=text)
    with pytest.raises(ValueError, match="connect_timeout must be a positive number"):
        CREATE[backend](params)
