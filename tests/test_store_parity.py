"""Parity with torch 2.13's Store API: clone, the extended API, list_keys and queues.

The behaviour asked for is TCPStore's, as torch 2.13 shows it when run; where rdzv differs, the
"Store methods" page of the documentation says so, and the table there is checked against the
installed torch here. Queue tests run through the torch object (`rdzv.torch.EtcdStore`), and
through the async core where a lost answer or a count of etcd requests is needed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch.distributed as dist

# torch.distributed re-exports these only when built with distributed support, which type
# checkers cannot see; this is where they are defined.
from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.elastic.rendezvous import RendezvousError

import rdzv
from rdzv.torch import EtcdStore, create_backend
from support import STORE_WAIT, LoseAnswers, RawEtcd, torch_params

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).parent / "torchrun_scripts"
METHODS_PAGE = ROOT / "docs" / "store-methods.md"

# A row of the page's table: | `name` | status | ... |
_ROW = re.compile(r"^\| `(?P<name>\w+)` \| (?P<status>[^|]+?) \|", re.MULTILINE)


@pytest.fixture
async def second_connection(etcd_endpoints: str) -> AsyncIterator[rdzv.Connection]:
    """Another connection to the session's etcd, as another process would have."""
    async with rdzv.connect(etcd_endpoints, read_timeout=10) as conn:
        yield conn


def _later(delay: float, action: Any, *args: object) -> threading.Timer:
    timer = threading.Timer(delay, action, args)
    timer.start()
    return timer


# ------------------------------------------------------------------------ the methods table


def _torch_store_methods() -> set[str]:
    return {name for name in dir(Store) if not name.startswith("_")}


def _table_rows() -> dict[str, str]:
    return {match["name"]: match["status"] for match in _ROW.finditer(METHODS_PAGE.read_text())}


def test_methods_page_lists_every_method_of_torchs_store() -> None:
    """Every public method of the installed torch's Store has a row in docs/store-methods.md."""
    missing = _torch_store_methods() - set(_table_rows())
    assert not missing, f"torch's Store has methods that docs/store-methods.md omits: {missing}"


def test_methods_page_lists_only_methods_of_torchs_store() -> None:
    """No row of docs/store-methods.md names a method that the installed torch lacks."""
    extra = set(_table_rows()) - _torch_store_methods()
    assert not extra, f"docs/store-methods.md lists methods torch's Store lacks: {extra}"


def test_methods_marked_supported_exist_on_our_store() -> None:
    """Each method the table calls supported is EtcdStore's own, not torch's pure virtual one."""
    supported = {name for name, status in _table_rows().items() if status.startswith("supported")}
    # set_timeout and timeout are torch's C++ half's by design; barrier is torch's default.
    ours = supported - {"set_timeout", "timeout"}
    assert ours
    assert {name for name in ours if name not in EtcdStore.__dict__} == set()


# ---------------------------------------------------------------------------- extended API


def test_has_extended_api_is_true(torch_store: Store) -> None:
    """has_extended_api is true, called directly and through a PrefixStore."""
    assert torch_store.has_extended_api() is True  # type: ignore[attr-defined]  # not in torch's stub


def test_multi_set_through_prefix_store_is_one_transaction(
    etcd_store: EtcdStore, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """A PrefixStore's multi_set reaches ours: every key is written at one etcd revision."""
    view = PrefixStore("view", etcd_store)
    view.multi_set(["a", "b", "c"], ["1", "2", "3"])  # type: ignore[attr-defined]  # not in the stub
    revisions = {
        raw_etcd_sync.get(f"{etcd_key_prefix}/store/view/{name}").mod_revision
        for name in ("a", "b", "c")
    }
    assert len(revisions) == 1


def test_append_through_prefix_store_keeps_a_write_id(
    etcd_store: EtcdStore, etcd_key_prefix: str, raw_etcd_sync: RawEtcd
) -> None:
    """A PrefixStore's append reaches ours, which keeps its write id beside the value."""
    view = PrefixStore("view", etcd_store)
    view.append("log", "ab")  # type: ignore[attr-defined]  # not in torch's stub
    assert view.get("log") == b"ab"
    assert raw_etcd_sync.get(f"{etcd_key_prefix}/store/\x00rdzv-write-id/view/log") is not None


# ----------------------------------------------------------------------------------- clone


def test_clone_is_an_etcd_store_on_the_same_keys(etcd_store: EtcdStore) -> None:
    """What a clone sets, the original gets, and the other way round."""
    twin = etcd_store.clone()
    assert isinstance(twin, EtcdStore)
    assert twin is not etcd_store
    twin.set("from-clone", "1")
    etcd_store.set("from-original", "2")
    assert etcd_store.get("from-clone") == b"1"
    assert twin.get("from-original") == b"2"


def test_clone_starts_with_the_current_timeout(etcd_store: EtcdStore) -> None:
    """A clone's timeout is the original's at the time of the clone."""
    etcd_store.set_timeout(datetime.timedelta(seconds=7))
    twin = etcd_store.clone()
    assert twin.timeout == datetime.timedelta(seconds=7)  # type: ignore[attr-defined]  # not in the stub


def test_clone_timeout_is_its_own(etcd_store: EtcdStore) -> None:
    """Setting a clone's timeout leaves the original's alone."""
    twin = etcd_store.clone()
    twin.set_timeout(datetime.timedelta(seconds=3))
    assert etcd_store.timeout == STORE_WAIT  # type: ignore[attr-defined]  # not in the stub


def test_clone_made_through_prefix_store_survives_garbage_collection(
    etcd_store: EtcdStore,
) -> None:
    """A clone that only torch's C++ side holds still works after a garbage collection."""
    view = PrefixStore("view", etcd_store)
    twin = view.clone()  # type: ignore[attr-defined]  # not in torch's stub
    gc.collect()
    twin.set("key", "value")
    assert view.get("key") == b"value"


def test_torchs_own_python_store_check_passes(etcd_store: EtcdStore) -> None:
    """torch's C++ self-check of a Python store (clone first, then calls from C++) passes."""
    dist._test_python_store(etcd_store)  # type: ignore[attr-defined]  # not in torch's stub
    assert etcd_store.check(["key"])  # a key the check writes


def test_clones_in_several_threads_at_once_lose_no_add(etcd_store: EtcdStore) -> None:
    """Threads that each use a clone of their own add concurrently, and every add counts."""
    threads, rounds = 4, 5

    def increment(twin: EtcdStore) -> None:
        for _ in range(rounds):
            twin.add("counter", 1)

    workers = [
        threading.Thread(target=increment, args=(etcd_store.clone(),)) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert etcd_store.add("counter", 0) == threads * rounds


def test_clone_shares_the_connection(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Closing the facade that owns the connection ends its clones too (they share it)."""
    backend, store = create_backend(torch_params(etcd_endpoints, etcd_key_prefix))
    twin = store.clone()
    backend.facade.close()
    with pytest.raises(RendezvousError, match="closed"):
        twin.set("key", "value")


# ------------------------------------------------------------------------------- list_keys


def test_list_keys_of_an_empty_store_is_empty(etcd_store: EtcdStore) -> None:
    """A store with nothing in it lists no keys."""
    assert etcd_store.list_keys() == []


def test_list_keys_returns_the_names_in_key_order(etcd_store: EtcdStore) -> None:
    """list_keys returns each name set, without the prefix, in etcd's key order."""
    etcd_store.multi_set(["b", "a", "c/d"], ["1", "2", "3"])
    assert etcd_store.list_keys() == ["a", "b", "c/d"]


def test_list_keys_leaves_out_write_ids_and_queues(etcd_store: EtcdStore) -> None:
    """Keys that rdzv keeps for itself (write ids, queues) are not listed."""
    etcd_store.add("counter", 1)
    etcd_store.compare_set("swapped", "", "1")
    etcd_store.queue_push("jobs", "x")
    assert etcd_store.list_keys() == ["counter", "swapped"]


# ---------------------------------------------------------------------------------- queues


def test_queue_pop_returns_items_in_push_order(etcd_store: EtcdStore) -> None:
    """Items come out of a queue in the order they were pushed."""
    for item in ["1", "2", "3", "4"]:
        etcd_store.queue_push("q", item)
    assert [etcd_store.queue_pop("q") for _ in range(4)] == [b"1", b"2", b"3", b"4"]


def test_queue_values_come_back_as_bytes(etcd_store: EtcdStore) -> None:
    """A str is pushed as UTF-8; bytes (NUL, non-UTF-8) and the empty value come back as is."""
    etcd_store.queue_push("q", "välue")
    etcd_store.queue_push("q", b"\x00\xff")
    etcd_store.queue_push("q", "")
    assert [etcd_store.queue_pop("q") for _ in range(3)] == ["välue".encode(), b"\x00\xff", b""]


def test_queue_len_follows_pushes_and_pops(etcd_store: EtcdStore) -> None:
    """queue_len is the number of items pushed and not yet popped."""
    etcd_store.queue_push("q", "a")
    etcd_store.queue_push("q", "b")
    assert etcd_store.queue_len("q") == 2
    etcd_store.queue_pop("q")
    assert etcd_store.queue_len("q") == 1


def test_queue_len_of_an_unknown_queue_is_zero(etcd_store: EtcdStore) -> None:
    """A queue never pushed to has length 0, as in TCPStore."""
    assert etcd_store.queue_len("never") == 0


def test_non_blocking_pop_of_an_empty_queue_raises_queue_empty_error(
    etcd_store: EtcdStore,
) -> None:
    """queue_pop(block=False) on an empty queue raises QueueEmptyError at once."""
    started = time.monotonic()
    with pytest.raises(dist.QueueEmptyError):
        etcd_store.queue_pop("q", block=False)
    assert time.monotonic() - started < 5


def test_non_blocking_pop_of_a_drained_queue_raises_queue_empty_error(
    etcd_store: EtcdStore,
) -> None:
    """A queue whose items were all popped is empty again."""
    etcd_store.queue_push("q", "a")
    etcd_store.queue_pop("q", block=False)
    with pytest.raises(dist.QueueEmptyError):
        etcd_store.queue_pop("q", block=False)


@pytest.mark.slow
def test_blocking_pop_times_out_with_dist_store_error(etcd_store: EtcdStore) -> None:
    """A blocking pop of an empty queue raises DistStoreError (not QueueEmptyError) on timeout."""
    etcd_store.set_timeout(datetime.timedelta(seconds=1))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError) as raised:
        etcd_store.queue_pop("q")
    assert not isinstance(raised.value, dist.QueueEmptyError)
    assert 0.9 <= time.monotonic() - started < 15


def test_blocking_pop_is_woken_by_a_push_from_another_thread(etcd_store: EtcdStore) -> None:
    """A blocking pop waits for an item that another thread pushes later."""
    started = time.monotonic()
    pusher = _later(0.5, etcd_store.clone().queue_push, "q", "late")
    try:
        assert etcd_store.queue_pop("q") == b"late"
    finally:
        pusher.join(timeout=30)
    assert time.monotonic() - started >= 0.4


def test_queue_and_key_of_one_name_are_apart(etcd_store: EtcdStore) -> None:
    """A queue is not a key: get, num_keys and queue_len each see only their own."""
    etcd_store.set("name", "key value")
    etcd_store.queue_push("name", "item")
    assert etcd_store.get("name") == b"key value"
    assert etcd_store.num_keys() == 1
    assert etcd_store.queue_len("name") == 1


def test_queue_alone_is_not_counted_as_a_key(etcd_store: EtcdStore) -> None:
    """A non-empty queue adds nothing to num_keys, as in TCPStore."""
    etcd_store.queue_push("q", "item")
    assert etcd_store.num_keys() == 0


def test_delete_key_leaves_the_queue_of_that_name(etcd_store: EtcdStore) -> None:
    """delete_key of a queue's name deletes nothing and returns False, as in TCPStore."""
    etcd_store.queue_push("q", "item")
    assert etcd_store.delete_key("q") is False
    assert etcd_store.queue_len("q") == 1


def test_check_sees_a_queue_while_it_is_not_empty(etcd_store: EtcdStore) -> None:
    """check of a queue's name is true while it holds items and false once drained."""
    etcd_store.queue_push("q", "item")
    assert etcd_store.check(["q"])
    etcd_store.queue_pop("q")
    assert not etcd_store.check(["q"])


def test_wait_returns_once_a_queue_gets_an_item(etcd_store: EtcdStore) -> None:
    """wait on a queue's name returns when another thread pushes to that queue."""
    started = time.monotonic()
    pusher = _later(0.5, etcd_store.queue_push, "q", "item")
    try:
        etcd_store.wait(["q"])
    finally:
        pusher.join(timeout=30)
    assert time.monotonic() - started >= 0.4


def test_wait_for_a_key_and_a_queue_at_once(etcd_store: EtcdStore) -> None:
    """wait for several names returns once one is set as a key and another pushed as a queue."""
    pusher = _later(0.3, etcd_store.queue_push, "q", "item")
    setter = _later(0.3, etcd_store.set, "k", b"v")
    try:
        etcd_store.wait(["q", "k"])
    finally:
        pusher.join(timeout=30)
        setter.join(timeout=30)
    assert etcd_store.check(["q", "k"])


def test_prefix_store_does_not_pass_queues_on_in_torch_2_13(etcd_store: EtcdStore) -> None:
    """torch 2.13's C++-to-Python bridge has no queue methods: a PrefixStore raises for them.

    If this fails, torch passes them on now: update docs/store-methods.md, and test queues
    through the `torch_store` fixture.
    """
    view = PrefixStore("view", etcd_store)
    with pytest.raises(NotImplementedError):
        view.queue_push("q", "item")
    with pytest.raises(NotImplementedError):
        view.list_keys()


# ----------------------------------------------------- queues in the async core, and etcd


@pytest.mark.anyio
async def test_async_pop_of_an_empty_queue_with_zero_timeout_raises_store_timeout_error(
    store: rdzv.AsyncEtcdStore,
) -> None:
    """A zero timeout does not wait: StoreTimeoutError names the queue."""
    with pytest.raises(rdzv.StoreTimeoutError, match="'q'"):
        await store.queue_pop("q", timeout=0)


@pytest.mark.anyio
async def test_blocking_pop_waits_by_watch_not_by_reading_again(
    store: rdzv.AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a pop waits for an empty queue, it reads it once and then only watches."""
    reads = 0
    read = connection.range

    async def counting_read(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read(*args, **kwargs)

    monkeypatch.setattr(connection, "range", counting_read)
    with pytest.raises(rdzv.StoreTimeoutError):
        await store.queue_pop("q", timeout=1)
    assert reads == 1


@pytest.mark.anyio
async def test_reserved_queue_names_are_refused(store: rdzv.AsyncEtcdStore) -> None:
    """A name in the space of rdzv's own keys is a ValueError, for queues as for keys."""
    with pytest.raises(ValueError, match="reserved"):
        await store.queue_push("\x00rdzv-queue/q", b"x")
    assert await store.queue_len("q") == 0


@pytest.mark.anyio
async def test_concurrent_poppers_never_get_the_same_item(
    store: rdzv.AsyncEtcdStore,
    second_connection: rdzv.Connection,
    store_prefix: str,
) -> None:
    """Poppers on two connections drain one queue: each item is popped exactly once."""
    items = [f"item-{index}".encode() for index in range(24)]
    for item in items:
        await store.queue_push("q", item)
    other = rdzv.AsyncEtcdStore(second_connection, prefix=store_prefix)
    popped: list[bytes] = []

    async def drain(popper: rdzv.AsyncEtcdStore) -> None:
        with contextlib.suppress(rdzv.StoreTimeoutError):
            while True:
                popped.append(await popper.queue_pop("q", timeout=0))

    async with anyio.create_task_group() as poppers:
        for popper in (store, other) * 3:
            poppers.start_soon(drain, popper)
    assert sorted(popped) == sorted(items)


@pytest.mark.anyio
async def test_concurrent_pushers_lose_no_item_and_keep_their_order(
    store: rdzv.AsyncEtcdStore,
    second_connection: rdzv.Connection,
    store_prefix: str,
) -> None:
    """Pushers on two connections fill one queue: every item is in it, each pusher's in order."""
    other = rdzv.AsyncEtcdStore(second_connection, prefix=store_prefix)

    async def push(target: rdzv.AsyncEtcdStore, pusher: int) -> None:
        for index in range(6):
            await target.queue_push("q", f"{pusher}-{index}".encode())

    async with anyio.create_task_group() as pushers:
        for pusher, target in enumerate((store, other) * 2):
            pushers.start_soon(push, target, pusher)
    assert await store.queue_len("q") == 24
    popped = [(await store.queue_pop("q", timeout=0)).decode() for _ in range(24)]
    for pusher in range(4):
        assert [item for item in popped if item.startswith(f"{pusher}-")] == [
            f"{pusher}-{index}" for index in range(6)
        ]


@pytest.mark.anyio
@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_push_whose_answer_is_lost_adds_the_item_once(
    store: rdzv.AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """A push to an existing queue that landed, never landed, or landed late is applied once."""
    await store.queue_push("q", b"first")
    # The push's first attempt assumes the queue is absent, and fails; the second one is lost.
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing, skip=1))
    await store.queue_push("q", b"second")
    monkeypatch.undo()
    assert await store.queue_len("q") == 2


@pytest.mark.anyio
@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_push_creating_a_queue_whose_answer_is_lost_adds_the_item_once(
    store: rdzv.AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """The first push to a queue, whose answer is lost, creates it with one item."""
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing))
    await store.queue_push("q", b"only")
    monkeypatch.undo()
    assert await store.queue_len("q") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_pop_whose_answer_is_lost_returns_the_item_once(
    store: rdzv.AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """A pop that landed, never landed, or landed late returns the oldest item, popped once."""
    await store.queue_push("q", b"a")
    await store.queue_push("q", b"b")
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing))
    assert await store.queue_pop("q", timeout=0) == b"a"
    monkeypatch.undo()
    assert await store.queue_pop("q", timeout=0) == b"b"
    assert await store.queue_len("q") == 0


@pytest.mark.anyio
async def test_pop_skips_an_item_that_is_gone(
    store: rdzv.AsyncEtcdStore, connection: rdzv.Connection
) -> None:
    """An item whose key is gone (expired with its lease) is skipped, and the next returned."""
    await store.queue_push("q", b"expired")
    await store.queue_push("q", b"next")
    await connection.delete(store._queue_item("q", 0))
    assert await store.queue_pop("q", timeout=0) == b"next"
    assert await store.queue_len("q") == 0


# ------------------------------------------------------------------------- two processes


def _start(
    arguments: list[str], log: Path, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, *arguments], stdout=output, stderr=subprocess.STDOUT
        )
    processes.append(process)
    return process


def _finish(processes: list[subprocess.Popen[bytes]], seconds: float) -> None:
    """Wait for the processes, up to `seconds` in all; kill those still running."""
    deadline = time.monotonic() + seconds
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _report(processes: list[subprocess.Popen[bytes]], logs: list[Path]) -> str:
    return "\n".join(
        f"--- {log.name} (exit {process.returncode}) ---\n{log.read_text(errors='replace')}"
        for process, log in zip(processes, logs, strict=True)
    )


def _popped(log: Path) -> list[bytes]:
    """The items a queue_worker.py process printed, once it printed "done"."""
    lines = log.read_text().splitlines()
    assert "done" in lines, lines
    return [bytes.fromhex(line.split()[1]) for line in lines if line.startswith("popped ")]


@pytest.mark.slow
def test_two_processes_draining_one_queue_never_get_the_same_item(
    etcd_store: EtcdStore, etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """Two processes pop one queue at once: between them, every item exactly once."""
    items = [f"item-{index}".encode() for index in range(120)]
    for item in items:
        etcd_store.queue_push("items", item)
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"popper-{index}.log" for index in range(2)]
    try:
        for index, log in enumerate(logs):
            script = [str(SCRIPTS / "queue_worker.py"), etcd_endpoints]
            script += [f"{etcd_key_prefix}/store/", f"popper-{index}", "drain"]
            _start(script, log, processes)
        # Both have started (each pushed its name) before either pops.
        assert {etcd_store.queue_pop("ready") for _ in logs} == {b"popper-0", b"popper-1"}
        etcd_store.set("go", "")
    finally:
        _finish(processes, 90)
    assert [process.returncode for process in processes] == [0, 0], _report(processes, logs)
    popped = [_popped(log) for log in logs]
    assert sorted(popped[0] + popped[1]) == sorted(items)


@pytest.mark.slow
def test_blocking_pop_in_one_process_is_woken_by_a_push_in_another(
    etcd_store: EtcdStore, etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """A process blocked on an empty queue gets the item that this process pushes."""
    processes: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "popper.log"
    try:
        script = [str(SCRIPTS / "queue_worker.py"), etcd_endpoints]
        _start([*script, f"{etcd_key_prefix}/store/", "popper", "one"], log, processes)
        assert etcd_store.queue_pop("ready") == b"popper"
        time.sleep(0.5)  # let it block on the empty queue
        etcd_store.queue_push("work", b"\x00task")
    finally:
        _finish(processes, 60)
    assert processes[0].returncode == 0, _report(processes, [log])
    assert _popped(log) == [b"\x00task"]


@pytest.mark.slow
def test_gloo_job_on_cloned_stores_shares_work_through_a_queue(
    etcd_store: EtcdStore, etcd_endpoints: str, etcd_key_prefix: str, tmp_path: Path
) -> None:
    """Two gloo ranks init on clones of EtcdStore, all-reduce, and split a queue's items."""
    world_size = 2
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"rank-{rank}.log" for rank in range(world_size)]
    try:
        for rank, log in enumerate(logs):
            script = [str(SCRIPTS / "gloo_clones_and_queues.py"), etcd_endpoints]
            script += [f"{etcd_key_prefix}/store/", str(rank), str(world_size)]
            _start(script, log, processes)
    finally:
        _finish(processes, 120)
    report = _report(processes, logs)
    assert [process.returncode for process in processes] == [0] * world_size, report
    assert all(f"rank {rank}: ok" in log.read_text() for rank, log in enumerate(logs)), report
    # The queue was emptied, and gloo's keys went through etcd under our store's prefix.
    assert etcd_store.queue_len("tasks") == 0
    assert etcd_store.num_keys() > 0
