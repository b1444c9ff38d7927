"""grpc.health.v1 on nodes and routers: SERVING on a healthy cluster (main port and the plaintext
health port), NOT_SERVING on a node whose applies are frozen or whose Raft tick thread is stalled
while its gRPC server still answers, back to SERVING when it recovers; `cluster status` and
`kvstore health` show it. The stuck nodes are real node processes made stuck through the
fault-injection signals (ServerSettings.fault_injection_signals), never a SIGSTOP (a stopped
process cannot answer a probe at all)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.cluster.local import LocalCluster, free_ports
from kvstore.config import ServerSettings
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import TEST_RAFT, client, stop_process, wait_until

STALL = 2.0  # health_stall_seconds in the cluster under test


SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """1 shard x 3 replicas that obey the fault-injection signals."""
    c = LocalCluster(tmp_path_factory.mktemp("health"))
    c.create(
        shards=1,
        replicas=3,
        raft=TEST_RAFT,
        server=ServerSettings(health_stall_seconds=STALL, fault_injection_signals=True),
    )
    c.start_all()
    try:
        c.wait_for_leaders(30)
        yield c
    finally:
        c.down()


def _check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status


def _admin_status(address: str) -> pb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=2.0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=60
    )


def _addresses(cluster: LocalCluster, name: str) -> tuple[str, str]:
    config = cluster.node_config(name)
    return config.listen, config.health_listen


def _status_or_none(address: str) -> int | None:
    try:
        return _check(address)
    except grpc.RpcError:
        return None  # not listening (yet)


def _wait_health(address: str, status: int, timeout: float) -> float:
    start = time.monotonic()
    wait_until(lambda: _status_or_none(address) == status, timeout, interval=0.1)
    return time.monotonic() - start


def _follower(cluster: LocalCluster) -> str:
    leader = cluster.leader_of(0)
    return next(n for n in cluster.node_names() if n != leader)


def test_healthy_cluster_serves_on_main_and_health_ports(cluster: LocalCluster) -> None:
    for name in cluster.node_names():
        main, health_port = _addresses(cluster, name)
        assert health_port and health_port != main
        for address in (main, health_port):
            for service in ("", "kvstore.v2.KV", "liveness"):
                _wait_health(address, SERVING, 10)
                assert _check(address, service) == SERVING, (name, address, service)
        # The plaintext health port serves nothing else.
        with pytest.raises(grpc.RpcError) as err:
            _admin_status(health_port)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _admin_status(main).health == "serving"


def test_cluster_status_json_and_table_show_health(cluster: LocalCluster) -> None:
    out = _cli("cluster", "status", "--dir", str(cluster.dir), "--json")
    assert out.returncode == 0, out.stderr
    replicas = json.loads(out.stdout)["shards"][0]["replicas"]
    assert [r["health"] for r in replicas] == ["serving"] * 3
    table = _cli("cluster", "status", "--dir", str(cluster.dir))
    assert table.stdout.count("health=serving") == 3


def test_health_cli_exit_codes(cluster: LocalCluster) -> None:
    main, health_port = _addresses(cluster, cluster.node_names()[0])
    ok = _cli("health", "--address", health_port)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{health_port}: SERVING")
    assert _cli("health", "--address", main, "--service", "kvstore.v2.KV").returncode == 0
    unknown = _cli("health", "--address", main, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "SERVICE_UNKNOWN" in unknown.stdout
    (closed,) = free_ports(1)
    nobody = _cli("health", "--address", f"127.0.0.1:{closed}", "--timeout", "1")
    assert nobody.returncode == 2 and "no health answer" in nobody.stderr


def test_frozen_applies_go_not_serving_and_recover(cluster: LocalCluster) -> None:
    name = _follower(cluster)
    main, health_port = _addresses(cluster, name)
    pid = cluster.pid(name)
    assert pid
    os.kill(pid, signal.SIGUSR1)  # freeze applies on a follower: Raft keeps ticking
    try:
        assert _check(health_port) == SERVING  # nothing to apply yet: frozen is not stuck
        start = time.monotonic()
        with client(cluster) as kv:  # committed entries now wait on that follower
            for i in range(20):
                kv.put(f"frozen-{i}".encode(), b"v")
        wait_until(lambda: _status_or_none(health_port) == NOT_SERVING, STALL + 8, interval=0.1)
        waited = time.monotonic() - start
        print(f"\n{name}: NOT_SERVING {waited:.1f}s after the first write (bound {STALL}s)")
        assert waited >= STALL - 0.2  # not before the bound (the clocks are the same monotonic clock)
        # Its gRPC server still answers, and says why.
        status = _admin_status(main)
        assert status.health.startswith("not_serving: applies stuck: applied index"), status.health
        assert status.commit_index > status.applied_index
        assert _check(main) == NOT_SERVING and _check(main, "kvstore.v2.KV") == NOT_SERVING
        assert _check(health_port, "liveness") == NOT_SERVING
        failing = _cli("health", "--address", health_port)
        assert (failing.returncode, failing.stdout.strip()) == (1, f"{health_port}: NOT_SERVING")
        out = _cli("cluster", "status", "--dir", str(cluster.dir), "--json")
        by_name = {r["node"]: r for r in json.loads(out.stdout)["shards"][0]["replicas"]}
        assert by_name[name]["health"].startswith("not_serving: applies stuck")
        assert [r["health"] for n, r in by_name.items() if n != name] == ["serving"] * 2
    finally:
        os.kill(pid, signal.SIGUSR1)
    _wait_health(health_port, SERVING, 10)
    assert _admin_status(main).health == "serving"


def test_stalled_tick_thread_goes_not_serving_and_recovers(cluster: LocalCluster) -> None:
    name = _follower(cluster)
    main, health_port = _addresses(cluster, name)
    pid = cluster.pid(name)
    assert pid
    os.kill(pid, signal.SIGUSR2)  # the tick thread blocks at the end of its next tick
    try:
        waited = _wait_health(health_port, NOT_SERVING, STALL + 8)
        print(f"\n{name}: NOT_SERVING {waited:.1f}s after the tick thread stalled (bound {STALL}s)")
        status = _admin_status(main)  # the gRPC server still answers
        assert status.health.startswith("not_serving: raft tick thread stalled: no tick for"), status.health
        assert _check(main) == NOT_SERVING and _check(health_port, "liveness") == NOT_SERVING
    finally:
        os.kill(pid, signal.SIGUSR2)
    _wait_health(health_port, SERVING, 10)
    cluster.wait_for_leaders(30)  # the released node may have started an election
    with client(cluster) as kv:
        kv.put(b"after-stall", b"ok")
        assert kv.get(b"after-stall") == b"ok"


def test_node_with_a_stalled_tick_thread_still_stops_on_sigterm(cluster: LocalCluster) -> None:
    name = _follower(cluster)
    _, health_port = _addresses(cluster, name)
    pid = cluster.pid(name)
    assert pid
    os.kill(pid, signal.SIGUSR2)
    _wait_health(health_port, NOT_SERVING, STALL + 8)
    start = time.monotonic()
    cluster.kill(name, "TERM")  # waits up to 10 s for the process to go
    took = time.monotonic() - start
    assert cluster.pid(name) is None, "a stalled node did not exit on SIGTERM"
    print(f"\n{name}: exited {took:.1f}s after SIGTERM with its tick thread stalled")
    cluster.start(name)
    _wait_health(health_port, SERVING, 30)
    cluster.wait_for_leaders(30)


def test_stopped_node_shows_down(cluster: LocalCluster) -> None:
    name = _follower(cluster)
    _, health_port = _addresses(cluster, name)
    cluster.kill(name, "TERM")
    try:
        by_name = {r["node"]: r for r in cluster.status()[0]["replicas"]}
        assert by_name[name]["health"] == "down"
        assert _cli("health", "--address", health_port, "--timeout", "1").returncode == 2
    finally:
        cluster.start(name)
    _wait_health(health_port, SERVING, 30)


def test_router_serves_health(cluster: LocalCluster, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "router.log", "wb")
    router = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "router", "--cluster", str(cluster.dir), "--listen", address],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _cli("health", "--address", address).returncode == 0, 20, interval=0.3)
        assert _check(address, "kvstore.v2.KV") == SERVING
    finally:
        stop_process(router)
        log.close()
