"""The cluster map: shards, their replicas, the ring's parameters, and an epoch.

The epoch grows on every change, so anyone holding a map can tell which of two maps is newer. It is
persisted as JSON beside the cluster (`<dir>/cluster.json`), loaded by every node at start, served
by every node (`Admin.ClusterMap`), and fetched by clients. A future online-resharding change
replaces the map through the same `ClusterMap` object (with a larger epoch); nothing else caches
shard membership.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from kvstore import errors
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.ring import PLACEMENT, Ring


@dataclass(frozen=True)
class ReplicaInfo:
    name: str
    address: str  # gRPC address clients use
    raft_address: str  # advertised Raft address
    zone: str = ""


@dataclass(frozen=True)
class ShardInfo:
    id: int
    replicas: tuple[ReplicaInfo, ...]


@dataclass(frozen=True)
class ClusterMap:
    epoch: int
    shards: tuple[ShardInfo, ...]
    vnodes_per_shard: int = 256
    placement: str = PLACEMENT  # the key -> shard scheme the map was made under
    cluster_id: str = ""  # the nodes' cluster.id: what clients send as `kvstore-cluster-id`
    _by_id: dict[int, ShardInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({s.id: s for s in self.shards})

    @cached_property
    def ring(self) -> Ring:
        if self.placement != PLACEMENT:
            # Keys would be looked up on other shards than they were written to: refuse loudly.
            # Only routing refuses: an old cluster can still be listed, stopped and removed.
            raise errors.KvError(
                f"this cluster map uses key placement {self.placement or '(none: before slots)'!r}, "
                f"but this kvstore places keys by {PLACEMENT!r}; its data would be looked up on the "
                "wrong shards. Create a new cluster (kvstore cluster up) and copy the data over"
            )
        return Ring([s.id for s in self.shards], self.vnodes_per_shard)

    def shard(self, shard_id: int) -> ShardInfo:
        try:
            return self._by_id[shard_id]
        except KeyError:
            raise errors.UnknownShard(
                f"shard {shard_id} is not in the cluster map (epoch {self.epoch})"
            ) from None

    def shard_for(self, key: bytes) -> ShardInfo:
        return self._by_id[self.ring.shard_for(key)]

    def replica(self, name: str) -> tuple[ShardInfo, ReplicaInfo]:
        for shard in self.shards:
            for replica in shard.replicas:
                if replica.name == name:
                    return shard, replica
        raise KeyError(f"no replica named {name!r} in the cluster map")

    def client_address_of_raft(self, raft_address: str) -> str:
        for shard in self.shards:
            for replica in shard.replicas:
                if replica.raft_address == raft_address:
                    return replica.address
        return ""

    # ----- persistence and wire form ---------------------------------------------------------

    def to_json(self) -> str:
        data = {
            "placement": self.placement,
            "epoch": self.epoch,
            "vnodes_per_shard": self.vnodes_per_shard,
            "shards": [{"id": s.id, "replicas": [asdict(r) for r in s.replicas]} for s in self.shards],
        }
        if self.cluster_id:
            data["cluster_id"] = self.cluster_id
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterMap:
        data = json.loads(text)
        shards = tuple(
            ShardInfo(s["id"], tuple(ReplicaInfo(**r) for r in s["replicas"])) for s in data["shards"]
        )
        return cls(
            data["epoch"],
            shards,
            data.get("vnodes_per_shard", 256),
            data.get("placement", ""),
            str(data.get("cluster_id", "")),
        )

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)  # readers never see a half-written map

    @classmethod
    def load(cls, path: str | Path) -> ClusterMap:
        return cls.from_json(Path(path).read_text())

    def to_proto(self) -> pb.ClusterMapResponse:
        return pb.ClusterMapResponse(
            epoch=self.epoch,
            cluster_id=self.cluster_id,
            vnodes_per_shard=self.vnodes_per_shard,
            shards=[
                pb.Shard(
                    id=s.id,
                    replicas=[
                        pb.Replica(name=r.name, address=r.address, raft_address=r.raft_address, zone=r.zone)
                        for r in s.replicas
                    ],
                )
                for s in self.shards
            ],
        )

    @classmethod
    def from_proto(cls, msg: pb.ClusterMapResponse) -> ClusterMap:
        shards = tuple(
            ShardInfo(s.id, tuple(ReplicaInfo(r.name, r.address, r.raft_address, r.zone) for r in s.replicas))
            for s in msg.shards
        )
        return cls(msg.epoch, shards, msg.vnodes_per_shard or 256, cluster_id=msg.cluster_id)
