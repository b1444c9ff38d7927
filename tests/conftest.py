"""Shared fixtures: real node processes on loopback, free ports, every process stopped by PID."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from kvstore import Client, errors
from kvstore.client.core import ClientCore
from kvstore.cluster.local import LocalCluster
from kvstore.cluster.topology import Topology, named_topology
from kvstore.config import NodeConfig, RaftSettings
from kvstore.routing.cluster_map import ClusterMap

# Faster failure detection than the defaults, still wide enough for a loaded 2-core machine.
TEST_RAFT = RaftSettings(min_timeout=0.8, max_timeout=1.6, leader_fallback_timeout=2.5, connection_retry=0.3)


def start_cluster(
    directory: Path,
    shards: int | None = None,
    replicas: int | None = None,
    raft: RaftSettings | None = None,
    vnodes: int | None = None,
    topology: Topology | str | None = None,
    **settings: Any,
) -> LocalCluster:
    """Create and start a cluster, waiting for its leaders. Its shape: `topology` (a Topology or
    the name of a file in cluster/), or `shards`, `replicas` and `vnodes` (1 x 3, 256 vnodes by
    default), never both. `settings`: the other sections (storage=, server=) for every node, as
    `LocalCluster.create` takes them."""
    if isinstance(topology, str):
        topology = named_topology(topology)
    cluster = LocalCluster(directory)
    cluster.create(
        shards=shards,
        replicas=replicas,
        raft=raft or TEST_RAFT,
        vnodes=vnodes,
        topology=topology,
        **settings,
    )
    cluster.start_all()
    try:
        cluster.wait_for_leaders(30)
    except BaseException:
        cluster.down()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(directory: Path, **kwargs: object) -> Iterator[LocalCluster]:
    cluster = start_cluster(directory, **kwargs)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start clusters inside a test; all of them are stopped at teardown, even on failure."""
    started: list[LocalCluster] = []

    def make(name: str = "c", **kwargs: object) -> LocalCluster:
        cluster = start_cluster(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.down()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 1-shard x 3-replica cluster reused by a module's read-only-ish tests."""
    with running_cluster(tmp_path_factory.mktemp("shared"), topology="local-1x3") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sharded_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 shards x 3 replicas."""
    with running_cluster(tmp_path_factory.mktemp("sharded"), topology="local-3x3") as cluster:
        yield cluster


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process a test started, SIGKILL it if it lingers, and reap it."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def new_leader(cluster: LocalCluster, shard: int, not_name: str, timeout: float = 15.0) -> str:
    def check() -> str | None:
        leader = cluster.leader_of(shard)
        return leader if leader and leader != not_name else None

    return str(wait_until(check, timeout))


def client(cluster: LocalCluster, **kwargs: object) -> Client:
    return Client.from_cluster(cluster.dir, **kwargs)


def write_node_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """A node config file with the defaults, and `sections` merged in (checked only when loaded)."""
    config = NodeConfig(
        name="n",
        shard=0,
        listen="127.0.0.1:1",
        raft_bind="127.0.0.1:2",
        raft_advertise="127.0.0.1:2",
        peers=[],
        data_dir=str(tmp_path / "d"),
        cluster_map=str(tmp_path / "m.json"),
    )
    data = dataclasses.asdict(config)
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def client_with_map(cluster_map: ClusterMap) -> tuple[Client, list[errors.WrongShard]]:
    """A client that starts from `cluster_map` (an older one, in the tests that use it), and the
    list of every WrongShard it meets (it still follows each, as it would)."""
    client = Client(_core=ClientCore(cluster_map=cluster_map))
    redirects: list[errors.WrongShard] = []
    perform = client._perform

    def counting(step: Any) -> Any:
        try:
            return perform(step)
        except errors.WrongShard as err:
            redirects.append(err)
            raise

    client._perform = counting  # type: ignore[method-assign]
    return client, redirects
