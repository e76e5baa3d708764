"""Loopback ports: which are free, and which a process listens on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["HOST", "free_ports", "listens_on"]

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that are free right now (the kernel's choice for port 0)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _listening_sockets(port: int) -> set[str] | None:
    """The inodes of the TCP sockets listening on `port` (Linux); None where /proc cannot tell."""
    inodes: set[str] = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for line in lines:
            fields = line.split()
            # local address "ADDR:PORT" in hex, state 0A is LISTEN, then the inode.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if tables else None


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` listens on TCP `port`; None where /proc cannot tell."""
    inodes = _listening_sockets(port)
    if inodes is None:
        return None
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False
