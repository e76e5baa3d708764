"""A process that pops from a queue of rdzv's EtcdStore while the test's process pushes.

Usage: python queue_worker.py ENDPOINT STORE_PREFIX NAME MODE

The worker first pushes NAME to the queue "ready", so that the test knows it has started (by
popping that queue), then:

- MODE "drain": waits for the key "go", pops the queue "items" without blocking until it is
  empty, and prints "popped HEX" for each item it got;
- MODE "one": pops one item from the queue "work", blocking (up to 30 s), and prints it so.

It prints "done" last and exits 0; an error ends it with a traceback and another exit code.
"""

from __future__ import annotations

import datetime
import sys

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv.torch import create_backend


def main() -> int:
    """Announce, then pop as MODE says."""
    endpoint, store_prefix, name, mode = sys.argv[1:]
    params = RendezvousParameters(
        backend="etcd-v3",
        endpoint=endpoint,
        run_id="queues",
        min_nodes=1,
        max_nodes=1,
        store_prefix=store_prefix,
        read_timeout="10",
    )
    backend, store = create_backend(params)
    try:
        store.set_timeout(datetime.timedelta(seconds=30))
        store.queue_push("ready", name)
        if mode == "drain":
            store.wait(["go"])
            while True:
                try:
                    item = store.queue_pop("items", block=False)
                except dist.QueueEmptyError:
                    break
                print("popped", item.hex(), flush=True)
        else:
            print("popped", store.queue_pop("work").hex(), flush=True)
    finally:
        backend.facade.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
