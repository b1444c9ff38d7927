"""The `kvstore cluster status --json` document (docs/cluster-status.md), pinned key by key and
type by type against a real cluster started by `kvstore cluster up --topology FILE`: healthy,
with a node down, paused, and with a shard that has lost its leader. `--json` exits 0 whenever it
prints the document; the table exits 1 unless every shard has a leader and every node serves.

A key added to the document must be added to the schema below and to docs/cluster-status.md;
one renamed, retyped or removed breaks tools written against it, which is what this test stops."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from kvstore.cluster.local import LocalCluster
from kvstore.cluster.status import status_document
from kvstore.cluster.topology import named_topology
from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo
from kvstore.routing.ring import SLOT_COUNT, Ring
from tests.conftest import wait_until

NoneType = type(None)
# key -> the JSON types its value may have (int never accepts a bool)
DOCUMENT = {
    "cluster_id": str,
    "epoch": int,
    "healthy": bool,
    "dir": str,
    "slot_count": int,
    "vnodes_per_shard": int,
    "shards": list,
    "metadata": (dict, NoneType),
}
METADATA = {"leader": (str, NoneType), "replicas": list}
SHARD = {
    "shard": int,
    "leader": (str, NoneType),
    "slots": int,
    "vnodes": int,
    "key_count": int,
    "replicas": list,
}
REPLICA = {
    "node": str,
    "address": str,
    "raft_address": str,
    "zone": str,
    "pid": (int, NoneType),
    "role": str,
    "health": str,
    "voter": bool,
    "caught_up": bool,
    "metrics": dict,
}
METRICS = {
    "term": int,
    "applied_index": int,
    "commit_index": int,
    "leader_commit_index": int,
    "staleness_seconds": (float, int),
    "key_count": int,
    "raft_log_size": int,
}
ROLES = {"leader", "follower", "candidate", "down", "paused", "unreachable", "foreign"}


def _check(where: str, value: dict[str, Any], schema: dict[str, Any]) -> None:
    assert isinstance(value, dict), where
    assert set(value) == set(schema), f"{where}: keys {sorted(value)} != {sorted(schema)}"
    for key, types in schema.items():
        ok = isinstance(value[key], types) and not (
            isinstance(value[key], bool) and bool not in _as_tuple(types)
        )
        assert ok, f"{where}.{key} = {value[key]!r} is not {types}"


def _as_tuple(types: Any) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_schema(document: dict[str, Any]) -> None:
    _check("document", document, DOCUMENT)
    for shard in document["shards"]:
        _check(f"shard {shard.get('shard')}", shard, SHARD)
        for replica in shard["replicas"]:
            where = f"shard {shard['shard']} replica {replica.get('node')}"
            _check(where, replica, REPLICA)
            assert replica["role"] in ROLES, where
            if replica["metrics"]:
                _check(f"{where} metrics", replica["metrics"], METRICS)
    if document["metadata"] is not None:
        _check("metadata", document["metadata"], METADATA)
        for replica in document["metadata"]["replicas"]:
            _check(f"metadata replica {replica.get('node')}", replica, REPLICA)
            assert replica["role"] in ROLES


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=90
    )


def _document(cluster: LocalCluster) -> dict[str, Any]:
    out = _cli("cluster", "status", "--dir", str(cluster.dir), "--json")
    assert out.returncode == 0, out.stderr  # whatever the cluster's state
    document = json.loads(out.stdout)
    check_schema(document)
    return document


def _table(cluster: LocalCluster) -> subprocess.CompletedProcess[str]:
    return _cli("cluster", "status", "--dir", str(cluster.dir))


def _replica(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for s in document["shards"] for r in s["replicas"] if r["node"] == name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """2 shards x 3 replicas in three named zones, started by `cluster up --topology`: the shipped
    local-2x3-zones file, on free ports instead of its fixed ones (tests never use fixed ports)."""
    root = tmp_path_factory.mktemp("status")
    shipped = named_topology("local-2x3-zones")
    topology = root / "2x3-zones.toml"
    topology.write_text(dataclasses.replace(shipped, base_port=0).to_toml())
    c = LocalCluster(root / "c")
    try:
        up = _cli("cluster", "up", "--dir", str(c.dir), "--topology", str(topology))
        assert up.returncode == 0, up.stdout + up.stderr
        yield c
    finally:
        c.down()


def test_a_healthy_cluster_s_document(cluster: LocalCluster) -> None:
    cluster_map = cluster.cluster_map()
    topology = named_topology("local-2x3-zones")
    # Followers prove they are caught up at their next heartbeat from the leader.
    wait_until(lambda: all(r["caught_up"] for s in _document(cluster)["shards"] for r in s["replicas"]), 15)
    document = _document(cluster)
    assert document["healthy"] is True
    assert document["epoch"] == cluster_map.epoch == 1
    assert document["cluster_id"] == cluster_map.cluster_id != ""
    assert document["dir"] == str(cluster.dir) and document["slot_count"] == SLOT_COUNT
    assert [s["shard"] for s in document["shards"]] == [0, 1]
    # Slots: every one owned by exactly one shard, as the ring routes them.
    ring = Ring([0, 1], cluster_map.vnodes_per_shard)
    assert sum(s["slots"] for s in document["shards"]) == SLOT_COUNT
    for shard, info in zip(document["shards"], cluster_map.shards, strict=True):
        assert shard["slots"] == round(ring.ownership()[info.id] * SLOT_COUNT) > 0
        assert [r["node"] for r in shard["replicas"]] == [r.name for r in info.replicas]
        assert [r["zone"] for r in shard["replicas"]] == topology.zones
        leaders = [r for r in shard["replicas"] if r["role"] == "leader"]
        assert [r["node"] for r in leaders] == [shard["leader"]]
        for replica, expected in zip(shard["replicas"], info.replicas, strict=True):
            assert (replica["address"], replica["raft_address"]) == (expected.address, expected.raft_address)
            assert replica["pid"] == cluster.pid(expected.name) and replica["pid"]
            assert replica["health"] == "serving" and replica["voter"] is True
            assert replica["role"] in ("leader", "follower")
            assert replica["metrics"]["term"] >= 1 and replica["metrics"]["commit_index"] >= 1
    # The metadata group (3 replicas unless a topology says otherwise) is listed apart.
    meta = document["metadata"]
    assert [r["node"] for r in meta["replicas"]] == [r.name for r in cluster_map.meta] == ["m0", "m1", "m2"]
    assert meta["leader"] in {"m0", "m1", "m2"}
    assert all(r["health"] == "serving" and r["pid"] == cluster.pid(r["node"]) for r in meta["replicas"])
    table = _table(cluster)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("health=serving") == 6 + 3 and "slots=" in table.stdout
    assert "metadata group: leader=" in table.stdout


def test_a_node_down_or_paused(cluster: LocalCluster) -> None:
    name = next(r["node"] for r in _document(cluster)["shards"][0]["replicas"] if r["role"] == "follower")
    assert _cli("cluster", "kill", "--dir", str(cluster.dir), name).returncode == 0
    try:
        document = _document(cluster)
        assert document["healthy"] is False
        down = _replica(document, name)
        assert (down["role"], down["health"], down["pid"], down["caught_up"], down["metrics"]) == (
            "down",
            "down",
            None,
            False,
            {},
        )
        assert down["voter"] is True  # still a member: the map lists it
        assert document["shards"][0]["leader"]  # two of three still elect
        table = _table(cluster)
        assert table.returncode == 1 and f"not healthy: {name} is down" in table.stderr
    finally:
        assert _cli("cluster", "start", "--dir", str(cluster.dir), name).returncode == 0
    wait_until(lambda: _document(cluster)["healthy"], 30, interval=0.5)
    assert _table(cluster).returncode == 0

    assert _cli("cluster", "kill", "--dir", str(cluster.dir), name, "--signal", "STOP").returncode == 0
    try:
        paused = _replica(_document(cluster), name)
        assert (paused["role"], paused["health"], paused["metrics"]) == ("paused", "paused", {})
        assert paused["pid"] == cluster.pid(name)
        assert _table(cluster).returncode == 1
    finally:
        assert _cli("cluster", "kill", "--dir", str(cluster.dir), name, "--signal", "CONT").returncode == 0
    wait_until(lambda: _document(cluster)["healthy"], 30, interval=0.5)


def test_a_shard_without_a_leader(cluster: LocalCluster) -> None:
    """Two of shard 1's three replicas gone: the last one cannot be (or stay) leader."""
    survivor, *killed = [r.name for r in cluster.cluster_map().shard(1).replicas]
    for name in killed:
        cluster.kill(name)
    try:
        # A leader cut off from its majority keeps its role until raft.leader_fallback_timeout.
        wait_until(lambda: _document(cluster)["shards"][1]["leader"] is None, 20, interval=0.5)
        document = _document(cluster)
        assert document["healthy"] is False and document["shards"][0]["leader"]
        assert _replica(document, survivor)["role"] in ("follower", "candidate")
        table = _table(cluster)
        assert table.returncode == 1 and "shard 1 has no leader" in table.stderr
    finally:
        for name in killed:
            cluster.start(name)
    wait_until(lambda: _document(cluster)["healthy"], 30, interval=0.5)


def test_only_the_map_s_shards_and_replicas_are_listed() -> None:
    """Removed shards and replicas are not in the document: it lists what the map lists."""
    shards = (
        ShardInfo(0, (ReplicaInfo("s0r0", "a:1", "a:2", "z"),)),
        ShardInfo(2, (ReplicaInfo("s2r1", "b:1", "b:2", "z"),)),  # shard 1 and s2r0 were removed
    )
    cluster_map = ClusterMap(epoch=7, shards=shards, vnodes_per_shard=8)

    def answer(shard: int, name: str) -> dict[str, Any]:
        replica = {"node": name, "pid": None, "role": "down", "health": "down", "staleness_seconds": -1.0}
        return {"shard": shard, "leader": None, "key_count": 0, "replicas": [replica]}

    statuses = [answer(0, "s0r0"), answer(1, "s1r0"), answer(2, "s2r1")]  # a stale scan's extra shard
    document = status_document(cluster_map, statuses, "/nowhere")
    check_schema(document)
    assert document["epoch"] == 7 and document["healthy"] is False
    assert [(s["shard"], [r["node"] for r in s["replicas"]]) for s in document["shards"]] == [
        (0, ["s0r0"]),
        (2, ["s2r1"]),
    ]
    assert sum(s["slots"] for s in document["shards"]) == SLOT_COUNT
