"""The cluster map: shards, their replicas, the ring's parameters, who owns each slot, and an epoch.

The epoch grows on every change, so anyone holding a map can tell which of two maps is newer. It is
persisted as JSON beside the cluster (`<dir>/cluster.json`), loaded by every node at start, served
by every node (`Admin.ClusterMap`), and fetched by clients. A future online-resharding change
replaces the map through the same `ClusterMap` object (with a larger epoch); nothing else caches
shard membership.

Keys route by `slots` (slot_table.py): the ring's placement, which every cluster is born with,
except for the slots the map's `slot_ranges` give to another shard (written once slots move).

A map may name a metadata group (`meta`): a Raft group of its own that holds the newest map and
is its authority (kvstore/cluster/map_store.py); `cluster.json` is then only where nodes and
clients start from. Its replicas serve that group's keys by `meta_map()`: one shard, `META_SHARD`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from kvstore import errors
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.ring import PLACEMENT, Ring
from kvstore.routing.slot_table import SlotRange, SlotTable

# The shard id the metadata group's replicas serve as (in their own one-shard map, `meta_map()`).
# Outside any data shard's range in practice; a data shard may not use it (`ClusterMap`).
META_SHARD = 1_000_000


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
    # Slots whose owner is not the ring's, as (first, last, shard) ranges; empty: the ring's placement.
    slot_ranges: tuple[SlotRange, ...] = ()
    # The shards the ring places slots over; empty: all of them. A shard added to the map is not
    # in the ring, so adding it moves nothing: slots move to it explicitly (`with_slots_moved`).
    ring_shards: tuple[int, ...] = ()
    # The metadata group's replicas (the map's authority); empty: none, the map never changes.
    meta: tuple[ReplicaInfo, ...] = ()
    # Derived from `shards`, never passed in: a map made by `dataclasses.replace` gets its own.
    _by_id: dict[int, ShardInfo] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.id: s for s in self.shards})
        if self.meta and META_SHARD in self._by_id:
            raise errors.KvError(
                f"cluster map epoch {self.epoch}: shard id {META_SHARD} is the metadata group's"
            )
        if self.slot_ranges or self.ring_shards:
            self.slots  # noqa: B018 (checked now: a bad table is refused when the map is read)

    @cached_property
    def slots(self) -> SlotTable:
        """Who owns each slot: what routes every key."""
        ring = self.ring  # refuses a map made under another key placement, table or not
        if not self.slot_ranges:
            return SlotTable(ring, shards=self._by_id)
        try:
            return SlotTable.from_overrides(ring, self.slot_ranges, self._by_id)
        except ValueError as exc:
            raise errors.KvError(f"cluster map epoch {self.epoch} has a bad slot table: {exc}") from None

    def with_slots_moved(self, *moves: SlotRange) -> ClusterMap:
        """The next map (epoch + 1), in which each (first, last, shard) of `moves` owns those slots."""
        for to in {to for _, _, to in moves}:
            self.shard(to)  # UnknownShard unless it is in the map
        table = self.slots.moved_all(moves)
        return dataclasses.replace(self, epoch=self.epoch + 1, slot_ranges=tuple(table.overrides()))

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
        if unknown := set(self.ring_shards) - set(self._by_id):
            raise errors.KvError(
                f"cluster map epoch {self.epoch}: ring shards {sorted(unknown)} are not in it"
            )
        try:
            return Ring(self.ring_shards or [s.id for s in self.shards], self.vnodes_per_shard)
        except ValueError as exc:  # duplicate ring shards, a bad vnode count: from a file or a peer
            raise errors.KvError(f"cluster map epoch {self.epoch} has a bad ring: {exc}") from None

    def shard(self, shard_id: int) -> ShardInfo:
        try:
            return self._by_id[shard_id]
        except KeyError:
            raise errors.UnknownShard(
                f"shard {shard_id} is not in the cluster map (epoch {self.epoch})"
            ) from None

    def shard_for(self, key: bytes) -> ShardInfo:
        return self._by_id[self.slots.shard_for(key)]

    def replica(self, name: str) -> tuple[ShardInfo, ReplicaInfo]:
        for shard in self.shards:
            for replica in shard.replicas:
                if replica.name == name:
                    return shard, replica
        raise KeyError(f"no replica named {name!r} in the cluster map")

    def is_meta_replica(self, name: str) -> bool:
        return any(r.name == name for r in self.meta)

    def meta_map(self) -> ClusterMap:
        """The map the metadata group's replicas serve by, and its clients route by: one shard.
        Its epoch never changes (the group's own membership is fixed at creation)."""
        if not self.meta:
            raise errors.KvError("this cluster has no metadata group (its map is fixed)")
        return ClusterMap(
            epoch=1,
            shards=(ShardInfo(META_SHARD, self.meta),),
            vnodes_per_shard=1,
            cluster_id=self.cluster_id,
        )

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
        if self.slot_ranges:
            data["slots"] = [list(r) for r in self.slot_ranges]
        if self.ring_shards:
            data["ring_shards"] = list(self.ring_shards)
        if self.meta:
            data["meta"] = [asdict(r) for r in self.meta]
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
            _ranges(data.get("slots", [])),
            _shard_ids(data.get("ring_shards", [])),
            tuple(ReplicaInfo(**r) for r in data.get("meta", [])),
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
            slots=[pb.SlotRange(first=a, last=b, shard=c) for a, b, c in self.slot_ranges],
            ring_shards=self.ring_shards,
            shards=[pb.Shard(id=s.id, replicas=[_replica_proto(r) for r in s.replicas]) for s in self.shards],
            meta=[_replica_proto(r) for r in self.meta],
        )

    @classmethod
    def from_proto(cls, msg: pb.ClusterMapResponse) -> ClusterMap:
        shards = tuple(ShardInfo(s.id, tuple(map(_replica_info, s.replicas))) for s in msg.shards)
        ranges = tuple((r.first, r.last, r.shard) for r in msg.slots)
        return cls(
            msg.epoch,
            shards,
            msg.vnodes_per_shard or 256,
            cluster_id=msg.cluster_id,
            slot_ranges=ranges,
            ring_shards=tuple(msg.ring_shards),
            meta=tuple(map(_replica_info, msg.meta)),
        )


def _replica_proto(r: ReplicaInfo) -> pb.Replica:
    return pb.Replica(name=r.name, address=r.address, raft_address=r.raft_address, zone=r.zone)


def _replica_info(r: pb.Replica) -> ReplicaInfo:
    return ReplicaInfo(r.name, r.address, r.raft_address, r.zone)


def _ranges(stored: object) -> tuple[SlotRange, ...]:
    """The "slots" of a map file, shaped for `ClusterMap` (their content is checked there)."""
    if not isinstance(stored, list) or not all(isinstance(r, list) and len(r) == 3 for r in stored):
        raise errors.KvError('the cluster map\'s "slots" must be a list of [first, last, shard]')
    return tuple((r[0], r[1], r[2]) for r in stored)


def _shard_ids(stored: object) -> tuple[int, ...]:
    """The "ring_shards" of a map file (checked against the map's shards by `ClusterMap.ring`)."""
    if not isinstance(stored, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in stored
    ):
        raise errors.KvError('the cluster map\'s "ring_shards" must be a list of shard ids')
    return tuple(stored)
