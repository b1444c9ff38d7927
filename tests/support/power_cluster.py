"""A local cluster whose replicas keep their data on the power-loss filesystem, and a power cut.

Each replica's data directory (`<dir>/data/<name>`, as LocalCluster.create lays it out) is the
mount point of its own PowerLossMount over `<dir>/backing/<name>`, so a cut drops exactly that
replica's unsynced data. `power_cut` is SIGKILL of every given replica at once (by PID), then a
cut of each one's mount: what a power loss on their hosts would leave on disk.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvstore import Client, errors
from kvstore.chaos.history import Op
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import TEST_RAFT
from tests.support.powerloss_mount import (
    CutReport,
    FuseUnavailable,
    PowerLossMount,
    fuse_unavailable,
    require_fuse,
)


@dataclass
class PoweredCluster:
    cluster: LocalCluster
    mounts: dict[str, PowerLossMount] = field(default_factory=dict)

    def replicas_of(self, shard: int) -> list[str]:
        return [r.name for r in self.cluster.cluster_map().shards[shard].replicas]

    def address(self, name: str) -> str:
        return self.cluster.cluster_map().replica(name)[1].address

    def power_cut(self, names: list[str], torn_seed: int | None = None) -> dict[str, CutReport]:
        """SIGKILL every replica in `names` (all of them dead before any disk is touched), then
        drop each one's unsynced data (with `torn_seed`, a random part of it: a torn cut)."""
        for name in names:
            if self.cluster.pid(name):
                self.cluster.kill(name, "KILL")
        return {
            name: self.mounts[name].cut(None if torn_seed is None else torn_seed + i)
            for i, name in enumerate(names)
        }

    def mount_all(self) -> None:
        """One power-loss filesystem on each replica's data directory, over `<dir>/backing/<name>`
        (before the nodes start)."""
        for name in self.cluster.node_names():
            data_dir = Path(self.cluster.node_config(name).data_dir)
            mount = PowerLossMount(self.cluster.dir / "backing" / name, data_dir)
            mount.log = self.cluster.dir / "logs" / f"{name}.fuse.log"
            self.mounts[name] = mount
            try:
                mount.mount()
            except FuseUnavailable as err:
                fuse_unavailable(str(err))

    def unmount_all(self) -> None:
        for mount in self.mounts.values():
            mount.unmount()


class FusePower:
    """The chaos runner's power supply (kvstore.chaos.power.PowerSupply) on the power-loss
    filesystem: `kvstore chaos` with power cuts, as tests/powerloss/long_run.py drives it."""

    def __init__(self) -> None:
        self.powered: PoweredCluster | None = None

    def attach(self, cluster: LocalCluster) -> None:
        require_fuse()
        self.powered = PoweredCluster(cluster)
        self.powered.mount_all()

    def cut(self, names: list[str], torn_seed: int | None = None) -> int:
        assert self.powered is not None, "attach first"
        return sum(r.bytes_dropped for r in self.powered.power_cut(names, torn_seed).values())

    def detach(self) -> None:
        if self.powered is not None:
            self.powered.unmount_all()


@contextlib.contextmanager
def cluster_on_powerloss_fs(directory: Path, **create: Any) -> Iterator[PoweredCluster]:
    """Create a cluster (1 x 3 by default, TEST_RAFT), mount each replica's data directory on its
    own power-loss filesystem and start it. Every node and every mount goes away on exit."""
    require_fuse()
    cluster = LocalCluster(directory)
    create.setdefault("raft", TEST_RAFT)
    if "topology" not in create:
        create.setdefault("shards", 1)
        create.setdefault("replicas", 3)
    cluster.create(**create)
    powered = PoweredCluster(cluster)
    try:
        powered.mount_all()
        cluster.start_all()
        cluster.wait_for_leaders(30)
        yield powered
    finally:
        cluster.down()
        powered.unmount_all()


def replica_status(address: str) -> pb.StatusResponse | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=2)
    except grpc.RpcError:
        return None


def eventual_get(address: str, keys: list[bytes]) -> dict[bytes, bytes | None]:
    """What one replica has applied for `keys` (no Raft round trip: its own state)."""
    found: dict[bytes, bytes | None] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)
        for key in keys:
            request = pb.GetRequest(key=key, read=pb.ReadOptions(consistency=pb.EVENTUAL))
            response = stub.Get(request, timeout=3)
            found[key] = response.kv.value if response.found else None
    return found


def wait_applied_equal(powered: PoweredCluster, names: list[str], timeout: float) -> int:
    """Wait until every replica in `names` reports the same applied index; return it."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [replica_status(powered.address(n)) for n in names]
        applied = {s.applied_index for s in statuses if s is not None}
        if None not in statuses and len(applied) == 1:
            return applied.pop()
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {names} did not converge on one applied index: {applied}")
        time.sleep(0.1)


def write_under_load(
    kv: Client,
    prefix: bytes,
    count: int,
    seconds: float,
    threads: int = 4,
    stop: threading.Event | None = None,
    history: list[Op] | None = None,
) -> tuple[dict[bytes, bytes], int]:
    """Up to `count` unique puts from `threads` writers for at most `seconds` (or until `stop` is
    set), each recorded in `history` for the linearizability checker when given. Returns the
    acknowledged writes and how many had an unknown outcome (no promise made for those)."""
    acked: dict[bytes, bytes] = {}
    unknown = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def writer(w: int) -> None:
        for i in range(w, count, threads):
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return
            key, value = prefix + b"%06d" % i, b"v-%d-%s" % (i, prefix)
            call = time.monotonic_ns()
            try:
                kv.put(key, value)
                ok: bool | None = True
            except errors.KvError:  # not acknowledged: no promise made (it may still apply)
                ok = None
            with lock:
                if history is not None:
                    ret = time.monotonic_ns() if ok else None
                    history.append(Op(w, "put", key.decode(), value.decode(), None, ok, call, ret))
                if ok:
                    acked[key] = value
                else:
                    unknown[0] += 1

    workers = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 30)
    return acked, unknown[0]
