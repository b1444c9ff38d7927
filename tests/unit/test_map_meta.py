"""The cluster map's metadata group (issue 16, item 2), without processes: the map names the group
and carries it through its file and wire forms; the group's replicas route by a one-shard map; a
node starts from the newest map it has, and adopts only maps it can serve by."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstore import errors
from kvstore.routing.cluster_map import META_SHARD, ClusterMap, ReplicaInfo, ShardInfo
from kvstore.routing.ring import SLOT_COUNT
from kvstore.server.map_follower import CACHE_FILE, newest_map
from kvstore.server.node import NodeContext

META = tuple(ReplicaInfo(f"m{i}", f"127.0.0.1:{7000 + i}", f"127.0.0.1:{7100 + i}", "z") for i in range(3))


def _map(epoch: int = 1, cluster_id: str = "c1", **kwargs: Any) -> ClusterMap:
    shards = tuple(
        ShardInfo(s, (ReplicaInfo(f"s{s}r0", f"127.0.0.1:{8000 + s}", f"127.0.0.1:{8100 + s}"),))
        for s in (0, 1)
    )
    return ClusterMap(epoch, shards, vnodes_per_shard=16, cluster_id=cluster_id, **kwargs)


def test_the_group_survives_the_file_and_the_wire() -> None:
    cluster_map = _map(meta=META).with_slots_moved((0, 99, 1))
    assert ClusterMap.from_json(cluster_map.to_json()) == cluster_map
    assert ClusterMap.from_proto(cluster_map.to_proto()) == cluster_map
    assert ClusterMap.from_proto(cluster_map.to_proto()).meta == META
    assert '"meta"' not in _map().to_json()  # a map without a group is written as before


def test_the_group_serves_by_a_one_shard_map_of_its_own() -> None:
    cluster_map = _map(epoch=7, meta=META)
    meta_map = cluster_map.meta_map()
    assert [s.id for s in meta_map.shards] == [META_SHARD] and meta_map.shards[0].replicas == META
    assert meta_map.epoch == 1 and meta_map.cluster_id == "c1" and not meta_map.meta
    assert meta_map.slots.slot_counts() == {META_SHARD: SLOT_COUNT}
    assert cluster_map.is_meta_replica("m2") and not cluster_map.is_meta_replica("s0r0")
    with pytest.raises(errors.KvError, match="no metadata group"):
        _map().meta_map()


def test_a_data_shard_may_not_take_the_groups_id() -> None:
    shard = ShardInfo(META_SHARD, (ReplicaInfo("x", "127.0.0.1:1", "127.0.0.1:2"),))
    with pytest.raises(errors.KvError, match="metadata group's"):
        ClusterMap(1, (shard,), meta=META)


def test_a_node_starts_from_the_newest_map_it_adopted(tmp_path: Path) -> None:
    born = _map(meta=META)
    assert newest_map(born, tmp_path) is born  # nothing cached
    later = born.with_slots_moved((0, 9, 1))
    later.save(tmp_path / CACHE_FILE)
    assert newest_map(born, tmp_path) == later
    assert newest_map(later.with_slots_moved((10, 19, 1)), tmp_path).epoch == 3  # the file is newer
    assert newest_map(_map(cluster_id="other", meta=META), tmp_path).cluster_id == "other"  # not ours
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert newest_map(born, tmp_path) is born


class _Config:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cluster = type("Cluster", (), {"id": "c1"})()


def test_a_node_adopts_only_a_map_of_its_cluster_that_still_lists_it() -> None:
    born = _map(meta=META)
    data = NodeContext(_Config("s0r0"), None, born, None)  # type: ignore[arg-type]
    assert data.adopt(born.with_slots_moved((0, 9, 1))) and data.cluster_map.epoch == 2
    assert data.data_map is data.cluster_map
    without = ClusterMap(3, born.shards[1:], vnodes_per_shard=16, cluster_id="c1", meta=META)
    assert not data.adopt(without) and data.cluster_map.epoch == 2
    with pytest.raises(errors.ClusterMismatch):
        data.adopt(_map(epoch=4, cluster_id="other", meta=META))

    # A replica of the group routes by its own map and follows the cluster's for Admin.ClusterMap.
    meta = NodeContext(_Config("m0"), None, born.meta_map(), None, born)  # type: ignore[arg-type]
    assert meta.adopt(born.with_slots_moved((0, 9, 1)))
    assert meta.data_map.epoch == 2 and meta.cluster_map == born.meta_map()
