"""Crashes, restarts, snapshots and a paused leader, on real node processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc

from kvstore import Client, errors
from kvstore.cluster.local import LocalCluster
from kvstore.config import RaftSettings
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import TEST_RAFT, new_leader, wait_until


def _write_loop(
    kv: Client, prefix: bytes, stop: threading.Event, acked: dict[bytes, bytes], limit: int
) -> None:
    """Write unique values until stopped; remember only acknowledged writes."""
    for i in range(limit):
        if stop.is_set():
            return
        key, value = prefix + b"%05d" % i, b"value-%d" % i
        try:
            kv.put(key, value)
        except (errors.UnknownOutcome, errors.Unavailable):
            continue  # not acknowledged: no promise made
        acked[key] = value


def _assert_all_readable(kv: Client, acked: dict[bytes, bytes]) -> None:
    keys = list(acked)
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        got = kv.multi_get(chunk)
        missing = [k for k in chunk if got.get(k) != acked[k]]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"


def test_leader_sigkill_during_writes(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    old_leader = cluster.leader_of(0)
    acked: dict[bytes, bytes] = {}
    stop = threading.Event()
    with Client.from_cluster(cluster.dir, timeout=8.0) as kv:
        writer = threading.Thread(target=_write_loop, args=(kv, b"fo:", stop, acked, 100_000))
        writer.start()
        try:
            wait_until(lambda: len(acked) >= 200, 20)
            killed_at = time.monotonic()
            cluster.kill(old_leader, "KILL")
            leader = new_leader(cluster, 0, old_leader, timeout=15)
            failover = time.monotonic() - killed_at
            count = len(acked)
            wait_until(lambda: len(acked) >= count + 100, 20)  # writes flow again
        finally:
            stop.set()
            writer.join(30)
        assert leader != old_leader
        assert failover < 10, f"failover took {failover:.1f}s"
        _assert_all_readable(kv, acked)
        # The killed node comes back and catches up with everything.
        cluster.start(old_leader)
        old_address = _address(cluster, old_leader)
        wait_until(lambda: _applied(old_address) >= _applied(_address(cluster, leader)), 30)
        last_key = max(acked)
        assert _eventual_get(old_address, last_key) == acked[last_key]


def test_kill_all_replicas_and_restart(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    with Client.from_cluster(cluster.dir) as kv:
        revisions = {b"all:%03d" % i: kv.put(b"all:%03d" % i, b"v%d" % i) for i in range(300)}
        revisions[b"all:multi"] = kv.multi_put({b"all:multi": b"m"})
        kv.compare_and_set(b"all:000", b"cas", expected_revision=revisions[b"all:000"])
        cas_revision = kv.get_item(b"all:000").revision
        applied_before = {n: _applied(_address(cluster, n)) for n in cluster.node_names()}
    for name in cluster.node_names():
        cluster.kill(name, "KILL")
    cluster.start_all()
    cluster.wait_for_leaders(30)
    with Client.from_cluster(cluster.dir) as kv:
        for key, revision in revisions.items():
            item = kv.get_item(key)
            assert item is not None, f"{key!r} lost after restarting every replica"
            if key == b"all:000":
                assert (item.value, item.revision) == (b"cas", cas_revision)
            else:
                assert item.revision == revision, (
                    f"{key!r} re-applied: revision {item.revision} != {revision}"
                )
    # Nothing applied twice: every replica's store is back where it was (plus the new leader's no-op,
    # which does not touch the store).
    for name, before in applied_before.items():
        assert _applied(_address(cluster, name)) >= before


def test_wiped_replica_rejoins_through_snapshot(make_cluster: Callable[..., LocalCluster]) -> None:
    raft = RaftSettings(**{**TEST_RAFT.__dict__, "compaction_min_entries": 300, "compaction_min_time": 5.0})
    cluster = make_cluster(raft=raft)
    leader = cluster.leader_of(0)
    victim = next(n for n in cluster.node_names() if n != leader)
    cluster.kill(victim, "KILL")
    with Client.from_cluster(cluster.dir) as kv:
        for i in range(0, 1500, 50):  # enough entries to compact the leader's log past the victim
            kv.put_many({b"snap:%05d" % j: b"x%d" % j for j in range(i, i + 50)}, atomic=False)
        for i in range(200):
            kv.put(b"snap:single:%d" % i, b"y")
    leader_dir = cluster.dir / "data" / leader
    wait_until(lambda: (leader_dir / "raft.dump").exists(), 30)
    shutil.rmtree(cluster.dir / "data" / victim)
    # Its peers remember its old incarnation and would refuse it (tests/cluster/test_identity.py):
    # the documented way back, on each peer, while they run.
    for peer in (n for n in cluster.node_names() if n != victim):
        forget = [
            sys.executable,
            "-m",
            "kvstore",
            "node",
            "--config",
            str(cluster.dir / "nodes" / f"{peer}.toml"),
        ]
        forget += ["--forget-peer", cluster.node_config(victim).raft_advertise]
        subprocess.run(forget, check=True, capture_output=True, timeout=60)
    cluster.start(victim)
    leader_address, victim_address = _address(cluster, leader), _address(cluster, victim)
    wait_until(lambda: _applied(victim_address) == _applied(leader_address) > 0, 60)
    assert _checksum_of(cluster, victim) == _checksum_of(cluster, leader)
    log = cluster.log_path(victim).read_text()
    assert "installing snapshot" in log, "the wiped replica should have caught up through a snapshot"


def test_paused_leader_never_serves_a_stale_strong_read(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    old_leader = cluster.leader_of(0)
    old_address = _address(cluster, old_leader)
    with Client.from_cluster(cluster.dir) as kv:
        kv.put(b"stale:x", b"1")
        cluster.kill(old_leader, "STOP")
        try:
            leader = new_leader(cluster, 0, old_leader, timeout=20)
            wait_until(lambda: _try_put(kv, b"stale:x", b"2"), 20)
            assert kv.get(b"stale:x") == b"2"
        finally:
            cluster.kill(old_leader, "CONT")
    # Straight after SIGCONT the old leader still believes it leads. A strong read sent to it must
    # wait for a barrier it cannot commit in its old term: it answers the new value or an error.
    answers = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            answers.append(_strong_get(old_address, b"stale:x"))
        except grpc.RpcError as exc:
            answers.append(exc.code().name)
    assert b"1" not in answers, f"stale read from the paused old leader: {answers[:10]}"
    assert b"2" in answers
    assert leader != old_leader


def test_sigterm_shuts_a_node_down_gracefully(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    leader = cluster.leader_of(0)
    follower = next(n for n in cluster.node_names() if n != leader)
    with Client.from_cluster(cluster.dir) as kv:
        kv.put(b"term:a", b"1")
        started = time.monotonic()
        cluster.kill(follower, "TERM")
        assert cluster.pid(follower) is None, "the node should exit on SIGTERM"
        assert time.monotonic() - started < 10
        assert "shutting down" in cluster.log_path(follower).read_text()
        kv.put(b"term:b", b"2")  # the other two still form a majority
        cluster.start(follower)
        address = _address(cluster, follower)
        wait_until(lambda: _applied(address) >= _applied(_address(cluster, leader)), 30)
        assert _eventual_get(address, b"term:b") == b"2"


# ----- helpers ---------------------------------------------------------------------------------


def _address(cluster: LocalCluster, name: str) -> str:
    return cluster.cluster_map().replica(name)[1].address


def _status(address: str) -> pb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=2)


def _applied(address: str) -> int:
    try:
        return _status(address).applied_index
    except grpc.RpcError:
        return -1


def _strong_get(address: str, key: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.KVStub(channel).Get(pb.GetRequest(key=key), timeout=3)
    return response.kv.value if response.found else b"<absent>"


def _eventual_get(address: str, key: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        request = pb.GetRequest(key=key, read=pb.ReadOptions(consistency=pb.EVENTUAL))
        response = pb_grpc.KVStub(channel).Get(request, timeout=3)
    return response.kv.value if response.found else b"<absent>"


def _try_put(kv: Client, key: bytes, value: bytes) -> bool:
    try:
        kv.put(key, value)
        return True
    except errors.KvError:
        return False


def _checksum_of(cluster: LocalCluster, name: str) -> set[tuple[bytes, bytes, int]]:
    """Everything a replica holds, read from it alone (eventual reads, so no Raft involved)."""
    address = _address(cluster, name)
    items: set[tuple[bytes, bytes, int]] = set()
    continuation = b""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)
        for _ in range(1000):
            request = pb.ScanRequest(
                limit=1000, continuation=continuation, read=pb.ReadOptions(consistency=pb.EVENTUAL)
            )
            page = stub.Scan(request, timeout=5)
            items |= {(kv.key, kv.value, kv.revision) for kv in page.kvs}
            if not page.continuation:
                break
            continuation = page.continuation
    return items
