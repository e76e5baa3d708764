"""rdzv.torch.EtcdStore: every c10d Store method, from Python and through C++ (PrefixStore)."""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist

# torch.distributed re-exports these only when built with distributed support, which type
# checkers cannot see; this is where they are defined.
from torch._C._distributed_c10d import PrefixStore, Store

from rdzv.torch import EtcdStore

SCRIPTS = Path(__file__).parent / "torchrun_scripts"


def _later(delay: float, action: Callable[..., object], *args: object) -> threading.Timer:
    timer = threading.Timer(delay, action, args)
    timer.start()
    return timer


# ------------------------------------------------------------------------------ set and get


def test_set_then_get_returns_str_value_as_bytes(torch_store: Store) -> None:
    """A str value set comes back as its UTF-8 bytes."""
    torch_store.set("key", "välue")
    assert torch_store.get("key") == "välue".encode()


def test_set_then_get_returns_bytes_value_unchanged(torch_store: Store) -> None:
    """A bytes value, including NUL and non-UTF-8 bytes, comes back unchanged."""
    torch_store.set("key", b"\x00\xff\x01binary")  # type: ignore[arg-type]  # torch's stub says str
    assert torch_store.get("key") == b"\x00\xff\x01binary"


def test_set_replaces_the_value(torch_store: Store) -> None:
    """A second set of a key replaces its value."""
    torch_store.set("key", "first")
    torch_store.set("key", "second")
    assert torch_store.get("key") == b"second"


def test_get_blocks_until_another_thread_sets(torch_store: Store) -> None:
    """get waits for a key that another thread sets later, then returns its value."""
    started = time.monotonic()
    setter = _later(0.5, torch_store.set, "late", b"value")
    try:
        assert torch_store.get("late") == b"value"
    finally:
        setter.join(timeout=30)
    assert time.monotonic() - started >= 0.4


@pytest.mark.slow
def test_get_times_out_with_dist_store_error(torch_store: Store) -> None:
    """get of a key nobody sets raises DistStoreError after the store's timeout."""
    torch_store.set_timeout(datetime.timedelta(seconds=1))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        torch_store.get("missing")
    assert 0.9 <= time.monotonic() - started < 15


@pytest.mark.slow
def test_set_timeout_through_prefix_store_changes_our_wait(etcd_store: EtcdStore) -> None:
    """A timeout set through a PrefixStore (in C++) is the one our store's get waits for."""
    view = PrefixStore("view", etcd_store)
    view.set_timeout(datetime.timedelta(seconds=1))
    assert etcd_store.timeout == datetime.timedelta(seconds=1)  # type: ignore[attr-defined]  # not in the stub
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        etcd_store.get("missing")
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------------------------- add


def test_add_starts_from_zero_and_accumulates(torch_store: Store) -> None:
    """add creates the counter at the amount and returns each running total."""
    assert torch_store.add("counter", 3) == 3
    assert torch_store.add("counter", -1) == 2
    assert torch_store.add("counter", 0) == 2
    assert torch_store.get("counter") == b"2"


def test_add_from_many_threads_loses_no_increment(torch_store: Store) -> None:
    """Concurrent adds from several threads sum exactly."""
    threads, rounds = 4, 5

    def increment() -> None:
        for _ in range(rounds):
            torch_store.add("counter", 1)

    workers = [threading.Thread(target=increment) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert torch_store.add("counter", 0) == threads * rounds


# --------------------------------------------------------------------------- compare_set


def test_compare_set_with_empty_expected_creates_an_absent_key(torch_store: Store) -> None:
    """An empty expected value matches an absent key: the desired value is written."""
    assert torch_store.compare_set("key", "", "desired") == b"desired"
    assert torch_store.get("key") == b"desired"


def test_compare_set_on_absent_key_with_expected_writes_nothing(torch_store: Store) -> None:
    """A non-empty expected value on an absent key returns it and creates nothing."""
    assert torch_store.compare_set("key", "expected", "desired") == b"expected"
    assert not torch_store.check(["key"])


def test_compare_set_with_matching_value_writes(torch_store: Store) -> None:
    """A matching expected value swaps in the desired value."""
    torch_store.set("key", "current")
    assert torch_store.compare_set("key", "current", "desired") == b"desired"
    assert torch_store.get("key") == b"desired"


def test_compare_set_with_other_value_returns_current(torch_store: Store) -> None:
    """A mismatching expected value leaves the key and returns its current value."""
    torch_store.set("key", "current")
    assert torch_store.compare_set("key", "other", "desired") == b"current"
    assert torch_store.get("key") == b"current"


# ---------------------------------------------------------------------------------- wait


def test_wait_without_timeout_returns_once_keys_are_set(torch_store: Store) -> None:
    """wait(keys) blocks until another thread sets every key."""
    torch_store.set("first", "1")
    setter = _later(0.3, torch_store.set, "second", b"2")
    try:
        torch_store.wait(["first", "second"])
    finally:
        setter.join(timeout=30)
    assert torch_store.check(["first", "second"])


def test_wait_with_timeout_returns_once_keys_are_set(torch_store: Store) -> None:
    """wait(keys, timeout) returns when another thread sets the key in time."""
    setter = _later(0.3, torch_store.set, "key", b"1")
    try:
        torch_store.wait(["key"], datetime.timedelta(seconds=20))
    finally:
        setter.join(timeout=30)


@pytest.mark.slow
def test_wait_with_timeout_raises_dist_store_error(torch_store: Store) -> None:
    """wait(keys, timeout) raises DistStoreError when a key stays missing."""
    torch_store.set("present", "1")
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        torch_store.wait(["present", "missing"], datetime.timedelta(seconds=1))
    assert 0.9 <= time.monotonic() - started < 15


@pytest.mark.slow
def test_wait_without_timeout_uses_the_store_timeout(torch_store: Store) -> None:
    """wait(keys) gives up after the store's own timeout."""
    torch_store.set_timeout(datetime.timedelta(seconds=1))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        torch_store.wait(["missing"])
    assert time.monotonic() - started < 15


# ------------------------------------------------------------------ check, delete, count


def test_check_tells_whether_every_key_exists(torch_store: Store) -> None:
    """check is true only when all the keys exist, and does not wait."""
    torch_store.set("a", "1")
    started = time.monotonic()
    assert torch_store.check(["a"])
    assert not torch_store.check(["a", "b"])
    assert time.monotonic() - started < 5


def test_delete_key_reports_whether_the_key_existed(torch_store: Store) -> None:
    """delete_key removes a key, true the first time and false once it is gone."""
    torch_store.set("key", "value")
    assert torch_store.delete_key("key") is True
    assert not torch_store.check(["key"])
    assert torch_store.delete_key("key") is False


def test_num_keys_counts_the_keys(torch_store: Store) -> None:
    """num_keys follows sets and deletes."""
    assert torch_store.num_keys() == 0
    torch_store.set("a", "1")
    torch_store.set("b", "2")
    assert torch_store.num_keys() == 2
    torch_store.delete_key("a")
    assert torch_store.num_keys() == 1


# ----------------------------------------------------------------- multi_get, multi_set


def test_multi_set_then_multi_get_returns_values_in_order(torch_store: Store) -> None:
    """multi_set writes every key; multi_get reads them back in the order asked."""
    torch_store.multi_set(["a", "b", "c"], ["1", "2", "3"])  # type: ignore[attr-defined]  # not in the stub
    assert torch_store.multi_get(["c", "a", "b"]) == [b"3", b"1", b"2"]


def test_multi_get_waits_for_a_missing_key(torch_store: Store) -> None:
    """multi_get blocks until another thread sets the last missing key."""
    torch_store.set("a", "1")
    setter = _later(0.3, torch_store.set, "b", b"2")
    try:
        assert torch_store.multi_get(["a", "b"]) == [b"1", b"2"]
    finally:
        setter.join(timeout=30)


# ---------------------------------------------------------------------------------- append


def test_append_creates_then_extends_the_value(torch_store: Store) -> None:
    """append creates an absent key and appends to an existing one."""
    torch_store.append("log", "ab")  # type: ignore[attr-defined]  # not in torch's stub
    torch_store.append("log", b"\x00c")  # type: ignore[attr-defined]  # not in torch's stub
    assert torch_store.get("log") == b"ab\x00c"


# ------------------------------------------------------------------------------- gloo


@pytest.mark.slow
def test_gloo_process_group_runs_over_our_store(
    etcd_store: EtcdStore, etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """Two processes init a gloo group with store=EtcdStore and all-reduce."""
    world_size = 2
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"rank-{rank}.log" for rank in range(world_size)]
    try:
        for rank, log in enumerate(logs):
            command = [
                sys.executable,
                str(SCRIPTS / "gloo_over_store.py"),
                etcd_endpoints,
                f"{etcd_key_prefix}/store/",  # the prefix of etcd_store too
                str(rank),
                str(world_size),
            ]
            with log.open("wb") as output:
                processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    report = "\n".join(
        f"--- rank {rank} (exit {process.returncode}) ---\n{log.read_text(errors='replace')}"
        for rank, (process, log) in enumerate(zip(processes, logs, strict=True))
    )
    assert [process.returncode for process in processes] == [0] * world_size, report
    assert all("ok" in log.read_text() for log in logs), report
    # gloo's rendezvous keys went through etcd, under our store's prefix.
    assert etcd_store.num_keys() > 0
