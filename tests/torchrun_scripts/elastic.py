"""A torchrun worker for the elastic tests: it trains until told to stop, or until a peer dies.

The directory `RDZV_TEST_FLAG_DIR` receives, for every worker process started:

- `worker-<pid>.json` as soon as the worker is in its process group: its parent (the agent)
  pid, group rank, rank, world size and restart count;
- `finished-<pid>.json` when it finishes successfully.

First run (`TORCHELASTIC_RESTART_COUNT` = 0): all-reduce in a loop. Every step also sums
whether each rank sees the file `stop` in that directory, so that all ranks stop at the same
step, check the sum and exit 0. When a peer node is killed, the all-reduce fails and the worker
exits 1, for its agent to restart it. Without either within `RDZV_TEST_TRAIN_SECONDS` (default
60), it exits 3, so that a test that never got that far fails. A restarted run all-reduces once
over the new world, checks the sum, and exits 0.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _write(path: Path, record: dict[str, int]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record))
    partial.replace(path)  # readers never see half a file


def main() -> int:
    """Train until stopped or a peer dies (first run), or check one all-reduce (restarted)."""
    flag_dir = Path(os.environ["RDZV_TEST_FLAG_DIR"])
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    record = {
        "pid": os.getpid(),
        "agent_pid": os.getppid(),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "rank": rank,
        "world_size": world_size,
        "restart": restart,
    }
    _write(flag_dir / f"worker-{os.getpid()}.json", record)
    expected = world_size * (world_size + 1) / 2
    tensor = torch.tensor([float(rank + 1), 0.0])
    if restart == 0:
        deadline = time.monotonic() + float(os.environ.get("RDZV_TEST_TRAIN_SECONDS", "60"))
        while True:
            if time.monotonic() > deadline:
                print(f"rank {rank}: neither stopped nor failed in time", flush=True)
                return 3
            stop = (flag_dir / "stop").exists()
            tensor = torch.tensor([float(rank + 1), float(stop)])
            dist.all_reduce(tensor)  # raises once a peer is gone
            if tensor[1].item() > 0:
                break
            time.sleep(0.1)
    else:
        dist.all_reduce(tensor)
    if tensor[0].item() != expected:
        print(f"rank {rank}: all_reduce gave {tensor[0].item()}, not {expected}", flush=True)
        return 1
    dist.barrier()
    dist.destroy_process_group()
    _write(flag_dir / f"finished-{os.getpid()}.json", record)
    print(f"rank {rank}/{world_size} (restart {restart}): sum {tensor[0].item():g} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
