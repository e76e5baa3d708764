"""`rdzv check`: whether etcd, the credentials and torchrun are ready for a rendezvous.

Each check gives a `Finding`: what it looked at, whether it passed, what it found, how long its
round trip took, and, when it failed, what to do about it. The checks in order: every endpoint
on its own connection (reachable, how fast, which member and version); the cluster (members,
leader, alarms, versions); authentication (on or off, the user, its roles); a write, a read, a
watch and a delete of a scratch key under the rendezvous prefix and under the store prefix;
and whether torch is installed and torchrun finds the `etcd-v3` handler. Without torch, the torch
checks are skipped (an operator's machine) unless they are required (`rdzv check --torch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import anyio

from rdzv._errors import (
    RendezvousAuthError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTLSError,
)
from rdzv._etcd import Connection
from rdzv._etcd._admin import (
    MemberStatus,
    auth_enabled,
    member_list,
    member_status,
    open_watch,
    user_roles,
)

__all__ = ["Finding", "Target", "passed", "run_checks", "to_json", "to_text", "torch_findings"]

HANDLER_NAME: Final = "etcd-v3"
"""The name torchrun knows rdzv's rendezvous handler by (`--rdzv-backend`)."""

_HANDLER_GROUP: Final = "torchrun.handlers"
_SCRATCH_TTL: Final = 60
_SCRATCH_VALUE: Final = b"written by rdzv check; deleted at once"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    topic: str
    """What was checked: `endpoint`, `cluster`, `auth`, `rendezvous`, `rounds`, `store`, `torch`."""
    name: str
    """Which part of it: an endpoint, `members`, `write`, ..."""
    ok: bool
    detail: str
    """What was found (or what went wrong)."""
    seconds: float | None = None
    """The round trip to etcd, when the check made one."""
    fix: str | None = None
    """For a failed check: what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What to check: the endpoints, how to connect to them, and the key prefixes."""

    endpoints: tuple[str, ...]
    connect: Callable[[str], Connection]
    """A connection (not yet open) to the given endpoints, `host:port[,...]`."""
    key_prefix: str
    """Where the rendezvous states live; the scratch key is `{key_prefix}/rdzv-check-...`."""
    rounds_prefix: str
    """Where `rdzv.AsyncRendezvous` (and torchrun's `etcd-v3-rounds`) keeps its rounds."""
    store_prefix: str
    """Where the store's keys live (ends with `/`)."""
    username: str | None
    read_timeout: float
    torch: bool | None = None
    """Check torch: None if it is installed, True always (it must be), False never."""


async def _timed(call: Awaitable[T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


def _why(error: RendezvousError, read_timeout: float) -> str:
    """One line saying why a call failed."""
    if type(error) is RendezvousConnectionError:
        message = f"did not answer within {read_timeout:g} s"
        if error.code is not None:
            message += f" ({error.code}: {error.details})"
        return message
    return " ".join(str(error).split())


# ------------------------------------------------------------------------------- endpoints


def _unreachable_fix(error: RendezvousError, endpoint: str) -> str:
    if isinstance(error, RendezvousTLSError):
        return "Check --protocol, --ca-cert, --ssl-cert and --ssl-cert-key against etcd's TLS."
    if isinstance(error, RendezvousAuthError):
        return "Check --username and the password (--password-file or RDZV_ETCD_PASSWORD)."
    return (
        f"Check that etcd runs at {endpoint} and that this machine reaches it (a firewall; "
        "etcd's --listen-client-urls), or leave the endpoint out of --endpoints."
    )


async def _endpoint(target: Target, endpoint: str) -> tuple[Finding, MemberStatus | None]:
    """Whether `endpoint` answers on a connection of its own, and what its member says."""
    try:
        async with target.connect(endpoint) as connection:
            status, seconds = await _timed(member_status(connection))
    except RendezvousError as error:
        why = _why(error, target.read_timeout)
        fix = _unreachable_fix(error, endpoint)
        return Finding("endpoint", endpoint, False, f"unreachable: {why}", fix=fix), None
    detail = f"etcd {status.version}, member {status.member_id:x}"
    return Finding("endpoint", endpoint, True, detail, seconds), status


async def _endpoints(target: Target) -> list[tuple[Finding, MemberStatus | None]]:
    results: list[tuple[Finding, MemberStatus | None]] = [
        (Finding("endpoint", endpoint, False, "not checked"), None) for endpoint in target.endpoints
    ]

    async def one(index: int) -> None:
        results[index] = await _endpoint(target, target.endpoints[index])

    async with anyio.create_task_group() as group:
        for index in range(len(target.endpoints)):
            group.start_soon(one, index)
    return results


# --------------------------------------------------------------------------------- cluster


def _leader(statuses: Sequence[MemberStatus], names: dict[int, str]) -> Finding:
    leaders = {status.leader for status in statuses}
    if leaders == {0} or not leaders:
        return Finding(
            "cluster",
            "leader",
            False,
            "no member knows a leader",
            fix="The cluster lost its quorum: start the stopped members so that a majority runs.",
        )
    if len(leaders) > 1:
        shown = ", ".join(f"{leader:x}" for leader in sorted(leaders))
        return Finding("cluster", "leader", False, f"the members disagree: {shown}")
    (leader,) = leaders
    return Finding("cluster", "leader", True, f"{names.get(leader, '?')} ({leader:x})")


def _health(statuses: Sequence[MemberStatus]) -> Finding:
    alarms = sorted({alarm for status in statuses for alarm in status.alarms})
    if alarms:
        return Finding(
            "cluster",
            "health",
            False,
            f"alarms: {'; '.join(alarms)}",
            fix="Mend the cause (out of space: etcdctl compact, then etcdctl defrag), then "
            "run etcdctl alarm disarm.",
        )
    return Finding("cluster", "health", True, f"no alarms on {len(statuses)} answering member(s)")


def _versions(statuses: Sequence[MemberStatus]) -> Finding:
    versions = sorted({status.version for status in statuses})
    return Finding("cluster", "version", True, f"etcd {', '.join(versions)}")


async def _cluster(connection: Connection, statuses: Sequence[MemberStatus]) -> list[Finding]:
    try:
        members, seconds = await _timed(member_list(connection))
    except RendezvousError as error:
        why = _why(error, connection.read_timeout)
        return [Finding("cluster", "members", False, f"cannot list them: {why}")]
    names = {member.id: member.name or "(unstarted)" for member in members}
    shown = ", ".join(
        f"{names[member.id]} {','.join(member.client_urls) or '-'}"
        + (" (learner)" if member.is_learner else "")
        for member in members
    )
    listing = Finding("cluster", "members", True, f"{len(members)}: {shown}", seconds)
    return [listing, _leader(statuses, names), _health(statuses), _versions(statuses)]


# ------------------------------------------------------------------------------------ auth


@dataclasses.dataclass(frozen=True)
class _Auth:
    enabled: bool | None
    roles: tuple[str, ...]


async def _auth(connection: Connection, username: str | None) -> tuple[list[Finding], _Auth]:
    try:
        enabled, seconds = await _timed(auth_enabled(connection, username))
    except RendezvousError as error:
        why = _why(error, connection.read_timeout)
        return [Finding("auth", "status", False, f"unknown: {why}")], _Auth(None, ())
    if not enabled:
        detail = "off" + (f"; --username {username!r} is not needed" if username else "")
        return [Finding("auth", "status", True, detail, seconds)], _Auth(False, ())
    if username is None:
        fix = "Pass --username, and the password with --password-file or RDZV_ETCD_PASSWORD."
        finding = Finding("auth", "status", False, "on, and no --username given", seconds, fix)
        return [finding], _Auth(True, ())
    try:
        roles, seconds = await _timed(user_roles(connection, username))
    except RendezvousError as error:
        why = _why(error, connection.read_timeout)
        return [Finding("auth", "user", False, f"{username}: {why}")], _Auth(True, ())
    detail = f"on; user {username}, roles: {', '.join(roles) or 'none'}"
    return [Finding("auth", "status", True, detail, seconds)], _Auth(True, roles)


def _grant(prefix: str, auth: _Auth, username: str | None) -> str:
    """What to run so that the user may read and write under `prefix`."""
    grant = f"etcdctl role grant-permission {{role}} readwrite --prefix=true {prefix}"
    if auth.roles:
        return "Run: " + grant.format(role=auth.roles[0])
    if username is None:
        return "Pass --username, and the password with --password-file or RDZV_ETCD_PASSWORD."
    return (
        "Run: etcdctl role add ROLE; "
        + grant.format(role="ROLE")
        + f"; etcdctl user grant-role {username} ROLE"
    )


# ------------------------------------------------------------------------------------ keys


async def _operation(
    topic: str, name: str, call: Awaitable[str], fix: str, read_timeout: float
) -> Finding:
    try:
        detail, seconds = await _timed(call)
    except RendezvousError as error:
        why = _why(error, read_timeout)
        return Finding(topic, name, False, why, fix=fix if _refused(error) else None)
    return Finding(topic, name, True, detail, seconds)


def _refused(error: RendezvousError) -> bool:
    return isinstance(error, RendezvousAuthError) or error.code == "PERMISSION_DENIED"


async def _keys(
    connection: Connection, topic: str, key: bytes, fix: str, lease: int
) -> list[Finding]:
    """A write, a read, a watch and a delete of the scratch key `key`, each timed."""

    async def write() -> str:
        await connection.put(key, _SCRATCH_VALUE, lease=lease)
        return f"wrote {key.decode()}"

    async def read() -> str:
        found = await connection.get(key)
        if found is None:
            return "read: no key (the write failed)"
        return f"read back {len(found.value)} bytes"

    async def watch() -> str:
        await open_watch(connection, key)
        return "etcd created the watch"

    async def delete() -> str:
        deleted = await connection.delete(key)
        return f"deleted {deleted} key"

    timeout = connection.read_timeout
    return [
        await _operation(topic, name, step(), fix, timeout)
        for name, step in (("write", write), ("read", read), ("watch", watch), ("delete", delete))
    ]


async def _scratch_lease(connection: Connection) -> int:
    """A short lease for the scratch keys, so that they expire even if a delete fails."""
    try:
        return await connection.grant_lease(_SCRATCH_TTL)
    except RendezvousError:
        return 0  # the writes then fail or succeed on their own; the deletes remove them


async def _all_keys(target: Target, connection: Connection, auth: _Auth) -> list[Finding]:
    scratch = f"rdzv-check-{uuid.uuid4().hex[:12]}"
    lease = await _scratch_lease(connection)
    findings: list[Finding] = []
    for topic, prefix, key in (
        ("rendezvous", f"{target.key_prefix}/", f"{target.key_prefix}/{scratch}"),
        ("rounds", f"{target.rounds_prefix}/", f"{target.rounds_prefix}/{scratch}"),
        ("store", target.store_prefix, f"{target.store_prefix}{scratch}"),
    ):
        fix = _grant(prefix, auth, target.username)
        findings += await _keys(connection, topic, key.encode(), fix, lease)
    if lease:
        # Its scratch keys are deleted already, and it expires by itself: not a finding.
        with contextlib.suppress(RendezvousError):
            await connection.revoke_lease(lease)
    return findings


# ---------------------------------------------------------------------------------- etcd


async def run_checks(target: Target) -> list[Finding]:
    """Every etcd check, in order; then `torch_findings()`."""
    endpoints = await _endpoints(target)
    findings = [finding for finding, _ in endpoints]
    statuses = [status for _, status in endpoints if status is not None]
    reachable = [finding.name for finding in findings if finding.ok]
    if not reachable:
        fix = "Make at least one endpoint reachable (see above)."
        findings.append(Finding("cluster", "members", False, "not checked: no endpoint", fix=fix))
        return findings + torch_findings(target.torch)
    try:
        async with target.connect(",".join(reachable)) as connection:
            findings += await _cluster(connection, statuses)
            auth_findings, auth = await _auth(connection, target.username)
            findings += auth_findings
            findings += await _all_keys(target, connection, auth)
    except RendezvousError as error:
        why = _why(error, target.read_timeout)
        findings.append(Finding("cluster", "connection", False, why))
    return findings + torch_findings(target.torch)


# ----------------------------------------------------------------------------------- torch


def _load(entry_point: importlib.metadata.EntryPoint) -> Finding:
    """Load a handler entry point as torch's registry does: load it, call it for the creator."""
    name = entry_point.name
    try:
        creator = entry_point.load()()
    except Exception as error:
        detail = f"{entry_point.value} fails: {type(error).__name__}: {error}"
        fix = f"Mend the error above: torchrun only logs it as a warning, then lacks {name}."
        return Finding("torch", name, False, " ".join(detail.split()), fix=fix)
    if not callable(creator):
        detail = f"{entry_point.value} returned {type(creator).__name__}, not a handler creator"
        return Finding("torch", name, False, detail)
    source = entry_point.dist.name if entry_point.dist is not None else "?"
    return Finding("torch", name, True, f"{entry_point.value} (from {source})")


def _handlers() -> list[Finding]:
    """Whether torchrun finds `etcd-v3`, and every other handler rdzv declares, and loads them."""
    found = importlib.metadata.entry_points(group=_HANDLER_GROUP)
    ours = [point for point in found if point.value.startswith("rdzv.")]
    if HANDLER_NAME not in found.names:
        missing = Finding(
            "torch",
            HANDLER_NAME,
            False,
            f"no {_HANDLER_GROUP} entry point named {HANDLER_NAME}",
            fix="Install rdzv in the environment that runs torchrun (pip install rdzv).",
        )
        return [missing, *(_load(point) for point in ours)]
    first = found[HANDLER_NAME]  # the one torch registers, whoever declares it
    return [_load(first), *(_load(point) for point in ours if point.name != HANDLER_NAME)]


def _torch_loads_handlers() -> bool | None:
    """Whether the installed torch loads `torchrun.handlers` (None: cannot tell).

    Read from torch's source rather than by importing it, which takes seconds.
    """
    registry = "torch/distributed/elastic/rendezvous/registry.py"
    try:
        path = importlib.metadata.distribution("torch").locate_file(registry)
        text = Path(str(path)).read_text(encoding="utf-8")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return _HANDLER_GROUP in text


def torch_findings(required: bool | None = None) -> list[Finding]:
    """Whether torch is installed, loads handler entry points, and finds `etcd-v3`.

    `required`: None checks torch if it is installed, and passes saying "skipped" if not (a
    machine that only talks to etcd needs no torch); True fails without torch; False checks
    nothing of torch.
    """
    if required is False:
        return [Finding("torch", "installed", True, "not checked (--no-torch)")]
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        if not required:
            return [Finding("torch", "installed", True, "not installed (skipped)")]
        fix = "Install torch in the environment that runs torchrun (pip install torch)."
        return [Finding("torch", "installed", False, "torch is not installed", fix=fix)]
    findings = [Finding("torch", "installed", True, f"torch {version}")]
    if _torch_loads_handlers() is False:
        detail = f"torch {version} does not load {_HANDLER_GROUP} entry points"
        fix = "Upgrade torch: this one cannot find out-of-tree rendezvous handlers."
        findings.append(Finding("torch", "handlers", False, detail, fix=fix))
    return findings + _handlers()


# ---------------------------------------------------------------------------------- output


def passed(findings: Sequence[Finding]) -> bool:
    """Whether every check passed."""
    return all(finding.ok for finding in findings)


def to_json(findings: Sequence[Finding]) -> dict[str, object]:
    """The findings as one JSON object: `ok`, and `checks` in order."""
    return {"ok": passed(findings), "checks": [dataclasses.asdict(f) for f in findings]}


def to_text(findings: Sequence[Finding]) -> Iterator[str]:
    """The findings as a table, a failed check's fix on the line below it."""
    topic_width = max(len(finding.topic) for finding in findings)
    name_width = max(len(finding.name) for finding in findings)
    for finding in findings:
        time = "" if finding.seconds is None else f"{finding.seconds * 1000:.1f} ms"
        yield (
            f"{'ok' if finding.ok else 'FAIL':<4}  {finding.topic:<{topic_width}}  "
            f"{finding.name:<{name_width}}  {time:>9}  {finding.detail}"
        )
        if finding.fix is not None:
            yield f"{'':<4}  fix: {finding.fix}"
