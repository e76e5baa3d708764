"""One rank of a gloo job on clones of rdzv's EtcdStore, sharing work through a store queue.

Usage: python gloo_clones_and_queues.py ENDPOINT STORE_PREFIX RANK WORLD_SIZE

Each rank creates its store with `rdzv.torch.create_backend` and joins the group with a clone
of it, to which it keeps no reference of its own (torch's C++ side holds it). Each rank pushes
three items to the queue "tasks"; after a barrier, a thread of each rank, on a clone of its
own, pops items without blocking until the queue is empty. The ranks all-reduce how many they
got and publish which at a store key, and rank 0 checks that every item was popped exactly once.
Then rank 1 pushes a reply that rank 0 waits for with a blocking pop. It prints "ok" and exits 0
on success.
"""

from __future__ import annotations

import datetime
import sys
import threading

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv.torch import EtcdStore, create_backend

TIMEOUT = datetime.timedelta(seconds=30)


def drain(store: EtcdStore, into: list[str]) -> None:
    """Pop "tasks" until it is empty, without blocking."""
    while True:
        try:
            into.append(store.queue_pop("tasks", block=False).decode())
        except dist.QueueEmptyError:
            return


def main() -> int:
    """Join through a clone, share the queue, check."""
    endpoint, store_prefix, rank_text, world_size_text = sys.argv[1:]
    rank, world_size = int(rank_text), int(world_size_text)
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=endpoint,
        run_id="gloo-queues",
        min_nodes=1,
        max_nodes=1,
        store_prefix=store_prefix,
        read_timeout="10",
    )
    backend, store = create_backend(params)
    try:
        store.set_timeout(TIMEOUT)
        dist.init_process_group(
            "gloo", store=store.clone(), rank=rank, world_size=world_size, timeout=TIMEOUT
        )
        try:
            tensor = torch.tensor([float(rank + 1)])
            dist.all_reduce(tensor)
            if tensor.item() != world_size * (world_size + 1) / 2:
                print(f"rank {rank}: all_reduce gave {tensor.item()}")
                return 1
            for index in range(3):
                store.queue_push("tasks", f"{rank}-{index}")
            dist.barrier()
            got: list[str] = []
            worker = threading.Thread(target=drain, args=(store.clone(), got))
            worker.start()
            worker.join(timeout=60)
            count = torch.tensor([float(len(got))])
            dist.all_reduce(count)
            store.set(f"got/{rank}", ",".join(got))
            if count.item() != 3 * world_size:
                print(f"rank {rank}: {count.item()} items popped in all, not {3 * world_size}")
                return 1
            if rank == 0:
                published = store.multi_get([f"got/{r}" for r in range(world_size)])
                popped = sorted(
                    item for text in published for item in text.decode().split(",") if item
                )
                expected = sorted(f"{r}-{i}" for r in range(world_size) for i in range(3))
                if popped != expected:
                    print(f"rank {rank}: popped {popped}, not {expected}")
                    return 1
            if rank == 1:
                store.queue_push("reply", "from rank 1")
            if rank == 0 and store.queue_pop("reply") != b"from rank 1":
                print("rank 0: wrong reply")
                return 1
            dist.barrier()
        finally:
            dist.destroy_process_group()
    finally:
        backend.facade.close()
    print(f"rank {rank}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
