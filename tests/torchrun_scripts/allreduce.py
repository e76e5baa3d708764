"""A torchrun worker: join the gloo group from the environment, all-reduce once, check the sum.

Every rank contributes `rank + 1`, so the sum is `W * (W + 1) / 2` for a world of `W` ranks.
Exits 0 on success, 1 on a wrong sum.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    """All-reduce `rank + 1` over the world torchrun set up, and check the sum."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if world_size != int(os.environ["WORLD_SIZE"]):
            print(f"rank {rank}: world size {world_size} != WORLD_SIZE", flush=True)
            return 1
        tensor = torch.tensor([float(rank + 1)])
        dist.all_reduce(tensor)
        expected = world_size * (world_size + 1) / 2
        if tensor.item() != expected:
            print(f"rank {rank}: all_reduce gave {tensor.item()}, not {expected}", flush=True)
            return 1
        dist.barrier()
        print(f"rank {rank}/{world_size}: sum {tensor.item():g} ok", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
