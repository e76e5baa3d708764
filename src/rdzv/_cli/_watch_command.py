"""`rdzv watch`: the rendezvous of a job live, one line per change, until Ctrl-C."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import signal
import sys

import anyio
import click

from rdzv import _inspect
from rdzv._cli._connection_options import EtcdOptions, connection_options, run_on_etcd
from rdzv._cli._job_options import ROUNDS_PREFIX_OPTION, RUN_ID_OPTION, valid_rounds_prefix
from rdzv._cli._output import EXIT_CODES, leaves, one_line
from rdzv._errors import RendezvousAuthError, RendezvousStateError
from rdzv._etcd import Connection, WatchEvent
from rdzv._rendezvous._layout import Layout, decode_decision
from rdzv._rendezvous._view import RoundsView, members, shown_info, view_rounds
from rdzv._rendezvous._view import to_json as rounds_to_json


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def _stamped(record: dict[str, object], text: str, as_json: bool) -> str:
    """One line of `watch`: the local time, then `text`; or `record` with its time, as JSON."""
    at = _now()
    if as_json:
        return json.dumps({"time": at.isoformat(timespec="milliseconds"), **record})
    return f"{at.strftime('%H:%M:%S.%f')[:-3]}  {text}"


def _watch_line(
    inspection: _inspect.Inspection | None, key: str, revision: int, as_json: bool
) -> str:
    if inspection is None:
        record: dict[str, object] = {"key": key, "revision": revision, "deleted": True}
        return _stamped(record, f"revision {revision}  deleted (or expired)", as_json)
    record = {**_inspect.to_json(inspection), "deleted": False}
    return _stamped(record, _inspect.summary(inspection), as_json)


def _rounds_now_line(view: RoundsView, as_json: bool) -> str:
    """The rounds as `watch` first finds them."""
    text = f"revision {view.revision}  rounds  {'closed' if view.closed else 'open'}"
    if view.error is not None:
        text += f"  not an rdzv rendezvous: {shown_info(view.error.encode())}"
    text += f"  latest complete round {view.latest or 'none'}"
    for round_ in view.rounds:
        if round_.complete:
            text += f"  {members(round_.count)}"
        elif round_.count:
            text += f"  round {round_.number}: {round_.count} waiting"
    return _stamped({"rounds": {**rounds_to_json(view), "event": "current"}}, text, as_json)


@dataclasses.dataclass(frozen=True)
class _RoundsChange:
    """A change of a job's rounds that `watch` shows, on one line."""

    revision: int
    event: str
    """`opened`, `complete`, `departed`, `closed`, `deleted`, or `foreign` (not rdzv's)."""
    round: int | None = None
    members: int | None = None
    """`complete`: how many members the round has (the world size)."""
    detail: str | None = None
    """`opened`: the first waiting node's info; `departed`: the member id of the first member
    gone; `foreign`: what is wrong (escaped)."""

    def line(self, base: str, as_json: bool) -> str:
        what = {
            "opened": f"round {self.round} opened: a node waits"
            + (f" ({self.detail})" if self.detail else ""),
            "complete": f"round {self.round} complete, {members(self.members or 0)}",
            "departed": f"round {self.round}: member {self.detail} is gone (it left, joined "
            "again, or its lease expired); the others rendezvous again",
            "closed": "closed: nobody can join any more",
            "deleted": "deleted: the latest round number is gone (rdzv reset?)",
            "foreign": f"round {self.round}: not an rdzv rendezvous: {self.detail}",
        }[self.event]
        record = {"base": base, **dataclasses.asdict(self)}
        return _stamped({"rounds": record}, f"revision {self.revision}  rounds  {what}", as_json)


class _RoundsFollower:
    """Turns the changes under a job's rounds into the lines that `watch` shows.

    New rounds, completions, departures and the close. A node that joins an open round is not a
    line of its own: with 10,000 nodes, that would be 10,000 lines.
    """

    def __init__(self, layout: Layout, view: RoundsView) -> None:
        self._layout = layout
        self._latest = view.latest
        self._seen = {round_.number for round_ in view.rounds if round_.complete or round_.count}
        self._departed = {round_.number for round_ in view.rounds if round_.departed}

    def change(self, event: WatchEvent) -> _RoundsChange | None:
        """The change that `event` makes, if it is one to show."""
        kv, layout = event.kv, self._layout
        revision = kv.mod_revision
        if kv.key == layout.closed:
            return None if event.deleted else _RoundsChange(revision, "closed")
        if kv.key == layout.latest:
            if not event.deleted:
                return None
            self._latest, self._seen, self._departed = 0, set(), set()
            return _RoundsChange(revision, "deleted")
        parts = kv.key[len(layout.base) :].split(b"/")
        if len(parts) != 4 or parts[0] != b"round" or not parts[1].isdigit():
            return None
        number, kind, name = int(parts[1]), parts[2], parts[3]
        if event.deleted:
            # The first member of the latest round to go (not every one: a job of 10,000 nodes
            # that ends would print 10,000 lines). The coordinator writes `departed` for it too,
            # unless it was the one that went.
            if kind == b"m" and number == self._latest and number not in self._departed:
                self._departed.add(number)
                return _RoundsChange(revision, "departed", number, detail=shown_info(name))
            return None
        if kind == b"m" and number > self._latest and number not in self._seen:
            self._seen.add(number)
            return _RoundsChange(revision, "opened", number, detail=shown_info(kv.value) or None)
        if kind == b"c" and name == b"done":
            self._seen.add(number)
            self._latest = max(self._latest, number)
            try:
                size = decode_decision(kv.value, key=kv.key).size
            except RendezvousStateError as foreign:
                detail = shown_info(str(foreign).encode())
                return _RoundsChange(revision, "foreign", number, detail=detail)
            return _RoundsChange(revision, "complete", number, members=size)
        if kind == b"c" and name == b"departed" and number not in self._departed:
            self._departed.add(number)
            return _RoundsChange(revision, "departed", number, detail=shown_info(kv.value))
        return None


def _watch_hint(key: str, base: str, state: bool, rounds: bool) -> str | None:
    """What `watch` found where, when it is not both: which kind of job this is, or neither."""
    if state and not rounds:
        return f"a state at {key}, no rounds under {base}: an etcd-v3 job; showing its state."
    if rounds and not state:
        return (
            f"no state at {key}, but rounds under {base}: an etcd-v3-rounds job "
            "(rdzv.AsyncRendezvous); showing its rounds."
        )
    if not state:
        return (
            f"nothing at {key} nor under {base} yet; waiting for either (are --run-id, "
            "--key-prefix and --rounds-prefix the job's?)."
        )
    return None


async def _follow_changes(
    connection: Connection, etcd: EtcdOptions, run_id: str, rounds_prefix: str, as_json: bool
) -> None:
    """Print the state and the rounds of `run_id` as they are, then every change of them."""
    key = etcd.key(run_id)
    layout = Layout(rounds_prefix, run_id)
    base = layout.base.decode()
    refusals: list[RendezvousAuthError] = []  # a user may read one of the two places only
    state_from: int | None = None
    view: RoundsView | None = None
    state = False
    try:
        state_from, state = await _show_state(connection, key, etcd.state_key, as_json)
    except RendezvousAuthError as refused:
        refusals.append(refused)
    try:
        view = await _show_rounds(connection, rounds_prefix, run_id, as_json)
    except RendezvousAuthError as refused:
        refusals.append(refused)
    if view is None and state_from is None:
        raise refusals[0]
    click.echo(_watching(key, base, state_from, view), err=True)
    for refusal in refusals:
        click.echo(f"rdzv watch: not watched: {one_line(refusal, etcd)}", err=True)
    if not refusals:
        hint = _watch_hint(key, base, state, view is not None and view.exists)
        if hint is not None:
            click.echo(f"rdzv watch: {hint}", err=True)

    async with anyio.create_task_group() as following:
        if state_from is not None:
            following.start_soon(
                _follow_state, connection, key, etcd.state_key, state_from, as_json
            )
        if view is not None:
            follower = _RoundsFollower(layout, view)
            following.start_soon(
                _follow_rounds, connection, layout, follower, view.revision + 1, as_json
            )


async def _show_state(
    connection: Connection, key: str, state_key: bytes | None, as_json: bool
) -> tuple[int, bool]:
    """Print the state at `key`, if there is one; the revision to watch from, and whether it is."""
    kvs, revision = await connection.range(key.encode())
    if kvs:
        inspection = _inspect.examine(kvs[0], key, state_key=state_key)
        click.echo(_watch_line(inspection, key, kvs[0].mod_revision, as_json))
    return revision + 1, bool(kvs)


async def _show_rounds(
    connection: Connection, rounds_prefix: str, run_id: str, as_json: bool
) -> RoundsView:
    """Print the rounds of `run_id`, if there are any; what was found (watch from after it)."""
    view = await view_rounds(connection, rounds_prefix, run_id)
    if view.exists:
        click.echo(_rounds_now_line(view, as_json))
    return view


def _watching(key: str, base: str, state_from: int | None, view: RoundsView | None) -> str:
    """The line on stderr that says what `watch` follows, from which revision."""
    watching = []
    if state_from is not None:
        watching.append(f"{key} from revision {state_from}")
    if view is not None:
        watching.append(f"the rounds under {base} from revision {view.revision + 1}")
    return f"Watching {', and '.join(watching)}; Ctrl-C to stop."


async def _follow_state(
    connection: Connection, key: str, state_key: bytes | None, start: int, as_json: bool
) -> None:
    """Print a line for every change of the state at `key`, from revision `start` on."""
    changes = connection.watch(key.encode(), start_revision=start)
    try:
        async for event in changes:
            inspection = None
            if not event.deleted:
                inspection = _inspect.examine(event.kv, key, state_key=state_key)
            click.echo(_watch_line(inspection, key, event.kv.mod_revision, as_json))
    finally:
        await changes.aclose()


async def _follow_rounds(
    connection: Connection, layout: Layout, follower: _RoundsFollower, start: int, as_json: bool
) -> None:
    """Print a line for every change under the rounds that `follower` shows, from `start` on."""
    base = layout.base.decode()
    changes = connection.watch(layout.base, start_revision=start, prefix=True)
    try:
        async for event in changes:
            change = follower.change(event)
            if change is not None:
                click.echo(change.line(base, as_json))
    finally:
        await changes.aclose()


@click.command(epilog=EXIT_CODES)
@RUN_ID_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@ROUNDS_PREFIX_OPTION
@connection_options
def watch(etcd: EtcdOptions, run_id: str, as_json: bool, rounds_prefix: str) -> None:
    """Follow the rendezvous of a job live, one line per change.

    Prints the current state first, if there is one, then a line for every change: its time, the
    revision and size, and for a PyTorch rendezvous state its round, whether it is complete or
    closed, and how many nodes take part, wait, or are redundant.

    For a job of rdzv.AsyncRendezvous (torchrun's etcd-v3-rounds), under --rounds-prefix: the
    rounds as they are, then a line when a round opens (a node waits in it), completes (with its
    number of members), loses a member, and when the rendezvous closes. A line on stderr says
    which of the two it found, or that it found neither yet.

    Runs until Ctrl-C (or SIGTERM), then exits 0.
    """
    etcd.key(run_id)  # validates the run id
    prefix = valid_rounds_prefix(rounds_prefix)

    async def follow(connection: Connection) -> None:
        # Ctrl-C and SIGTERM end the watch normally: cancel this task, and take that as done.
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        stopping = asyncio.Event()

        def stop() -> None:
            stopping.set()
            task.cancel()

        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, stop)
        try:
            await _follow_changes(connection, etcd, run_id, prefix, as_json)
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    try:
        run_on_etcd("watch", etcd, follow)
    except KeyboardInterrupt:
        pass  # Ctrl-C before the watch started
    except Exception as error:
        # The reader went away (`rdzv watch ... | head -3`): that is how a pipe ends.
        if not all(isinstance(leaf, BrokenPipeError) for leaf in leaves(error)):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
