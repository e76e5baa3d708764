"""AsyncEtcdStore: c10d's Store operations, with TCPStore's semantics, on a real etcd."""

from __future__ import annotations

import time

import aetcd
import anyio
import pytest

import rdzv
from rdzv._etcd import Put, read_deadline
from rdzv._store import DEFAULT_STORE_PREFIX, AsyncEtcdStore
from support import LoseAnswers

pytestmark = pytest.mark.anyio


async def _set_later(store: AsyncEtcdStore, delay: float, values: dict[str, bytes]) -> None:
    await anyio.sleep(delay)
    for key, value in values.items():
        await store.set(key, value)


# ------------------------------------------------------------------------------ set and get


async def test_set_then_get_returns_the_value(store: AsyncEtcdStore) -> None:
    """A value set is the value got back."""
    await store.set("key", b"value")
    assert await store.get("key", timeout=5) == b"value"


async def test_set_replaces_the_value(store: AsyncEtcdStore) -> None:
    """A second set of a key replaces its value."""
    await store.set("key", b"first")
    await store.set("key", b"second")
    assert await store.get("key", timeout=5) == b"second"


async def test_get_waits_until_another_task_sets_the_key(store: AsyncEtcdStore) -> None:
    """get blocks until the key is set, then returns its value."""
    await store.set("other", b"x")
    started = time.monotonic()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_set_later, store, 0.3, {"key": b"late"})
        assert await store.get("key", timeout=5) == b"late"
    assert time.monotonic() - started >= 0.25


async def test_get_on_a_never_written_prefix_waits(
    connection: rdzv.Connection, etcd_key_prefix: str
) -> None:
    """A key under a prefix with nothing in etcd at all is waited for, not an error."""
    store = AsyncEtcdStore(connection, prefix=f"{etcd_key_prefix}/never/written/")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_set_later, store, 0.2, {"key": b"value"})
        assert await store.get("key", timeout=5) == b"value"


async def test_get_times_out_with_store_timeout_error(store: AsyncEtcdStore) -> None:
    """A key never set makes get raise StoreTimeoutError after about the timeout."""
    started = time.monotonic()
    with pytest.raises(rdzv.StoreTimeoutError, match=r"'missing'.*0\.3 s"):
        await store.get("missing", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3


async def test_get_with_zero_timeout_does_not_wait(store: AsyncEtcdStore) -> None:
    """A zero timeout returns an existing key, and fails at once for a missing one."""
    await store.set("key", b"value")
    assert await store.get("key", timeout=0) == b"value"
    with pytest.raises(rdzv.StoreTimeoutError):
        await store.get("missing", timeout=0)


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", True])
async def test_invalid_timeout_is_a_value_error(store: AsyncEtcdStore, timeout: object) -> None:
    """A timeout that is not a non-negative number of seconds raises ValueError."""
    with pytest.raises(ValueError, match="timeout"):
        await store.get("key", timeout=timeout)  # type: ignore[arg-type]


async def test_store_timeout_error_is_a_timeout_error() -> None:
    """StoreTimeoutError is both a RendezvousError and a builtin TimeoutError."""
    assert issubclass(rdzv.StoreTimeoutError, rdzv.RendezvousError)
    assert issubclass(rdzv.StoreTimeoutError, TimeoutError)


# ------------------------------------------------------------------------------ wait, check


async def test_wait_returns_when_all_keys_are_set_later(store: AsyncEtcdStore) -> None:
    """wait blocks until every key exists, even when they are set one by one afterwards."""
    await store.set("a", b"1")
    started = time.monotonic()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_set_later, store, 0.2, {"b": b"2", "c": b"3"})
        await store.wait(["a", "b", "c"], timeout=5)
    assert time.monotonic() - started >= 0.15
    assert await store.check(["a", "b", "c"])


async def test_wait_timeout_names_only_the_missing_keys(store: AsyncEtcdStore) -> None:
    """The timeout error names the keys that are missing, not those present."""
    await store.set("present", b"1")
    with pytest.raises(rdzv.StoreTimeoutError) as raised:
        await store.wait(["present", "gone1", "gone2"], timeout=0.2)
    message = str(raised.value)
    assert "'gone1'" in message
    assert "'gone2'" in message
    assert "'present'" not in message


async def test_wait_for_no_keys_returns_at_once(store: AsyncEtcdStore) -> None:
    """Waiting for an empty list of keys returns immediately."""
    await store.wait([], timeout=0)


async def test_check_is_true_only_when_all_keys_exist(store: AsyncEtcdStore) -> None:
    """check answers whether every key exists now, without waiting."""
    await store.set("a", b"1")
    await store.set("b", b"2")
    assert await store.check(["a"])
    assert await store.check(["a", "b"])
    assert not await store.check(["a", "b", "c"])
    assert not await store.check(["c"])
    assert await store.check([])


# ------------------------------------------------------------------------------------- add


async def test_add_creates_the_key_with_the_amount(store: AsyncEtcdStore) -> None:
    """add on an absent key stores the amount, as decimal ASCII, and returns it."""
    assert await store.add("counter", 5) == 5
    assert await store.get("counter", timeout=5) == b"5"


async def test_add_increments_and_returns_the_new_value(store: AsyncEtcdStore) -> None:
    """add on an existing counter adds to it and returns the sum."""
    await store.add("counter", 5)
    assert await store.add("counter", 3) == 8
    assert await store.get("counter", timeout=5) == b"8"


async def test_add_accepts_negative_amounts(store: AsyncEtcdStore) -> None:
    """A negative amount subtracts, down through zero."""
    await store.add("counter", 2)
    assert await store.add("counter", -5) == -3
    assert await store.get("counter", timeout=5) == b"-3"


async def test_add_reads_a_value_written_by_set(store: AsyncEtcdStore) -> None:
    """A decimal value written with set can be added to."""
    await store.set("counter", b"41")
    assert await store.add("counter", 1) == 42


async def test_add_is_atomic_under_concurrency(etcd_endpoints: str, store_prefix: str) -> None:
    """Eight stores on separate connections each add 1 ten times: the counter ends at 80."""
    results: list[int] = []

    async def adder() -> None:
        async with rdzv.connect(etcd_endpoints, read_timeout=10) as connection:
            store = AsyncEtcdStore(connection, prefix=store_prefix)
            for _ in range(10):
                results.append(await store.add("counter", 1))

    async with anyio.create_task_group() as tasks:
        for _ in range(8):
            tasks.start_soon(adder)
    assert sorted(results) == list(range(1, 81))


async def test_add_on_a_non_integer_value_raises_value_error(store: AsyncEtcdStore) -> None:
    """add on a key holding something other than an integer raises ValueError naming the key."""
    await store.set("text", b"hello")
    with pytest.raises(ValueError, match=r"'text'.*not a decimal integer"):
        await store.add("text", 1)
    assert await store.get("text", timeout=5) == b"hello"


async def test_add_rejects_a_non_int_amount(store: AsyncEtcdStore) -> None:
    """The amount must be an int."""
    with pytest.raises(TypeError, match="must be an int"):
        await store.add("counter", 1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- compare_set


async def test_compare_set_on_absent_key_with_empty_expected_sets(store: AsyncEtcdStore) -> None:
    """An absent key with expected b"" is set to desired, which is returned."""
    assert await store.compare_set("key", b"", b"desired") == b"desired"
    assert await store.get("key", timeout=5) == b"desired"


async def test_compare_set_on_absent_key_with_other_expected_does_not_write(
    store: AsyncEtcdStore,
) -> None:
    """An absent key with a non-empty expected stays absent; expected is returned."""
    assert await store.compare_set("key", b"expected", b"desired") == b"expected"
    assert not await store.check(["key"])


async def test_compare_set_with_matching_value_sets(store: AsyncEtcdStore) -> None:
    """A key holding expected is set to desired, which is returned."""
    await store.set("key", b"old")
    assert await store.compare_set("key", b"old", b"new") == b"new"
    assert await store.get("key", timeout=5) == b"new"


async def test_compare_set_with_other_value_returns_it(store: AsyncEtcdStore) -> None:
    """A key holding something else is left alone; its current value is returned."""
    await store.set("key", b"current")
    assert await store.compare_set("key", b"old", b"new") == b"current"
    assert await store.get("key", timeout=5) == b"current"


async def test_compare_set_with_empty_expected_on_existing_key_returns_it(
    store: AsyncEtcdStore,
) -> None:
    """Expected b"" on an existing, non-empty key writes nothing and returns the value."""
    await store.set("key", b"current")
    assert await store.compare_set("key", b"", b"new") == b"current"


async def test_compare_set_with_empty_expected_replaces_an_empty_value(
    store: AsyncEtcdStore,
) -> None:
    """A key holding b"" matches expected b"", as in TCPStore."""
    await store.set("key", b"")
    assert await store.compare_set("key", b"", b"new") == b"new"
    assert await store.get("key", timeout=5) == b"new"


# ---------------------------------------------------------------------- delete, num_keys


async def test_delete_key_reports_whether_the_key_existed(store: AsyncEtcdStore) -> None:
    """delete_key returns True for an existing key and False for an absent one."""
    await store.set("key", b"value")
    assert await store.delete_key("key") is True
    assert await store.delete_key("key") is False
    assert not await store.check(["key"])


async def test_deleted_key_can_be_waited_for_again(store: AsyncEtcdStore) -> None:
    """After a delete, get waits for the key to be set again and returns the new value."""
    await store.set("key", b"old")
    await store.delete_key("key")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_set_later, store, 0.2, {"key": b"new"})
        assert await store.get("key", timeout=5) == b"new"


async def test_num_keys_counts_only_this_stores_keys(
    connection: rdzv.Connection, etcd_key_prefix: str, store: AsyncEtcdStore
) -> None:
    """num_keys counts the keys under this store's prefix and no other."""
    other = AsyncEtcdStore(connection, prefix=f"{etcd_key_prefix}/other/")
    assert await store.num_keys() == 0
    await store.set("a", b"1")
    await store.add("b", 1)
    await other.set("c", b"3")
    assert await store.num_keys() == 2
    await store.delete_key("a")
    assert await store.num_keys() == 1


# ------------------------------------------------------------------- multi_set, multi_get


async def test_multi_set_writes_all_keys_in_one_transaction(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """multi_set writes every key at one etcd revision."""
    await store.multi_set(["a", "b", "c"], [b"1", b"2", b"3"])
    stored = [await raw_etcd.get((store.prefix + key).encode()) for key in "abc"]
    assert [kv.value for kv in stored if kv is not None] == [b"1", b"2", b"3"]
    assert len({kv.mod_revision for kv in stored if kv is not None}) == 1


async def test_multi_get_returns_values_in_order(store: AsyncEtcdStore) -> None:
    """multi_get returns the values in the order of the keys asked for, repeats included."""
    await store.multi_set(["a", "b", "c"], [b"1", b"2", b"3"])
    assert await store.multi_get(["c", "a", "b", "a"], timeout=5) == [b"3", b"1", b"2", b"1"]


async def test_multi_set_with_a_repeated_key_keeps_the_last_value(store: AsyncEtcdStore) -> None:
    """A key given twice to multi_set ends with its last value."""
    await store.multi_set(["a", "b", "a"], [b"first", b"2", b"last"])
    assert await store.multi_get(["a", "b"], timeout=5) == [b"last", b"2"]


async def test_multi_get_waits_for_missing_keys(store: AsyncEtcdStore) -> None:
    """multi_get blocks until every key exists, then returns all the values."""
    await store.set("a", b"1")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_set_later, store, 0.2, {"b": b"2"})
        assert await store.multi_get(["a", "b"], timeout=5) == [b"1", b"2"]


async def test_many_keys_round_trip(store: AsyncEtcdStore) -> None:
    """More keys than etcd allows in one transaction are set, checked and got."""
    keys = [f"rank/{rank}" for rank in range(300)]
    values = [str(rank).encode() for rank in range(300)]
    await store.multi_set(keys, values)
    assert await store.check(keys)
    assert await store.multi_get(keys, timeout=5) == values
    assert await store.num_keys() == 300


async def test_multi_set_needs_one_value_per_key(store: AsyncEtcdStore) -> None:
    """multi_set with more keys than values raises ValueError and writes nothing."""
    with pytest.raises(ValueError, match="one value per key"):
        await store.multi_set(["a", "b"], [b"1"])
    assert await store.num_keys() == 0


# ---------------------------------------------------------------------------------- append


async def test_append_creates_then_appends(store: AsyncEtcdStore) -> None:
    """append creates an absent key with the value, then appends to it."""
    await store.append("log", b"one")
    await store.append("log", b",two")
    assert await store.get("log", timeout=5) == b"one,two"


# ------------------------------------------------------------------------ storage in etcd


async def test_values_are_stored_raw_under_prefix_and_key(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client, store_prefix: str
) -> None:
    """Key k is the etcd key prefix + k (UTF-8), holding exactly the value's bytes."""
    await store.set("dir/ключ", b"\x00raw\xff")
    stored = await raw_etcd.get(f"{store_prefix}dir/ключ".encode())
    assert stored is not None
    assert stored.value == b"\x00raw\xff"


async def test_every_write_is_attached_to_a_lease(
    store: AsyncEtcdStore, raw_etcd: aetcd.Client
) -> None:
    """set, multi_set, add, append and compare_set all write keys that carry a lease."""
    await store.set("set", b"1")
    await store.multi_set(["multi"], [b"1"])
    await store.add("add", 1)
    await store.append("append", b"1")
    await store.compare_set("compare_set", b"", b"1")
    for key in ("set", "multi", "add", "append", "compare_set"):
        stored = await raw_etcd.get((store.prefix + key).encode())
        assert stored is not None
        assert stored.lease != 0, key


async def test_prefix_gets_a_trailing_slash(connection: rdzv.Connection) -> None:
    """A prefix without a final '/' gets one; the default prefix is c10d's usual one."""
    assert AsyncEtcdStore(connection, prefix="/jobs/store").prefix == "/jobs/store/"
    assert AsyncEtcdStore(connection).prefix == DEFAULT_STORE_PREFIX == "/torch/elastic/store/"


@pytest.mark.parametrize("prefix", ["relative/store/", "", b"/store/", None])
async def test_bad_prefix_is_a_value_error(connection: rdzv.Connection, prefix: object) -> None:
    """A prefix that is not a string starting with '/' raises ValueError."""
    with pytest.raises(ValueError, match="must be a string that starts with '/'"):
        AsyncEtcdStore(connection, prefix=prefix)  # type: ignore[arg-type]


async def test_bad_ttl_is_a_value_error(connection: rdzv.Connection) -> None:
    """A TTL that is not a positive whole number of seconds raises ValueError."""
    with pytest.raises(ValueError, match="TTL"):
        AsyncEtcdStore(connection, ttl=0)


async def test_non_bytes_value_is_a_type_error(store: AsyncEtcdStore) -> None:
    """Values must be bytes: a str raises TypeError, and nothing is written."""
    with pytest.raises(TypeError, match="must be bytes"):
        await store.set("key", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be bytes"):
        await store.append("key", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be bytes"):
        await store.multi_set(["key"], ["text"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be bytes"):
        await store.compare_set("key", b"", "text")  # type: ignore[arg-type]
    assert await store.num_keys() == 0


async def test_single_string_as_keys_is_a_type_error(store: AsyncEtcdStore) -> None:
    """A str where a list of keys is expected raises TypeError instead of waiting per letter."""
    with pytest.raises(TypeError, match="sequence of store keys"):
        await store.check("abc")


# ------------------------------------------------------------------- lost-answer resolution


async def _put_with_write_id(
    store: AsyncEtcdStore, connection: rdzv.Connection, key: bytes, value: bytes, write_id: bytes
) -> None:
    """Put `value` and its write id as an add of `store` does, in one transaction."""
    marker = store._marker(key)
    await connection.txn([], [Put(key, value), Put(marker, write_id)])


async def test_lost_add_that_was_the_first_change_landed(
    store: AsyncEtcdStore, connection: rdzv.Connection
) -> None:
    """A lost write found as the first change after its revision, with our write id, landed."""
    key = (store.prefix + "counter").encode()
    await store.set("counter", b"1")
    before = await connection.get(key)
    assert before is not None
    await _put_with_write_id(store, connection, key, b"2", b"our-write-id")
    await connection.put(key, b"7")
    current = await connection.get(key)
    lost: dict[int | None, bytes] = {before.mod_revision: b"2"}
    landed = await store._lost_write_landed(
        key, b"our-write-id", lost, current, read_deadline(connection)
    )
    assert landed == b"2"


async def test_lost_add_on_untouched_key_did_not_land(
    store: AsyncEtcdStore, connection: rdzv.Connection
) -> None:
    """A key still at the revision the write was conditioned on means the write did not land."""
    key = (store.prefix + "counter").encode()
    await store.set("counter", b"1")
    current = await connection.get(key)
    assert current is not None
    lost: dict[int | None, bytes] = {current.mod_revision: b"2"}
    landed = await store._lost_write_landed(key, b"ours", lost, current, read_deadline(connection))
    assert landed is None
    assert lost == {current.mod_revision: b"2"}


async def test_same_bytes_with_another_write_id_are_not_taken_for_ours(
    store: AsyncEtcdStore, connection: rdzv.Connection
) -> None:
    """An identical value written with another write id is not our write."""
    key = (store.prefix + "counter").encode()
    await store.set("counter", b"1")
    before = await connection.get(key)
    assert before is not None
    await _put_with_write_id(store, connection, key, b"2", b"their-write-id")
    current = await connection.get(key)
    lost: dict[int | None, bytes] = {before.mod_revision: b"2"}
    landed = await store._lost_write_landed(
        key, b"our-write-id", lost, current, read_deadline(connection)
    )
    assert landed is None
    assert lost == {}


async def test_lost_create_is_found_at_the_keys_creation(
    store: AsyncEtcdStore, connection: rdzv.Connection
) -> None:
    """A lost create landed if the key's current incarnation was created with our write id."""
    key = (store.prefix + "counter").encode()
    await _put_with_write_id(store, connection, key, b"1", b"our-write-id")
    await connection.put(key, b"5")
    current = await connection.get(key)
    landed = await store._lost_write_landed(
        key, b"our-write-id", {None: b"1"}, current, read_deadline(connection)
    )
    assert landed == b"1"


async def test_markers_are_not_store_keys(store: AsyncEtcdStore) -> None:
    """num_keys counts what was added, not the write ids kept beside it; deleting removes both."""
    await store.add("counter", 1)
    await store.append("log", b"a")
    assert await store.num_keys() == 2
    assert await store.delete_key("counter")
    assert not await store.delete_key("counter")
    assert await store.num_keys() == 1


async def test_reserved_key_names_are_refused(store: AsyncEtcdStore) -> None:
    """A store key in the space of rdzv's write ids is a ValueError, nothing written."""
    with pytest.raises(ValueError, match="reserved"):
        await store.set("\x00rdzv-write-id/counter", b"1")
    assert await store.num_keys() == 0


@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_add_whose_answer_is_lost_is_applied_once(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """An add whose compare-and-swap landed, never landed, or landed late is applied once."""
    await store.add("counter", 10)
    # The first attempt assumes the key is absent, and fails; the second one is lost.
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing, skip=1))
    assert await store.add("counter", 5) == 15
    monkeypatch.undo()
    assert await store.get("counter", timeout=5) == b"15"


@pytest.mark.parametrize("landing", ["before", "never"])
async def test_add_lost_after_others_added_is_applied_once(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    store_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """A lost add is not mistaken for this store's earlier add that created the key."""
    other = AsyncEtcdStore(connection, prefix=store_prefix)
    assert await store.add("counter", 1) == 1
    assert await other.add("counter", 1) == 2
    # This add's first attempt (which assumes the key is absent) loses its answer: the key's
    # creating write has the same bytes and lease, but another call's write id.
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing))
    assert await store.add("counter", 1) == 3
    monkeypatch.undo()
    assert await store.get("counter", timeout=5) == b"3"


@pytest.mark.parametrize("landing", ["before", "never", "late"])
async def test_create_by_add_whose_answer_is_lost_is_applied_once(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """An add creating its key, whose answer is lost, is applied exactly once."""
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing))
    assert await store.add("counter", 5) == 5
    monkeypatch.undo()
    assert await store.get("counter", timeout=5) == b"5"


async def test_append_whose_answer_is_lost_after_landing_is_applied_once(
    store: AsyncEtcdStore, connection: rdzv.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that landed but lost its answer is not appended again."""
    await store.append("log", b"a")
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "before", skip=1))
    await store.append("log", b"b")
    monkeypatch.undo()
    assert await store.get("log", timeout=5) == b"ab"


@pytest.mark.parametrize("landing", ["before", "never"])
async def test_compare_set_whose_answer_is_lost_reports_the_swap(
    store: AsyncEtcdStore,
    connection: rdzv.Connection,
    monkeypatch: pytest.MonkeyPatch,
    landing: str,
) -> None:
    """A compare_set whose answer is lost still returns desired and leaves desired stored."""
    await store.set("key", b"old")
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, landing))
    assert await store.compare_set("key", b"old", b"new") == b"new"
    monkeypatch.undo()
    assert await store.get("key", timeout=5) == b"new"


async def test_multi_set_whose_answer_is_lost_is_sent_again(
    store: AsyncEtcdStore, connection: rdzv.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi_set whose answer is lost before it landed is sent again and lands."""
    monkeypatch.setattr(connection, "txn", LoseAnswers(connection, "never"))
    await store.multi_set(["a", "b"], [b"1", b"2"])
    monkeypatch.undo()
    assert await store.multi_get(["a", "b"], timeout=5) == [b"1", b"2"]
