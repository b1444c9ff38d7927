"""Identity with real node processes (issue 15, items 2 and 2b): a wiped replica is refused by its
peers until they forget it, a store that diverged from its log stops its node, a data dir of another
cluster or of a newer format is refused, and data dirs of the previous release are upgraded."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.cluster.local import LocalCluster
from kvstore.replication.applied_position import EXIT_DIVERGED
from kvstore.storage.engine import Storage
from kvstore.storage.identity import FORMAT, IDENTITY_FILE, PEERS_FILE
from tests.conftest import TEST_RAFT, client, start_cluster, wait_until

FIXTURE = Path(__file__).parents[1] / "fixtures" / "release1-datadirs-1x3.tar.gz"


def _follower(cluster: LocalCluster) -> str:
    leader = cluster.wait_for_leaders()[0]["leader"]
    return next(name for name in cluster.node_names() if name != leader)


def _log(cluster: LocalCluster, name: str) -> str:
    return cluster.log_path(name).read_text(errors="replace")


def _exit_code(cluster: LocalCluster, name: str, timeout: float = 30.0) -> int:
    return cluster._children[name].wait(timeout)


def _key_count(cluster: LocalCluster, name: str) -> int:
    for replica in cluster.status()[0]["replicas"]:
        if replica["node"] == name:
            return int(replica["key_count"])
    raise KeyError(name)


def _by_raft_address(cluster: LocalCluster) -> list[str]:
    """Node names in pysyncobj's dialing order: a member dials the members whose address is lower."""
    return sorted(cluster.node_names(), key=lambda name: cluster.node_config(name).raft_advertise)


# Both directions of the handshake refuse: the lowest address is dialed by both peers (they refuse
# it after reading its hello, while it may already be sending them votes); the highest dials both
# (they refuse its hello before answering).
@pytest.mark.parametrize("position", ["dialed by both peers", "dials both peers"])
def test_a_wiped_replica_is_refused_by_its_peers_until_they_forget_it(tmp_path: Path, position: str) -> None:
    cluster = start_cluster(tmp_path / "c", replicas=3)
    try:
        with client(cluster) as kv:
            for i in range(20):
                kv.put(f"before-{i}".encode(), b"v")
        ordered = _by_raft_address(cluster)
        wiped = ordered[0] if position == "dialed by both peers" else ordered[-1]
        wait_until(lambda: _key_count(cluster, wiped) == 20, 20)
        config = cluster.node_config(wiped)
        incarnation = json.loads((Path(config.data_dir) / IDENTITY_FILE).read_text())["incarnation"]
        cluster.kill(wiped, "TERM")
        shutil.rmtree(config.data_dir)
        cluster.start(wiped)
        peers = [name for name in cluster.node_names() if name != wiped]
        for peer in peers:
            wait_until(lambda peer=peer: "came back as incarnation" in _log(cluster, peer), 60)
            line = next(
                line for line in _log(cluster, peer).splitlines() if "came back as incarnation" in line
            )
            assert f"Raft peer {wiped} ({config.raft_advertise})" in line
            assert f"knew it as {incarnation}" in line
            assert f"--forget-peer {config.raft_advertise}" in line
        # The wiped replica's own log says who refused it and why: each peer's refusal reaches it
        # (the refusing side keeps the connection open until it is read; closed at once, a reset
        # dropped most of them unread, whichever side dialed).
        for peer in peers:
            address = cluster.node_config(peer).raft_advertise
            wait_until(lambda address=address: f"refused by Raft peer {address}:" in _log(cluster, wiped), 30)
        told = [line for line in _log(cluster, wiped).splitlines() if "refused by Raft peer" in line]
        assert all("came back as incarnation" in line for line in told), told
        # The shard serves on the other two; the wiped replica gets nothing.
        with client(cluster) as kv:
            for i in range(10):
                kv.put(f"during-{i}".encode(), b"v")
            assert kv.get(b"before-3") == b"v"
        assert _key_count(cluster, wiped) == 0
        assert cluster.pid(wiped) is not None  # refused, not crashed: it waits
        # The way back: each peer forgets it (while running); it is then taken as new, and catches up.
        for peer in peers:
            out = _forget(cluster, peer, config.raft_advertise)
            assert "forgot the incarnation" in out
        wait_until(lambda: _key_count(cluster, wiped) == 30, 60, interval=0.5)
        known = json.loads((Path(cluster.node_config(peers[0]).data_dir) / PEERS_FILE).read_text())
        new_incarnation = json.loads((Path(config.data_dir) / IDENTITY_FILE).read_text())["incarnation"]
        assert known[config.raft_advertise] == new_incarnation != incarnation
    finally:
        cluster.down()


def _forget(cluster: LocalCluster, node: str, address: str) -> str:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kvstore", "node", "--config", str(cluster.dir / "nodes" / f"{node}.toml")]
        + ["--forget-peer", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_store_whose_applied_term_differs_from_its_log_stops_the_node(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", replicas=3)
    try:
        with client(cluster) as kv:
            for i in range(20):
                kv.put(f"k{i}".encode(), b"v")
        victim = _follower(cluster)
        wait_until(lambda: _key_count(cluster, victim) == 20, 20)
        cluster.kill(victim, "TERM")
        data_dir = cluster.node_config(victim).data_dir
        storage = Storage(data_dir, fsync=True)
        index, term = storage.applied_position()
        assert index > 0 and term > 0
        storage.set_applied(index, term + 5)  # as if LMDB came from another history
        storage.commit()
        storage.close()
        cluster.start(victim)
        assert _exit_code(cluster, victim) == EXIT_DIVERGED
        lines = [line for line in _log(cluster, victim).splitlines() if "diverged" in line]
        assert len(lines) == 1
        assert f"data dir {data_dir}: LMDB applied index {index} term {term + 5}" in lines[0]
        assert f"entry {index} has term {term}" in lines[0]
        with client(cluster) as kv:  # the other two serve on
            kv.put(b"after", b"v")
    finally:
        cluster.down()


def test_a_data_dir_of_another_cluster_or_a_newer_format_is_refused(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", replicas=1)
    try:
        name = cluster.node_names()[0]
        cluster.kill(name, "TERM")
        identity_path = Path(cluster.node_config(name).data_dir) / IDENTITY_FILE
        identity = json.loads(identity_path.read_text())
        assert identity["format"] == FORMAT
        assert identity["cluster"] == cluster.node_config(name).cluster.id
        identity_path.write_text(json.dumps({**identity, "cluster": "0123456789abcdef"}))
        cluster.start(name)
        assert _exit_code(cluster, name) != 0
        assert "belongs to cluster 0123456789abcdef" in cluster.log_reason(name)
        identity_path.write_text(json.dumps({**identity, "format": FORMAT + 1}))
        cluster.start(name)
        assert _exit_code(cluster, name) != 0
        reason = cluster.log_reason(name)
        assert f"is in format {FORMAT + 1}, written by a newer kvstore" in reason
        assert f"reads formats up to {FORMAT}" in reason
    finally:
        cluster.down()


def test_data_dirs_of_the_previous_release_are_upgraded_and_keep_every_key(tmp_path: Path) -> None:
    """tests/fixtures/make_release1_datadirs.py: a 1 x 3 cluster's data dirs from before identities
    (journal format 2, LMDB with the applied index alone, no identity file)."""
    cluster = LocalCluster(tmp_path / "c")
    cluster.create(shards=1, replicas=3, raft=TEST_RAFT)
    unpacked = tmp_path / "fixture"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(unpacked, filter="data")
    expected = json.loads((unpacked / "keys.json").read_text())
    for name in cluster.node_names():
        data_dir = Path(cluster.node_config(name).data_dir)
        assert not (unpacked / "data" / name / IDENTITY_FILE).exists()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(unpacked / "data" / name, data_dir)
    cluster.start_all()
    try:
        cluster.wait_until_serving(timeout=60)
        with Client.from_cluster(cluster.dir) as kv:
            for key, value in expected.items():
                assert kv.get(key.encode()) == value.encode(), key
            assert kv.get(b"upgrade-000") is None  # deleted before the upgrade
            kv.put(b"after-upgrade", b"v")
            assert len(expected) == 35
        for name in cluster.node_names():
            identity = json.loads((Path(cluster.node_config(name).data_dir) / IDENTITY_FILE).read_text())
            assert identity["format"] == FORMAT
            assert identity["cluster"] == cluster.node_config(name).cluster.id
        wait_until(lambda: all(_key_count(cluster, n) == 36 for n in cluster.node_names()), 20)
    finally:
        cluster.down()


def test_grpc_calls_naming_another_cluster_are_refused_and_clients_never_switch(tmp_path: Path) -> None:
    import grpc

    from kvstore import errors
    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.proto import kvstore_pb2_grpc as pb_grpc

    cluster = start_cluster(tmp_path / "c", replicas=1)
    try:
        cluster.wait_until_serving()
        cluster_id = cluster.node_config(cluster.node_names()[0]).cluster.id
        assert cluster.cluster_map().cluster_id == cluster_id  # what clients of this directory send
        with client(cluster) as kv:
            kv.put(b"k", b"v")  # with the metadata: accepted
        address = cluster.cluster_map().shards[0].replicas[0].address
        with grpc.insecure_channel(address) as channel:
            admin, store = pb_grpc.AdminStub(channel), pb_grpc.KVStub(channel)
            assert admin.Status(pb.StatusRequest(), timeout=5).cluster_id == cluster_id
            assert admin.ClusterMap(pb.ClusterMapRequest(), timeout=5).cluster_id == cluster_id
            assert store.Get(pb.GetRequest(key=b"k"), timeout=5).kv.value == b"v"  # no metadata: served
            for other in ["0" * 16, "", "x" * 300, "not-an-id"]:
                for call, request in [
                    (store.Get, pb.GetRequest(key=b"k")),
                    (admin.Status, pb.StatusRequest()),
                ]:
                    with pytest.raises(grpc.RpcError) as refused:
                        call(request, timeout=5, metadata=((errors.CLUSTER_ID_KEY, other),))
                    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert isinstance(errors.from_rpc_error(refused.value), errors.ClusterMismatch)
                    assert f"belongs to cluster {cluster_id}" in refused.value.details()
        # A client that knows another cluster (a copy of this one's map, another id) gets the typed
        # error at once, never this cluster's data.
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        import dataclasses

        dataclasses.replace(cluster.cluster_map(), cluster_id="feedfacefeedface").save(
            other_dir / "cluster.json"
        )
        with Client.from_cluster(other_dir) as stranger, pytest.raises(errors.ClusterMismatch):
            stranger.get(b"k")
    finally:
        cluster.down()
