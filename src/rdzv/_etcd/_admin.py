"""The etcd calls that only an operator's tool needs: members, status, auth, a watch's creation.

`rdzv check` asks etcd about itself here. Every call goes through the attempt driver of a
`Connection`, so it has the connection's deadline, failover, authentication and error
translation. `Connection` exposes the calls that rdzv's rendezvous and store use; these use its
`Links` (the channel and its token) directly, and build the stub of the service they need on the
current channel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aetcd import rpc

from rdzv._errors import RendezvousAuthError, RendezvousError
from rdzv._etcd import _calls
from rdzv._etcd._attempts import drive
from rdzv._etcd._connection import Connection, _finish, read_deadline
from rdzv._etcd._connection import open_watch as open_stream
from rdzv._etcd._links import Link, Links

__all__ = [
    "Member",
    "MemberStatus",
    "auth_enabled",
    "member_list",
    "member_status",
    "open_watch",
    "user_roles",
]


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of the cluster, as `Cluster.MemberList` lists it."""

    id: int
    name: str
    client_urls: tuple[str, ...]
    is_learner: bool


@dataclasses.dataclass(frozen=True)
class MemberStatus:
    """What one member says of itself (`Maintenance.Status`)."""

    member_id: int
    version: str
    leader: int
    """The member id of the raft leader this member knows; 0: none."""
    db_size: int
    alarms: tuple[str, ...]
    """Alarms and errors the member reports (for example, that it is out of space)."""


def _links(connection: Connection) -> Links:
    # Connection keeps its channels private: these calls are not part of its public surface.
    links: Links = connection._links
    return links


async def _call(connection: Connection, service: str, method: str, request: Any, what: str) -> Any:
    """Send one idempotent request to `service.method`, retried as the connection retries."""
    links = _links(connection)

    async def send(link: Link, timeout: float) -> Any:
        stub = getattr(rpc, f"{service}Stub")(link.channel)
        call = getattr(stub, method)(request, timeout=timeout, metadata=links.metadata())
        response = await _calls.unary(call)
        links.verify(link, response.header)
        return response

    return await drive(links, send, what=what, deadline=read_deadline(connection))


async def member_status(connection: Connection) -> MemberStatus:
    """The status of the member that the connection talks to."""
    response = await connection.status()
    return MemberStatus(
        member_id=int(response.header.member_id),
        version=str(response.version),
        leader=int(response.leader),
        db_size=int(response.dbSize),
        alarms=tuple(str(error) for error in response.errors),
    )


async def member_list(connection: Connection) -> tuple[Member, ...]:
    """The members of the cluster."""
    request = rpc.MemberListRequest(linearizable=True)
    response = await _call(connection, "Cluster", "MemberList", request, "list the members")
    return tuple(
        Member(
            id=int(member.ID),
            name=str(member.name),
            client_urls=tuple(member.clientURLs),
            is_learner=bool(member.isLearner),
        )
        for member in response.members
    )


async def auth_enabled(connection: Connection, username: str | None) -> bool:
    """Whether etcd has authentication enabled.

    etcd answers `Auth.AuthStatus` for root only once auth is on: its refusal says that it is.
    etcd 3.4 has no `AuthStatus`; there, a connection with a user works only if auth is on
    (etcd refuses to authenticate otherwise), and without one, listing the roles is refused
    only if auth is on.
    """
    request = rpc.AuthStatusRequest()
    try:
        response = await _call(connection, "Auth", "AuthStatus", request, "report auth status")
    except RendezvousAuthError:
        return True
    except RendezvousError as error:
        if "UNIMPLEMENTED" not in f"{error.code} {error.details}":
            raise
        if username is not None:
            return True
        try:
            await _call(connection, "Auth", "RoleList", rpc.AuthRoleListRequest(), "list roles")
        except RendezvousAuthError:
            return True
        return False
    return bool(response.enabled)


async def user_roles(connection: Connection, username: str) -> tuple[str, ...]:
    """The roles of `username` (etcd lets a user read its own)."""
    request = rpc.AuthUserGetRequest(name=username)
    response = await _call(connection, "Auth", "UserGet", request, f"read user {username!r}")
    return tuple(str(role) for role in response.roles)


async def open_watch(connection: Connection, key: bytes) -> None:
    """Create a watch on `key`, wait until etcd confirms it, and cancel it.

    Raises `RendezvousAuthError` if the user may not watch `key`.
    """
    links = _links(connection)

    async def send(link: Link, timeout: float) -> None:
        stream = await open_stream(links, link, timeout, key=key)
        await _finish(stream.call)

    await drive(links, send, what=f"watch {key!r}", deadline=read_deadline(connection))
