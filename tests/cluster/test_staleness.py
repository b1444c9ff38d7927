"""Bounded staleness from monotonic ages (issue 12): a leader's wall clock, a jump of it, or a forged
stamp cannot make a follower report itself fresher than it provably is.

Drives the state machine's freshness handling directly (its message handler and the transport's
stamping), with pysyncobj's own state set by hand: no sockets, so the clocks can be lied to; and
with real node processes whose wall clocks run a day ahead."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from kvstore import Client
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import TEST_RAFT, wait_until


def test_followers_staleness_grows_while_a_leader_with_a_jumped_clock_is_silent(tmp_path: Path) -> None:
    """Two replicas run a day ahead on the wall clock (one of them leads), the third is right.
    Under the old wall-clock stamps the third reported staleness 0 for a day; with ages it is
    fresh while it hears from the leader and grows in real time once nobody speaks to it."""
    cluster = LocalCluster(tmp_path / "c")
    cluster.create(shards=1, replicas=3, raft=TEST_RAFT)
    jumped, honest = ["s0r0", "s0r1"], "s0r2"
    try:
        for name in jumped:
            config = str(cluster.dir / "nodes" / f"{name}.toml")
            cluster._spawn(name, ["tests.kvstore_jumped_clock", "86400", "node", "--config", config])
        wait_until(lambda: cluster.leader_of(0) in jumped, 30)
        cluster.start(honest)
        with Client.from_cluster(cluster.dir) as kv:
            kv.put(b"stale:k", b"v")
        address = cluster.cluster_map().replica(honest)[1].address
        with grpc.insecure_channel(address) as channel:
            admin = pb_grpc.AdminStub(channel)

            def staleness() -> float:
                try:
                    return admin.Status(pb.StatusRequest(), timeout=2).staleness_seconds
                except grpc.RpcError:
                    return -1.0  # still starting (as "never fresh": -1)

            wait_until(lambda: 0 <= staleness() < 1.0, 15)  # caught up, hearing heartbeats
            assert staleness() > 0.0  # an age is never 0: old code said exactly 0.0 here
            for name in jumped:
                cluster.kill(name, "STOP")  # nobody speaks to the honest follower now
            time.sleep(2.0)
            assert staleness() >= 1.9
            bounded = pb.GetRequest(
                key=b"stale:k", read=pb.ReadOptions(consistency=pb.BOUNDED, max_staleness_seconds=1.0)
            )
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.KVStub(channel).Get(bounded, timeout=2)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # replica_behind
    finally:
        cluster.down()
