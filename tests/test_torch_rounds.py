"""The `etcd-v3-rounds` torchrun handler, through torch's `RendezvousHandler` interface."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import api as torch_api
from torch.distributed.elastic.rendezvous.api import rendezvous_handler_registry

import rdzv
from rdzv._torch_rounds import RoundsRendezvousHandler, create_rounds_handler, round_store_prefix
from support import RawEtcd, present, torch_params

# torchrun's parameters for run id "job" under the test's prefix: two nodes, short timeouts.
_params = functools.partial(
    torch_params,
    backend="etcd-v3-rounds",
    nodes="2",
    local_addr="127.0.0.1",
    last_call_timeout=1,
    join_timeout=30,
    keep_alive_interval=1,
    keep_alive_max_attempt=2,
)


# Run in a new process: create the handler (no local_addr: the node's host name is looked up),
# then its first next_rendezvous, and print the modules that the join imported.
_FIRST_JOIN = textwrap.dedent(
    """
    import json, sys

    from torch.distributed.elastic.rendezvous import RendezvousParameters

    import rdzv.torch

    endpoint, prefix = sys.argv[1:]
    params = RendezvousParameters(
        "etcd-v3-rounds", endpoint, "job", 1, 1, key_prefix=prefix + "/rdzv",
        store_prefix=prefix + "/store/", read_timeout="10",
    )
    handler = rdzv.torch.create_rounds_handler(params)
    before = set(sys.modules)
    info = handler.next_rendezvous()
    imported = sorted(set(sys.modules) - before)
    handler.shutdown()
    print(json.dumps([info.rank, info.world_size, imported]))
    """
)


@contextlib.contextmanager
def _handlers(params: RendezvousParameters, count: int) -> Iterator[list[RoundsRendezvousHandler]]:
    handlers = [create_rounds_handler(params) for _ in range(count)]
    try:
        yield handlers
    finally:
        for handler in handlers:
            handler.shutdown()


def _next_rendezvous(handlers: list[RoundsRendezvousHandler]) -> list[torch_api.RendezvousInfo]:
    with concurrent.futures.ThreadPoolExecutor(len(handlers)) as pool:
        calls = [pool.submit(handler.next_rendezvous) for handler in handlers]
        return [call.result(timeout=60) for call in calls]


def test_torch_finds_the_handler_by_its_backend_name(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """torch's registry creates this handler for `--rdzv-backend=etcd-v3-rounds`."""
    handler = rendezvous_handler_registry.create_handler(_params(etcd_endpoints, etcd_key_prefix))
    try:
        assert isinstance(handler, RoundsRendezvousHandler)
        assert handler.get_backend() == "etcd-v3-rounds"
        assert handler.get_run_id() == "job"
        assert handler.use_agent_store is False
    finally:
        handler.shutdown()


def test_two_nodes_get_ranks_a_world_and_one_master_address(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Both nodes get distinct ranks of a world of two, and the same MASTER_ADDR and port."""
    with _handlers(_params(etcd_endpoints, etcd_key_prefix), 2) as handlers:
        infos = _next_rendezvous(handlers)
    assert sorted(info.rank for info in infos) == [0, 1]
    assert {info.world_size for info in infos} == {2}
    stores = [info.bootstrap_store_info for info in infos]
    addresses = {(store.master_addr, store.master_port) for store in stores if store is not None}
    assert len(addresses) == 1
    assert next(iter(addresses))[0] == "127.0.0.1"


@pytest.mark.slow
def test_the_first_join_of_a_new_process_imports_nothing(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """Creation loads what a join uses (anyio's asyncio backend, the idna codec), not the join."""
    run = subprocess.run(
        [sys.executable, "-c", _FIRST_JOIN, etcd_endpoints, etcd_key_prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    rank, world_size, imported = json.loads(run.stdout.splitlines()[-1])
    assert (rank, world_size) == (0, 1)
    assert imported == []


def test_the_round_store_is_shared_by_the_round(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """What one member sets in the store of its round, the other member reads."""
    with _handlers(_params(etcd_endpoints, etcd_key_prefix), 2) as handlers:
        first, second = _next_rendezvous(handlers)
        first.store.set("greeting", "hello")
        assert second.store.get("greeting") == b"hello"


def test_keys_of_a_round_do_not_reach_the_next_and_are_deleted(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: Any
) -> None:
    """A key of round 1's store is absent from round 2's, and round 2's rank 0 deletes it."""
    with _handlers(_params(etcd_endpoints, etcd_key_prefix), 2) as handlers:
        first_round = _next_rendezvous(handlers)
        first_round[0].store.set("left-over", "1")
        second_round = _next_rendezvous(handlers)
        assert not second_round[0].store.check(["left-over"])
        old = round_store_prefix(f"{etcd_key_prefix}/store/", "job", 1)
        assert raw_etcd_sync.under(old) == []
        assert handlers[0].membership is not None
        assert handlers[0].membership.round == 2


def test_a_node_waiting_for_the_next_round_is_counted(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With a round of two running, a third node's join shows as one node waiting."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="1:2", last_call_timeout=30)
    with _handlers(params, 3) as handlers:
        _next_rendezvous(handlers[:2])
        assert handlers[0].num_nodes_waiting() == 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            late = pool.submit(handlers[2].next_rendezvous)
            deadline = time.monotonic() + 30
            while handlers[0].num_nodes_waiting() == 0:
                assert time.monotonic() < deadline, "the late node was never counted"
                time.sleep(0.5)
            handlers[2].set_closed()  # end the late node's wait
            with pytest.raises(torch_api.RendezvousClosedError):
                late.result(timeout=30)


def test_set_closed_ends_every_wait_with_torchs_closed_error(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """A node waiting for a round that cannot complete gets torch's RendezvousClosedError."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="3")
    with _handlers(params, 2) as (waiting, closer):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            wait = pool.submit(waiting.next_rendezvous)
            time.sleep(0.5)
            closer.set_closed()
            with pytest.raises(torch_api.RendezvousClosedError):
                wait.result(timeout=30)
        assert waiting.is_closed()
        with pytest.raises(torch_api.RendezvousClosedError):
            closer.next_rendezvous()


def test_a_round_that_never_completes_times_out_as_torchs_error(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """join_timeout bounds next_rendezvous; the error is torch's RendezvousTimeoutError."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="2", join_timeout=1)
    with _handlers(params, 1) as (alone,):
        started = time.monotonic()
        with pytest.raises(torch_api.RendezvousTimeoutError):
            alone.next_rendezvous()
        assert time.monotonic() - started < 15


def test_shutdown_closes_the_rendezvous_and_can_be_called_twice(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """shutdown() closes the rendezvous for everybody, like torch's handler, and returns True."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="1")
    handler = create_rounds_handler(params)
    handler.next_rendezvous()
    assert handler.shutdown() is True
    assert handler.shutdown() is True
    with rdzv.Rendezvous(
        etcd_endpoints, "job", min_nodes=1, max_nodes=1, key_prefix=f"{etcd_key_prefix}/rdzv"
    ) as observer:
        assert observer.is_closed()


def test_a_dead_nodes_key_goes_with_its_keep_alive_settings(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: Any
) -> None:
    """The member key's lease has keep_alive_interval * keep_alive_max_attempt seconds."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="1", keep_alive_interval=2)
    with _handlers(params, 1) as (handler,):
        handler.next_rendezvous()
        [member] = raw_etcd_sync.under(f"{etcd_key_prefix}/rdzv/job/round/1/m/")
        assert raw_etcd_sync.granted_ttl(member.lease) == 4


def test_members_publish_their_address_and_pid(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Each member's node info says where it runs: local_addr and its process id."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="1")
    with _handlers(params, 1) as (handler,):
        handler.next_rendezvous()
        membership = present(handler.membership)
        [member] = handler._loop.call(handler._rendezvous.read_members, membership)
        info = json.loads(member.info)
        assert info["addr"] == "127.0.0.1"
        assert isinstance(info["pid"], int)


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"join_timeout": "0"}, "join_timeout must be a positive number of seconds"),
        ({"last_call_timeout": "soon"}, "last_call_timeout must be a positive number"),
        ({"keep_alive_interval": "-1"}, "keep_alive_interval must be a positive number"),
        ({"key_prefix": "no-slash"}, "key prefix must be a string that starts with"),
        ({"store_prefix": "no-slash"}, "store prefix must be a string that starts with"),
        ({"keep_alive_max_attempt": "2.5"}, "keep_alive_max_attempt must be a positive whole"),
    ],
)
def test_bad_options_are_value_errors(
    etcd_endpoints: str, etcd_key_prefix: str, conf: dict[str, str], message: str
) -> None:
    """A bad --rdzv-conf value is a ValueError naming the option, before anything connects."""
    with pytest.raises(ValueError, match=message):
        create_rounds_handler(_params(etcd_endpoints, etcd_key_prefix, **conf))


def test_bad_node_counts_are_value_errors(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """--nnodes beyond what the rendezvous serves is a ValueError naming max_nodes."""
    with pytest.raises(ValueError, match="max_nodes"):
        create_rounds_handler(_params(etcd_endpoints, etcd_key_prefix, nodes="1:200000"))


def test_unknown_options_are_logged_with_the_known_ones(
    etcd_endpoints: str, etcd_key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A misspelt option is named in a warning that lists this handler's options."""
    caplog.set_level(logging.WARNING, logger="rdzv.torch")
    params = _params(etcd_endpoints, etcd_key_prefix, join_timout="10")
    handler = create_rounds_handler(params)
    handler.shutdown()
    [record] = [r for r in caplog.records if "join_timout" in r.getMessage()]
    assert "keep_alive_max_attempt" in record.getMessage()
    assert "state_key_file" not in record.getMessage()


def test_a_node_of_the_largest_job_joins_with_its_address_and_pid(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """With --nnodes=1:131072 a member still publishes its address and pid: no value caps it."""
    params = _params(etcd_endpoints, etcd_key_prefix, nodes="1:131072", last_call_timeout=0.5)
    params.local_addr = "node-0042.rack-17.datacenter-west.example.internal"
    with _handlers(params, 1) as (handler,):
        handler.next_rendezvous()
        membership = present(handler.membership)
        [member] = handler._loop.call(handler._rendezvous.read_members, membership)
        assert json.loads(member.info) == {"addr": params.local_addr, "pid": os.getpid()}


def test_a_store_prefix_without_a_final_slash_is_a_folder_all_the_same(
    etcd_endpoints: str, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """store_prefix=/p keeps the rounds' stores under /p/{run id}/, as /p/ would."""
    params = _params(
        etcd_endpoints, etcd_key_prefix, nodes="1", store_prefix=f"{etcd_key_prefix}/s"
    )
    with _handlers(params, 1) as (handler,):
        handler.next_rendezvous().store.set("k", "v")
    assert raw_etcd_sync.under(f"{etcd_key_prefix}/s/job/round-0000000001/k") != []
