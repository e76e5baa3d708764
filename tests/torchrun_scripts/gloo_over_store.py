"""One rank of a gloo process group whose store is rdzv's EtcdStore, not a TCPStore.

Usage: python gloo_over_store.py ENDPOINT STORE_PREFIX RANK WORLD_SIZE

Each rank creates its own backend and store with `rdzv.torch.create_backend`, joins the group
through the store, all-reduces `rank + 1` and checks the sum; it exits 0 on success.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv.torch import create_backend


def main() -> int:
    """Join the group, all-reduce once, and check the result."""
    endpoint, store_prefix, rank_text, world_size_text = sys.argv[1:]
    rank, world_size = int(rank_text), int(world_size_text)
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=endpoint,
        run_id="gloo",
        min_nodes=1,
        max_nodes=1,
        store_prefix=store_prefix,
        read_timeout="10",
    )
    backend, store = create_backend(params)
    try:
        store.set_timeout(datetime.timedelta(seconds=30))
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=30),
        )
        try:
            tensor = torch.tensor([float(rank + 1)])
            dist.all_reduce(tensor)
            expected = world_size * (world_size + 1) / 2
            if tensor.item() != expected:
                print(f"rank {rank}: all_reduce gave {tensor.item()}, not {expected}")
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
