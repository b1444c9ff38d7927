"""The `kvstore cluster status --json` document: one schema, documented in docs/cluster-status.md
and pinned by tests/cluster/test_cluster_status.py. Later changes add keys; they never rename, retype or
move one, so tools written against it keep working.

Built from the cluster map (shards, replicas, addresses, epoch, the ring) and what each replica's
`Admin.Status` answered (`ask_replica`, through `LocalCluster.status()`). Shards and replicas the
map no longer lists (removed ones) are not in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc

from kvstore import errors
from kvstore.cluster.processes import is_stopped
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo
from kvstore.routing.ring import SLOT_COUNT

# A replica is caught up when it has proven, within this many seconds, that it held every write
# the leader had acknowledged (the proof bounded-staleness reads rely on). A follower hears from
# its leader many times a second, so a healthy one stays far below this.
CAUGHT_UP_STALENESS_SECONDS = 2.0
# Roles of a replica that did not answer (its process is gone, stopped, or not answering).
# Roles of a replica that gave no status of its own: not running, stopped, not answering, or another
# process (not the one this cluster started) answering at its address.
SILENT_ROLES = ("down", "paused", "unreachable", "foreign")
METRICS = (
    "term",
    "applied_index",
    "commit_index",
    "leader_commit_index",
    "staleness_seconds",
    "key_count",
    "raft_log_size",
)


class ReplicaDocument(TypedDict):
    node: str
    address: str  # gRPC
    raft_address: str  # advertised Raft address (a fault proxy's in a `--faults` cluster)
    zone: str
    pid: int | None
    role: str  # leader, follower, candidate, down, paused, unreachable
    health: str  # serving, not_serving: <reason>, down, paused, unreachable
    voter: bool  # every replica votes until membership changes add learners
    caught_up: bool
    metrics: dict[str, int | float]  # METRICS of a replica that answered; empty otherwise


class ShardDocument(TypedDict):
    shard: int
    leader: str | None
    slots: int | None  # slots the map gives it; None if the map's placement is not this version's
    vnodes: int
    key_count: int
    replicas: list[ReplicaDocument]


class MetadataDocument(TypedDict):
    leader: str | None
    replicas: list[ReplicaDocument]


class StatusDocument(TypedDict):
    cluster_id: str
    epoch: int
    healthy: bool
    dir: str
    slot_count: int
    vnodes_per_shard: int
    shards: list[ShardDocument]
    metadata: MetadataDocument | None  # the metadata group; None: the cluster has none


def status_document(
    cluster_map: ClusterMap,
    shard_statuses: list[dict[str, Any]],
    directory: str | Path,
    meta_status: dict[str, Any] | None = None,
) -> StatusDocument:
    """`shard_statuses`, `meta_status`: what `LocalCluster.status()` and `.meta_status()` returned
    for `cluster_map`."""
    slots = slot_counts(cluster_map)
    by_id = {s["shard"]: s for s in shard_statuses}
    shards: list[ShardDocument] = []
    for info in cluster_map.shards:
        status = by_id[info.id]
        answered = {r["node"]: r for r in status["replicas"]}
        shards.append(
            {
                "shard": info.id,
                "leader": status["leader"],
                "slots": None if slots is None else slots.get(info.id, 0),
                "vnodes": cluster_map.vnodes_per_shard,
                "key_count": status["key_count"],
                "replicas": [_replica_document(r, answered[r.name]) for r in info.replicas],
            }
        )
    metadata: MetadataDocument | None = None
    if meta_status is not None:
        answered = {r["node"]: r for r in meta_status["replicas"]}
        metadata = {
            "leader": meta_status["leader"],
            "replicas": [_replica_document(r, answered[r.name]) for r in cluster_map.meta],
        }
    return {
        "cluster_id": cluster_map.cluster_id,
        "epoch": cluster_map.epoch,
        "healthy": is_healthy(raft_groups(shards, metadata)),
        "dir": str(directory),
        "slot_count": SLOT_COUNT,
        "vnodes_per_shard": cluster_map.vnodes_per_shard,
        "shards": shards,
        "metadata": metadata,
    }


def raft_groups(shards: list[ShardDocument], metadata: MetadataDocument | None) -> list[Any]:
    """The shards and the metadata group (as a shard named "metadata"): what health is judged on."""
    return shards + ([{"shard": "metadata", **metadata}] if metadata else [])


def is_healthy(shards: list[ShardDocument]) -> bool:
    """Every shard (and the metadata group) has a leader and every replica reports itself serving."""
    return not problems(shards)


def problems(shards: list[ShardDocument]) -> list[str]:
    """What keeps the cluster from being healthy, one line each."""
    found = [f"shard {s['shard']} has no leader" for s in shards if not s["leader"]]
    found += [
        f"{r['node']} is {r['health']}" for s in shards for r in s["replicas"] if r["health"] != "serving"
    ]
    return found


def slot_counts(cluster_map: ClusterMap) -> dict[int, int] | None:
    """Slots each shard owns under the map's slot table (every one of SLOT_COUNT routed: ~0.1 s)."""
    try:
        table = cluster_map.slots
    except errors.KvError:  # a map from before this placement scheme: listed, never routed
        return None
    return {s.id: 0 for s in cluster_map.shards} | table.slot_counts()


def _replica_document(info: ReplicaInfo, status: dict[str, Any]) -> ReplicaDocument:
    answered = status["role"] not in SILENT_ROLES
    staleness = status["staleness_seconds"]
    return {
        "node": info.name,
        "address": info.address,
        "raft_address": info.raft_address,
        "zone": info.zone,
        "pid": status["pid"],
        "role": status["role"],
        "health": status["health"],
        "voter": True,
        "caught_up": answered
        and status["role"] in ("leader", "follower")
        and 0 <= staleness <= CAUGHT_UP_STALENESS_SECONDS,
        "metrics": {name: status[name] for name in METRICS} if answered else {},
    }


def start_problem(replica: dict[str, Any], shard_leader: str | None) -> str | None:
    """Why a replica (a `LocalCluster.status()` entry) is not yet serving as a member of its Raft
    group, or None when it is: it answers, reports SERVING, and is the shard's leader or a follower
    that a leader keeps current (term > 0, caught up: the leader's appends reach it and it answers
    them, so the leader counts it). A replica whose Raft port never opened stays `follower term=0`."""
    role, health = replica["role"], replica["health"]
    if role == "foreign":
        return str(health)  # says which process answers instead
    if role in SILENT_ROLES:
        return role
    staleness = replica["staleness_seconds"]
    caught_up = 0 <= staleness <= CAUGHT_UP_STALENESS_SECONDS
    if health == "serving" and replica["term"] > 0 and shard_leader and caught_up:
        if role == "leader" or (role == "follower" and replica["leader"]):
            return None
    fresh = f"{staleness:.1f}s ago" if staleness >= 0 else "never"
    return (
        f"running but not a member of its Raft group (role={role} term={replica['term']} "
        f"leader={replica['leader'] or '-'} last caught up: {fresh}; health={health})"
    )


# A line that reports a failure: the CLI's `error: ...`, a logged ERROR/CRITICAL, an exception.
_ERROR_LINE = re.compile(r"^error: | (ERROR|CRITICAL) |^\w+(\.\w+)*(Error|Exception): |Failed to bind")


class NodesNotServing(RuntimeError):
    """Nodes that did not come up as serving members of their Raft group."""

    def __init__(self, problems: dict[str, str], log_lines: dict[str, str], waited: str) -> None:
        self.problems, self.log_lines = problems, log_lines
        lines = [f"{len(problems)} node(s) not serving as members of their Raft group{waited}:"]
        for name in sorted(problems):
            lines.append(f"  {name}: {problems[name]}; its log says: {log_lines[name]}")
        super().__init__("\n".join(lines))


def last_error_line(log: Path, start: int = 0) -> str:
    """The line of a node's log (from byte `start`) that best says what went wrong: the last error
    line (a node's own one-line `error: ...`, a traceback's last line, a logged ERROR), else its
    last line."""
    if not log.exists():
        return "(no log)"
    with open(log, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    errors_seen = [line for line in lines if _ERROR_LINE.search(line)]
    line = (errors_seen or lines or ["(nothing in its log)"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


@dataclass
class ReplicaStatus:
    node: str
    shard: int
    address: str
    pid: int | None
    role: str  # leader, follower, candidate, down, paused
    term: int = 0
    applied_index: int = 0
    commit_index: int = 0
    leader_commit_index: int = 0
    staleness_seconds: float = -1.0
    key_count: int = 0
    leader: str = ""
    zone: str = ""
    health: str = "down"  # serving, not_serving: <reason>, down, paused, unreachable
    raft_log_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ask_replica(shard: int, replica: ReplicaInfo, pid: int | None, timeout: float) -> ReplicaStatus:
    """What a replica (process `pid`, None: not running) says of itself in `Admin.Status`."""
    base = ReplicaStatus(replica.name, shard, replica.address, pid, "down", zone=replica.zone)
    if pid is None:
        return base
    if is_stopped(pid):
        base.role = base.health = "paused"
        return base
    try:
        with grpc.insecure_channel(replica.address) as channel:
            s = pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=timeout)
    except grpc.RpcError:
        base.role = base.health = "unreachable"
        return base
    if s.pid and s.pid != pid:  # e.g. another cluster's node on the same port
        base.role = "foreign"
        base.health = f"another process (pid {s.pid}) answers at {replica.address}, not this node (pid {pid})"
        return base
    return ReplicaStatus(
        replica.name,
        shard,
        replica.address,
        pid,
        s.role,
        s.term,
        s.applied_index,
        s.commit_index,
        s.leader_commit_index,
        s.staleness_seconds,
        s.key_count,
        s.leader,
        replica.zone,
        s.health,
        s.raft_log_size,
    )
