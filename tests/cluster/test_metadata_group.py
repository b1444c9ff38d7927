"""The metadata group (issue 16, item 2), with real node processes: the cluster map lives in a Raft
group of its own and changes only by compare-and-set; every node adopts a new epoch within about a
second and routes by it; a client holding the old map is redirected; without the group's quorum
the shards go on serving and map changes wait; a node restarted meanwhile keeps the newest map it
served under.

The map changes here move slots that hold no keys (moving data is the move protocol's job)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client, errors
from kvstore.cluster.local import LocalCluster
from kvstore.meta.store import MAP_KEY, MapStore, encode
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import META_SHARD, ClusterMap
from kvstore.routing.ring import slot_of
from tests.conftest import TEST_RAFT, client_with_map, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("meta") / "c")
    cluster.create(shards=2, replicas=1, meta_replicas=3, raft=TEST_RAFT)
    cluster.start_all()
    try:
        cluster.wait_until_serving(timeout=60)
        yield cluster
    finally:
        cluster.down()


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _read(cluster: LocalCluster, timeout: float = 5.0) -> tuple[ClusterMap | None, int]:
    store = MapStore(cluster.cluster_map())
    try:
        return await store.read(timeout=timeout)
    finally:
        await store.close()


async def _change(cluster: LocalCluster, make_next: object, timeout: float = 5.0) -> ClusterMap:
    store = MapStore(cluster.cluster_map(), timeout=timeout, admin_token=cluster.admin_token())
    try:
        return await store.change(make_next)  # type: ignore[arg-type]
    finally:
        await store.close()


def _status(address: str) -> pb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=2.0)


def _epochs(cluster: LocalCluster, names: list[str] | None = None) -> dict[str, int]:
    cluster_map = cluster.cluster_map()
    replicas = [*cluster_map.meta, *(r for s in cluster_map.shards for r in s.replicas)]
    return {r.name: _status(r.address).epoch for r in replicas if names is None or r.name in names}


def _stored(cluster: LocalCluster) -> ClusterMap:
    stored, _ = _run(wait_for_seed(cluster))  # type: ignore[misc]
    return stored


async def wait_for_seed(cluster: LocalCluster) -> tuple[ClusterMap, int]:
    deadline = time.monotonic() + 20
    while True:
        stored, revision = await _read(cluster)
        if stored is not None:
            return stored, revision
        assert time.monotonic() < deadline, "the metadata group was never seeded"
        await asyncio.sleep(0.2)


def _unused_slot(cluster_map: ClusterMap, owner: int, used: set[int]) -> tuple[int, bytes]:
    """A slot `owner` holds that no key written so far is in, and a fresh key in it."""
    for i in range(1_000_000):
        key = b"meta-test:%d" % i
        slot = slot_of(key)
        if slot not in used and cluster_map.slots.shard_for_slot(slot) == owner:
            used.add(slot)
            return slot, key
    raise AssertionError("no free slot")


USED: set[int] = set()


def test_the_group_is_seeded_with_the_map_and_every_replica_answers_it(cluster: LocalCluster) -> None:
    born = cluster.cluster_map()
    assert [r.name for r in born.meta] == ["m0", "m1", "m2"]
    stored = _stored(cluster)
    assert stored == born  # the group starts from cluster.json, meta replicas included
    # Every replica, of a shard or of the group, answers the cluster's (data) map.
    for replica in [*born.meta, *(r for s in born.shards for r in s.replicas)]:
        with grpc.insecure_channel(replica.address) as channel:
            answer = pb_grpc.AdminStub(channel).ClusterMap(pb.ClusterMapRequest(), timeout=2.0)
        assert ClusterMap.from_proto(answer).epoch >= born.epoch
        assert sorted(s.id for s in answer.shards) == [0, 1] and len(answer.meta) == 3
    assert _status(born.meta[0].address).shard == META_SHARD


def test_a_map_change_reaches_every_node_within_a_second_and_reroutes_keys(cluster: LocalCluster) -> None:
    before = _stored(cluster)
    slot, key = _unused_slot(before, owner=0, used=USED)
    stale, redirects = client_with_map(before)  # holds the map of the epoch before the change
    bystander, bystander_redirects = client_with_map(before)  # uses only keys that stay put
    began = time.monotonic()
    after = _run(_change(cluster, lambda m: m.with_slots_moved((slot, slot, 1))))
    assert isinstance(after, ClusterMap) and after.epoch == before.epoch + 1
    wait_until(lambda: set(_epochs(cluster).values()) == {after.epoch}, timeout=5, interval=0.05)
    took = time.monotonic() - began
    assert took < 1.5, f"the new epoch took {took:.2f}s to reach every node"

    # The old owner refuses the slot, saying the new epoch; the new owner serves it.
    s0, s1 = (before.shard(i).replicas[0] for i in (0, 1))
    with grpc.insecure_channel(s0.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.KVStub(channel).Put(pb.PutRequest(key=key, value=b"x"), timeout=2.0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"not owned by this shard (map epoch {after.epoch})" in (refused.value.details() or "")
    with stale:
        stale.put(key, b"on the new owner")
        assert redirects and redirects[0].epoch == after.epoch  # told by the old owner, then followed
        assert stale.core.cluster_map.epoch == after.epoch
    with grpc.insecure_channel(s1.address) as channel:
        got = pb_grpc.KVStub(channel).Get(pb.GetRequest(key=key), timeout=2.0)
    assert got.found and got.kv.value == b"on the new owner" and got.header.shard == 1

    # A client whose keys did not move learns the epoch from its answers' headers, unredirected.
    with bystander:
        bystander.put(b"bystander", b"1")
        assert bystander.get(b"bystander") == b"1"
        assert bystander.core.cluster_map.epoch == after.epoch and not bystander_redirects


def test_a_change_made_from_a_map_that_is_no_longer_the_newest_is_refused(cluster: LocalCluster) -> None:
    stale, revision = _run(wait_for_seed(cluster))  # type: ignore[misc]
    slot, _ = _unused_slot(stale, owner=0, used=USED)
    _run(_change(cluster, lambda m: m.with_slots_moved((slot, slot, 1))))

    class StaleStore(MapStore):  # a coordinator that read the map before the change above
        async def read(self, timeout: float | None = None) -> tuple[ClusterMap | None, int]:
            return stale, revision

    async def attempt() -> None:
        store = StaleStore(cluster.cluster_map(), admin_token=cluster.admin_token())
        try:
            with pytest.raises(errors.MapConflict):
                await store.change(lambda m: m.with_slots_moved((slot, slot, 0)))
            # Nor can a change skip an epoch, or name another cluster.
            with pytest.raises(errors.InvalidArgument, match="must make epoch"):
                await MapStore.change(store, lambda m: m)
            result = await store.client.compare_and_set(
                MAP_KEY, encode(stale.with_slots_moved((slot, slot, 0))), expected_revision=revision
            )
            assert not result.succeeded
        finally:
            await store.close()

    _run(attempt())
    now = _stored(cluster)
    assert now.epoch == stale.epoch + 1 and now.slots.shard_for_slot(slot) == 1


def test_without_the_groups_quorum_shards_serve_and_map_changes_wait(cluster: LocalCluster) -> None:
    before = _stored(cluster)
    slot, key = _unused_slot(before, owner=0, used=USED)
    # Every node has the group's newest map before the group loses its quorum.
    wait_until(lambda: set(_epochs(cluster).values()) == {before.epoch}, timeout=5, interval=0.1)
    leader = cluster.meta_status()["leader"]  # type: ignore[index]
    lost = [leader, next(r.name for r in before.meta if r.name != leader)]
    for name in lost:
        cluster.kill(name)
    try:
        with Client.from_cluster(cluster.dir) as kv:
            for i in range(20):
                kv.put(b"during-outage:%d" % i, b"v")
            assert kv.get(b"during-outage:7") == b"v"
        began = time.monotonic()
        with pytest.raises((errors.Timeout, errors.Unavailable, errors.UnknownOutcome)):
            _run(_change(cluster, lambda m: m.with_slots_moved((slot, slot, 1)), timeout=3.0))
        assert time.monotonic() - began < 10
        assert set(_epochs(cluster, ["s0r0", "s1r0"]).values()) == {before.epoch}

        # A data node restarted meanwhile starts from the newest map it adopted (its data dir's
        # cache), not from cluster.json, which nobody rewrote.
        assert cluster.cluster_map().epoch < before.epoch
        cluster.kill("s0r0")
        cluster.start("s0r0")
        cluster.wait_until_serving(["s0r0"], timeout=30)
        assert _epochs(cluster, ["s0r0"]) == {"s0r0": before.epoch}
    finally:
        for name in lost:
            cluster.start(name)
    cluster.wait_until_serving(timeout=30)
    after = _run(_change(cluster, lambda m: m.with_slots_moved((slot, slot, 1)), timeout=10.0))
    assert isinstance(after, ClusterMap) and after.epoch == before.epoch + 1
    wait_until(lambda: set(_epochs(cluster).values()) == {after.epoch}, timeout=5, interval=0.1)
    assert "metadata group is unreachable" in Path(cluster.log_path("s1r0")).read_text()
