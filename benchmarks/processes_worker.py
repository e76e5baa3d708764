"""One node of the process shape (`processes.py`): an OS process with one torchrun handler.

A torchrun agent is a process of its own with one `RendezvousHandler` and its own connection;
so is this node. It is a fresh `python` (not a fork of anything that has imported torch), and
it makes its handler with the contender's `NodeFactory` of `rendezvous.py`, as torchrun makes
it.

The parent writes one JSON line with the node's settings (`contender`, `etcd`, `c10d`); the
node imports torch's rendezvous and rdzv (which torch's handler registry imports too, as in
an agent) and answers `{"event": "started", "cpu": <its CPU seconds so far>}`. Then each
command is one JSON line in, and one answer out:

- `{"op": "create", "run_id", "nodes", "min_nodes", "settings"}`: makes the handler (`--nnodes=
  min_nodes:nodes`, `settings` as `--rdzv-conf`); answers the seconds and CPU seconds it took.
- `{"op": "join", "at": T}`: at `time.monotonic() == T` calls `next_rendezvous()`, and answers
  when it returned: when (`time.monotonic()`), the rank and world size, and the CPU time of
  this process (`time.process_time()`: user + sys, every thread) from T until then, and the
  backend calls it made meanwhile. `time.monotonic` reads Linux's CLOCK_MONOTONIC, which every
  process of the machine shares: the parent gives every node one start time and compares the
  times they report. A join that raised torch's `RendezvousTimeoutError` answers `timed_out`.
- `{"op": "shutdown"}`: `handler.shutdown()` (torch's handler closes the rendezvous), then
  what it leaves open is closed.
- `{"op": "exit"}`, or the end of stdin: the process exits at once.

Answers go to the parent on what was this process's stdout; anything else it prints (torch,
gRPC) goes to stderr, which the parent keeps in a file. An error answers `{"event": "failed"}`
with the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, TextIO

Message = dict[str, Any]


class Node:
    """This process's handler, made and used as the parent commands."""

    def __init__(self, contender: str, etcd: str, c10d: str) -> None:
        import rendezvous

        factories = {cls.name: cls for cls in rendezvous.NODE_FACTORIES}
        self._factory = factories[contender](etcd, c10d)
        self._calls = rendezvous.Calls()
        self._made: rendezvous.Made | None = None

    def create(self, command: Message) -> Message:
        params = self._factory.parameters(
            command["run_id"],
            command["nodes"],
            min_nodes=command["min_nodes"],
            settings=command["settings"],
        )
        wall, cpu = time.monotonic(), time.process_time()
        self._made = self._factory.create(params, self._calls)
        return {
            "event": "created",
            "seconds": time.monotonic() - wall,
            "cpu": time.process_time() - cpu,
        }

    def join(self, command: Message) -> Message:
        from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

        assert self._made is not None, "join before create"
        handler, _ = self._made
        time.sleep(max(0.0, command["at"] - time.monotonic()))
        started, cpu, before = time.monotonic(), time.process_time(), self._calls.counts()
        answer: Message = {"event": "joined", "started": started}
        try:
            info = handler.next_rendezvous()
        except RendezvousTimeoutError:
            answer["timed_out"] = True
        else:
            answer.update(rank=info.rank, world_size=info.world_size)
        answer.update(at=time.monotonic(), cpu=time.process_time() - cpu)
        if self._factory.counts_calls:
            after = self._calls.counts()
            answer["calls"] = {
                "get_state": after.get_state - before.get_state,
                "set_state": after.set_state - before.set_state,
                "lost": after.lost - before.lost,
            }
        return answer

    def shutdown(self) -> Message:
        assert self._made is not None, "shutdown before create"
        handler, close = self._made
        self._made = None
        try:
            closed = handler.shutdown()
        finally:
            close()
        return {"event": "shut", "closed": closed}


def _serve(settings: Message, answers: TextIO) -> None:
    def answer(message: Message) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    node = Node(settings["contender"], settings["etcd"], settings["c10d"])
    answer({"event": "started", "cpu": time.process_time()})
    for line in sys.stdin:
        command: Message = json.loads(line)
        operation = command["op"]
        if operation == "exit":
            return
        try:
            if operation == "create":
                answer(node.create(command))
            elif operation == "join":
                answer(node.join(command))
            elif operation == "shutdown":
                answer(node.shutdown())
            else:
                raise ValueError(f"unknown command {operation!r}")
        except BaseException:
            answer({"event": "failed", "reason": traceback.format_exc()})


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    settings: Message = json.loads(sys.stdin.readline())
    try:
        from rendezvous import quiet_torch

        with quiet_torch():
            _serve(settings, answers)
    except BaseException:
        answers.write(json.dumps({"event": "failed", "reason": traceback.format_exc()}) + "\n")
    answers.flush()
    # At once: the handler's keep-alive threads and rdzv's loop thread are not waited for (a
    # node that did not shut its handler down is a node that died).
    os._exit(0)


if __name__ == "__main__":
    main()
