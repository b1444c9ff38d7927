"""Short fault runs checked by machine (marker `chaos`; they run in CI, the long runs are by hand).

A checker is trusted only because it catches a planted bug: the first test turns on
`ServerSettings.unsafe_local_strong_reads` (strong reads served by whoever believes it leads),
cuts the leader off, commits a new value through the new leader and reads from the old one; the
recorded history must then fail the linearizability check, and the same scenario without the bug
must pass it. The same run without
the bug, and runs with every nemesis, must show no anomaly at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kvstore import Client, errors
from kvstore.chaos.checker import check_linearizable
from kvstore.chaos.history import Op
from kvstore.chaos.runner import ChaosOptions, ChaosRun
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import new_leader

pytestmark = pytest.mark.chaos


def _run(tmp_path: Path, **kwargs: object) -> object:
    options = ChaosOptions(out=tmp_path / "chaos", **kwargs)  # type: ignore[arg-type]
    return ChaosRun(options).run()


def _deposed_leader_read(tmp_path: Path, unsafe: bool) -> list[Op]:
    """x=v1; cut the leader's Raft links; x=v2 through the new leader; then a strong read of x
    sent to the old leader, which still believes it leads. Returns the recorded history."""
    run = ChaosRun(
        ChaosOptions(
            out=tmp_path / "c", shards=1, unsafe_local_strong_reads=unsafe, leader_fallback_timeout=30.0
        )
    )
    cluster = run._start_cluster()
    try:
        old = cluster.leader_of(0)
        assert old and run.proxies is not None
        old_address = cluster.cluster_map().replica(old)[1].address
        ops = []
        with Client.from_cluster(cluster.dir, timeout=6.0) as kv:
            ops.append(_timed(0, "put", "v1", lambda: kv.put(b"x", b"v1")))
            run.proxies.controller.isolate(old)
            new_leader(cluster, 0, old, timeout=20)
            ops.append(_timed(0, "put", "v2", lambda: kv.put(b"x", b"v2")))
        ops.append(_timed(1, "get", None, lambda: _strong_get(old_address)))
        return ops
    finally:
        cluster.down()
        if run.proxies is not None:
            run.proxies.stop()


def _timed(client: int, kind: str, value: str | None, call: Callable[[], object]) -> Op:
    op = Op(
        client=client,
        kind=kind,
        key="x",
        value=value,
        expected=None,
        ok=None,
        call=time.monotonic_ns(),
        ret=None,
    )
    try:
        result = call()
    except (errors.KvError, grpc.RpcError):
        return op  # no answer: outcome unknown (a read that says nothing)
    op.ok, op.ret = True, time.monotonic_ns()
    if kind == "get":
        op.value = result  # type: ignore[assignment]
    return op


def _strong_get(address: str) -> str | None:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.KVStub(channel).Get(pb.GetRequest(key=b"x"), timeout=3)
    return response.kv.value.decode() if response.found else None


def test_planted_stale_read_bug_is_caught(tmp_path: Path) -> None:
    ops = _deposed_leader_read(tmp_path, unsafe=True)
    assert ops[0].ok and ops[1].ok
    assert ops[2].ok and ops[2].value == "v1", "the planted bug should serve the old value"
    result = check_linearizable(ops)
    assert not result.ok and "x" in result.failed_keys


def test_same_scenario_without_the_bug_passes(tmp_path: Path) -> None:
    ops = _deposed_leader_read(tmp_path, unsafe=False)
    assert ops[0].ok and ops[1].ok
    assert ops[2].value != "v1"  # the barrier cannot commit in the old term: an error, or v2
    assert check_linearizable(ops).ok


def test_same_pauses_without_the_bug_pass(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        shards=1,
        duration=20,
        nemeses=("pause",),
        seed=1,
        fault_gap=(1.0, 2.0),
        fault_length=(3.0, 4.0),
    )
    assert report.faults.get("pause", 0) >= 2
    assert report.ok, report.to_markdown()


@pytest.mark.parametrize("nemesis", ["kill", "partition", "delay"])
def test_each_nemesis_leaves_no_anomaly(tmp_path: Path, nemesis: str) -> None:
    report = _run(tmp_path, shards=1, duration=18, nemeses=(nemesis,), seed=7, fault_gap=(1.0, 2.5))
    assert report.faults.get(nemesis, 0) >= 2
    assert report.ops_checked > 100
    assert report.ok, report.to_markdown()
    assert report.lost_writes == 0 and report.converged


def test_mixed_nemeses_on_two_shards(tmp_path: Path) -> None:
    report = _run(tmp_path, shards=2, duration=30, seed=11)
    assert sum(report.faults.values()) >= 3
    assert report.ok, report.to_markdown()


def test_slot_moves_under_kills_and_partitions_lose_nothing(tmp_path: Path) -> None:
    """The `reshard` nemesis (issue 16, item 7): the slots of the workload's keys move back and
    forth between the shards all through the run while leaders (of the shards and of the
    metadata group) are killed and cut off; the strong history stays linearizable, no
    acknowledged write is lost, and every replica converges."""
    report = _run(tmp_path, shards=2, duration=30, nemeses=("reshard", "kill", "partition"), seed=5)
    assert report.faults.get("reshard", 0) >= 3, report.fault_log
    assert report.ops_checked > 100
    assert report.ok, report.to_markdown()
    assert report.lost_writes == 0 and report.converged
