"""The blocking facade of the scalable rendezvous, `rdzv.Rendezvous`, from plain threads."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

import rdzv


def facade(endpoints: str, key_prefix: str, **settings: object) -> rdzv.Rendezvous:
    """A facade of run id "job" under the test's prefix, two nodes by default."""
    arguments: dict[str, object] = {"min_nodes": 2, "max_nodes": 2, "lease_ttl": 2, **settings}
    return rdzv.Rendezvous(endpoints, "job", key_prefix=key_prefix, **arguments)  # type: ignore[arg-type]


def test_two_threads_complete_a_round(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """Two facades joined from two threads get ranks 0 and 1 of one round."""
    nodes = [facade(etcd_endpoints, etcd_key_prefix) for _ in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            joins = [pool.submit(node.join, b"node-%d" % index) for index, node in enumerate(nodes)]
            memberships = [join.result(timeout=30) for join in joins]
        assert sorted(m.rank for m in memberships) == [0, 1]
        assert memberships[0]._decision == memberships[1]._decision
    finally:
        for node in nodes:
            node.leave()


def test_a_departure_is_seen_from_a_blocked_thread(
    etcd_endpoints: str, etcd_key_prefix: str
) -> None:
    """wait_for_departure blocks its thread until a member leaves, and then returns True."""
    nodes = [facade(etcd_endpoints, etcd_key_prefix) for _ in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            memberships = list(pool.map(lambda node: node.join(), nodes, timeout=30))
        assert not nodes[0].wait_for_departure(memberships[0], timeout=0.3)
        nodes[1].leave()
        assert nodes[0].wait_for_departure(memberships[0], timeout=20)
    finally:
        for node in nodes:
            node.leave()


def test_close_is_seen_by_every_facade(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """After one facade closes the rendezvous, another one's join raises RendezvousClosedError."""
    closer, joiner = (facade(etcd_endpoints, etcd_key_prefix) for _ in range(2))
    try:
        closer.close()
        assert joiner.is_closed()
        with pytest.raises(rdzv.RendezvousClosedError):
            joiner.join()
    finally:
        closer.leave()
        joiner.leave()


def test_a_bad_argument_is_a_value_error_before_any_thread_starts(etcd_endpoints: str) -> None:
    """Bad settings raise ValueError naming them, and no event-loop thread is left behind."""
    before = threading.active_count()
    with pytest.raises(ValueError, match="min_nodes"):
        rdzv.Rendezvous(etcd_endpoints, "job", min_nodes=0, max_nodes=1)
    assert threading.active_count() == before


def test_leaving_twice_is_harmless(etcd_endpoints: str, etcd_key_prefix: str) -> None:
    """leave() closes the facade; a second leave() does nothing and raises nothing."""
    node = facade(etcd_endpoints, etcd_key_prefix)
    node.leave()
    node.leave()
    with pytest.raises(rdzv.RendezvousError, match="closed"):
        node.num_nodes_waiting()
