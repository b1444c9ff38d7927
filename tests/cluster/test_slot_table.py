"""Placement is data (issue 16, item 1), with real node processes: a cluster whose map moved a range
of slots away from where the ring puts them serves those keys on the table's owner, the nodes
refuse them on the ring's, and a client holding the ring's map (the epoch before) is redirected
and learns the table; a backup of it restores with the table. Nothing moves data yet: the map is
edited before the nodes start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore import Client
from kvstore.cluster.backup import backup_cluster, restore_cluster
from kvstore.cluster.local import LocalCluster
from kvstore.routing.ring import slot_of
from tests.conftest import TEST_RAFT, client_with_map, wait_until

FIRST, LAST = 0, 8191  # the moved range: an eighth of the slots


def _keys_in(cluster_map: Any, owner: int, count: int) -> list[bytes]:
    """Keys of the moved range that the ring gives to `owner`."""
    found = []
    for i in range(200_000):
        key = b"moved:%d" % i
        if FIRST <= slot_of(key) <= LAST and cluster_map.ring.shard_for(key) == owner:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("too few keys in the moved range")


def test_a_moved_slot_range_is_served_by_its_new_owner_and_a_stale_client_is_redirected(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "c")
    born = cluster.create(shards=2, replicas=1, raft=TEST_RAFT)
    moved = born.with_slots_moved((FIRST, LAST, 1))  # shard 1 owns the whole range
    moved.save(cluster.map_path)
    assert moved.epoch == born.epoch + 1 and len(moved.slot_ranges) >= 1
    keys = _keys_in(born, owner=0, count=40)  # the ring's owner is 0; the table's is 1
    cluster.start_all()
    try:
        cluster.wait_for_leaders()
        with Client.from_cluster(cluster.dir) as kv:
            assert kv.cluster_map().epoch == moved.epoch
            for key in keys:
                kv.put(key, b"v-" + key)
            assert kv.multi_get(keys) == {k: b"v-" + k for k in keys}
        counts = {s["shard"]: s["key_count"] for s in cluster.status()}
        assert counts == {0: 0, 1: len(keys)}  # all on the table's owner, none on the ring's

        # The ring's owner refuses them: a client with the map of the epoch before is told so,
        # fetches the new map and finds them on shard 1.
        stale, redirects = client_with_map(born)
        with stale:
            assert stale.get(keys[0]) == b"v-" + keys[0]
            assert redirects and redirects[0].epoch == moved.epoch
            assert stale.core.cluster_map.epoch == moved.epoch
            assert stale.core.cluster_map.slots.shard_for(keys[1]) == 1
            stale.put(keys[1], b"again")
        wait_until(lambda: {s["shard"]: s["key_count"] for s in cluster.status()} == counts, 10)
        status = cluster.status_document()
        assert {s["shard"]: s["slots"] for s in status["shards"]} == moved.slots.slot_counts()
    finally:
        cluster.down()


def test_a_backup_of_a_moved_placement_restores_with_its_slot_table(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    born = cluster.create(shards=2, replicas=1, raft=TEST_RAFT)
    moved = born.with_slots_moved((FIRST, LAST, 1))
    moved.save(cluster.map_path)
    keys = _keys_in(born, owner=0, count=20)
    restored = LocalCluster(tmp_path / "restored")
    cluster.start_all()
    try:
        cluster.wait_for_leaders()
        with Client.from_cluster(cluster.dir) as kv:
            kv.put_many({k: b"v-" + k for k in keys}, atomic=False)
        backup_cluster(cluster.dir, tmp_path / "backup", say=lambda _: None)
        cluster.down()
        digests = restore_cluster(tmp_path / "backup", restored.dir, 60.0, say=lambda _: None)
        assert all(d.matches for d in digests)
        again = restored.cluster_map()
        assert again.slot_ranges == moved.slot_ranges and again.cluster_id != moved.cluster_id
        restored.wait_for_leaders()
        with Client.from_cluster(restored.dir) as kv:
            assert kv.multi_get(keys) == {k: b"v-" + k for k in keys}
            assert {s["shard"]: s["key_count"] for s in restored.status()} == {0: 0, 1: len(keys)}
    finally:
        cluster.down()
        restored.down()
