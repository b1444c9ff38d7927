"""Tunable consistency against real clusters (see docs/consistency.md).

What is proven, each on real node processes over real gRPC:
- a lagging follower serves an older value to EVENTUAL reads, never to SESSION or STRONG reads
  (lag made deterministic with the fault proxy, and with SIGSTOP/SIGCONT);
- SESSION: read-your-writes over every replica and shard, monotonic reads, token hand-off;
- BOUNDED(s): never older than s, on a healthy cluster and at a follower stopped longer than s;
- replica progress is visible in Admin.Status; the CLI reads at every level;
- (the behavioural suite both SDK doors pass: tests/cluster/test_sdk_doors.py).
"""

from __future__ import annotations

import bisect
import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import kvstore.cluster.local as local_cluster
from kvstore import Client, Consistency, ReadConsistency, ReadPolicy, errors
from kvstore.chaos.proxy import ProxyCluster
from kvstore.client.core import ClientCore, ClientSettings
from kvstore.client.session import decode_session
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap, ShardInfo
from tests.conftest import TEST_RAFT, running_cluster, wait_until

SHARDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """2 shards x 3 replicas, shared by every test here except the proxied one."""
    with running_cluster(tmp_path_factory.mktemp("consistency"), shards=SHARDS) as c:
        yield c


# ----- helpers ---------------------------------------------------------------------------------


def read_options(level: int, *, session: dict[int, int] | None = None, bound: float = 0.0) -> pb.ReadOptions:
    return pb.ReadOptions(consistency=level, session=session or {}, max_staleness_seconds=bound)


class Replica:
    """Direct gRPC access to one replica: no routing, no fallback, so we see exactly what it serves."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.kv = pb_grpc.KVStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def get(self, key: bytes, read: pb.ReadOptions, timeout: float = 5.0) -> pb.GetResponse:
        try:
            return self.kv.Get(pb.GetRequest(key=key, read=read), timeout=timeout)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None

    def get_later(self, key: bytes, read: pb.ReadOptions, timeout: float = 5.0) -> Any:
        """Send now, collect with `outcome()`: lets a request wait in a stopped process's socket."""
        return self.kv.Get.future(pb.GetRequest(key=key, read=read), timeout=timeout)

    def value(self, key: bytes) -> bytes | None:
        response = self.get(key, read_options(pb.EVENTUAL))
        return response.kv.value if response.found else None

    def status(self) -> pb.StatusResponse:
        return self.admin.Status(pb.StatusRequest(), timeout=5.0)

    def close(self) -> None:
        self.channel.close()


def outcome(future: Any) -> pb.GetResponse | errors.KvError:
    try:
        return future.result()
    except grpc.RpcError as exc:
        return errors.from_rpc_error(exc)


def address_of(cluster: LocalCluster, name: str) -> str:
    return cluster.cluster_map().replica(name)[1].address


def leader_and_follower(cluster: LocalCluster, shard: int) -> tuple[str, str]:
    leader = cluster.leader_of(shard)
    assert leader is not None
    names = [r.name for r in cluster.cluster_map().shard(shard).replicas]
    return leader, next(n for n in names if n != leader)


def key_on_shard(cluster: LocalCluster, shard: int, prefix: str) -> bytes:
    ring = cluster.cluster_map().slots
    for i in range(10_000):
        key = f"{prefix}:{i}".encode()
        if ring.shard_for(key) == shard:
            return key
    raise AssertionError(f"no key for shard {shard}")


def pinned_client(
    cluster: LocalCluster,
    name: str,
    consistency: ReadConsistency,
    session: str | None = None,
    timeout: float = 5.0,
) -> Client:
    """A client whose map lists only `name` for its shard: every read of that shard goes there."""
    full = cluster.cluster_map()
    shard, replica = full.replica(name)
    shards = tuple(ShardInfo(s.id, (replica,)) if s.id == shard.id else s for s in full.shards)
    core = ClientCore(
        cluster_map=ClusterMap(full.epoch, shards, full.vnodes_per_shard),
        consistency=consistency,
        read_policy=ReadPolicy.ROUND_ROBIN,  # over the one replica listed, whoever leads
        session=session,
        settings=ClientSettings(timeout=timeout, rpc_timeout=min(timeout, 5.0)),
    )
    return Client(_core=core)


def served(kv: Client, key: bytes, consistency: ReadConsistency | None = None) -> pb.GetResponse:
    """`kv.get` with the response header kept (it names the replica that served the read)."""
    return kv._run(kv.core.get(key, consistency))


def as_int(response: pb.GetResponse) -> int:
    return int(response.kv.value) if response.found else -1


class Writer(threading.Thread):
    """Writes 0, 1, 2... round-robin over `keys`, one at a time, recording when each was acknowledged."""

    def __init__(self, directory: Path, keys: list[bytes], max_ops: int, max_seconds: float) -> None:
        super().__init__(daemon=True)
        self.directory, self.keys = directory, keys
        self.max_ops, self.max_seconds = max_ops, max_seconds
        self.acks: dict[bytes, list[tuple[float, int]]] = {k: [] for k in keys}
        self.highest = -1  # highest value ever sent (acknowledged or not)
        self.failures: list[errors.KvError] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with Client.from_cluster(self.directory, timeout=5.0) as kv:
            for value in range(self.max_ops):
                if self.halt.is_set() or time.monotonic() > deadline:
                    return
                key = self.keys[value % len(self.keys)]
                self.highest = value
                try:
                    kv.put(key, b"%d" % value)
                except errors.KvError as err:  # not acknowledged: no promise to check
                    self.failures.append(err)
                    continue
                self.acks[key].append((time.monotonic(), value))

    def floor(self, key: bytes, moment: float) -> int:
        """The last value of `key` acknowledged strictly before `moment` (-1 if none)."""
        acks = self.acks[key]
        i = bisect.bisect_left(acks, (moment, -1))
        return acks[i - 1][1] if i else -1

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "writer thread did not stop"


# ----- 1. a lagging follower: stale EVENTUAL reads, never stale SESSION / STRONG ---------------


@contextlib.contextmanager
def proxied_cluster(directory: Path) -> Iterator[tuple[LocalCluster, ProxyCluster]]:
    """1 shard x 3 replicas whose Raft traffic all goes through fault proxies."""
    names = [f"s0r{r}" for r in range(3)]
    ports = local_cluster.free_ports(3 * len(names))  # gRPC, Raft, then health ports
    # LocalCluster.create gives replica i the ports [2i] (gRPC) and [2i+1] (Raft), then the health
    # ports: choose them now, so the proxies know the real Raft addresses before the replicas are
    # told to advertise proxies.
    real = {name: f"127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names)}
    cluster = LocalCluster(directory)
    # Raft traffic is encrypted: the proxies read who dials with the shard's secret (written by create()).
    proxies = ProxyCluster(real, secret_files={name: cluster.secret_path(0) for name in names})
    advertised = proxies.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(local_cluster, "free_ports", lambda count: ports)
            cluster.create(shards=1, replicas=3, raft=TEST_RAFT, proxied_raft=advertised)
        for name in names:
            config = cluster.node_config(name)
            assert (config.raft_bind, config.raft_advertise) == (real[name], advertised[name])
        cluster.start_all()
        cluster.wait_for_leaders(30)
        yield cluster, proxies
    finally:
        if cluster.map_path.exists():
            cluster.down()
        proxies.stop()


def test_isolated_follower_serves_stale_eventual_reads_only(tmp_path: Path) -> None:
    """Deterministic lag: the proxy cuts one follower off, the majority commits v2 without it."""
    key = b"lag:k"
    with proxied_cluster(tmp_path / "proxied") as (cluster, proxies):
        leader, lagger = leader_and_follower(cluster, 0)
        replica = Replica(address_of(cluster, lagger))
        writer = Client.from_cluster(cluster.dir, read_policy=ReadPolicy.FOLLOWERS_ONLY, timeout=15.0)
        try:
            first = writer.put(key, b"v1")
            wait_until(lambda: replica.value(key) == b"v1", 15, 0.02)
            proxies.controller.isolate(lagger)
            cut_at = time.monotonic()
            second = writer.put(key, b"v2")
            token = writer.session_token()
            assert decode_session(token)[0] >= second > first

            # EVENTUAL at the cut-off follower: the older value, straight from the replica and via a client.
            stale = replica.get(key, read_options(pb.EVENTUAL))
            assert (stale.kv.value, stale.kv.revision) == (b"v1", first)
            with pinned_client(cluster, lagger, Consistency.EVENTUAL) as pinned:
                assert pinned.get(key) == b"v1"
            # The lag is visible in its status.
            lag_status = replica.status()
            assert lag_status.applied_index < second
            leader_replica = Replica(address_of(cluster, leader))
            assert leader_replica.status().commit_index >= second
            leader_replica.close()

            # SESSION with the writer's token: the replica refuses rather than answer from the past.
            with pytest.raises(errors.ReplicaBehind):
                replica.get(key, read_options(pb.SESSION, session={0: second}))
            with pinned_client(cluster, lagger, Consistency.SESSION, session=token, timeout=1.5) as pinned:
                # Refused until the client's deadline (the last attempt may end on that deadline).
                with pytest.raises(errors.ReplicaBehind):
                    pinned.get(key)
            # BOUNDED: once the cut is older than the bound, the replica refuses too.
            time.sleep(max(0.0, cut_at + 0.6 - time.monotonic()))
            with pytest.raises(errors.ReplicaBehind):
                replica.get(key, read_options(pb.BOUNDED, bound=0.3))
            assert replica.status().staleness_seconds > 0.3
            # STRONG: no barrier can commit through a cut-off replica, so an error, never v1.
            with pytest.raises(errors.KvError):
                replica.get(key, read_options(pb.STRONG), timeout=8.0)

            # The writer's reads through FOLLOWERS_ONLY move on to a replica that can serve them.
            for level in (Consistency.SESSION, Consistency.SESSION, Consistency.bounded(0.3)):
                assert writer.get(key, consistency=level) == b"v2"
            assert writer.get(key, consistency=Consistency.STRONG) == b"v2"

            proxies.controller.heal()
            wait_until(lambda: replica.value(key) == b"v2", 20, 0.05)  # and it converges
            cluster.wait_for_leaders(30)
        finally:
            writer.close()
            replica.close()


def test_stopped_follower_serves_stale_eventual_reads_but_never_stale_session_or_strong(
    cluster: LocalCluster,
) -> None:
    """SIGSTOP a follower, commit a write without it, queue three reads at it, SIGCONT it.

    The three requests wait in the same socket and are served the moment the process resumes,
    usually before the append carrying the write is applied: EVENTUAL may then answer with the
    old value; SESSION (the writer's token) and STRONG must not."""
    _, lagger = leader_and_follower(cluster, 0)
    key = key_on_shard(cluster, 0, "stopped-lag")
    replica = Replica(address_of(cluster, lagger))
    stale_eventual = served_session = served_strong = 0
    try:
        with Client.from_cluster(cluster.dir) as writer:
            for attempt in range(4):
                old, new = b"old-%d" % attempt, b"new-%d" % attempt
                writer.put(key, old)
                wait_until(lambda old=old: replica.value(key) == old, 10, 0.02)
                cluster.kill(lagger, "STOP")
                try:
                    revision = writer.put(key, new)
                    pending = {
                        "eventual": replica.get_later(key, read_options(pb.EVENTUAL)),
                        "session": replica.get_later(key, read_options(pb.SESSION, session={0: revision})),
                        "strong": replica.get_later(key, read_options(pb.STRONG)),
                    }
                    time.sleep(0.05)  # let the requests reach the stopped process's socket
                finally:
                    cluster.kill(lagger, "CONT")
                got = {level: outcome(future) for level, future in pending.items()}

                assert isinstance(got["eventual"], pb.GetResponse), got["eventual"]
                assert got["eventual"].kv.value in (old, new)
                stale_eventual += got["eventual"].kv.value == old
                if isinstance(got["session"], pb.GetResponse):
                    assert got["session"].kv.value == new and got["session"].kv.revision == revision
                    served_session += 1
                else:
                    assert isinstance(got["session"], errors.ReplicaBehind), got["session"]
                if isinstance(got["strong"], pb.GetResponse):
                    assert got["strong"].kv.value == new
                    served_strong += 1
                else:
                    refusal = got["strong"]
                    assert isinstance(refusal, errors.Unavailable | errors.UnknownOutcome), refusal
    finally:
        replica.close()
    print(
        f"stopped follower, 4 rounds: {stale_eventual} stale EVENTUAL, {served_session} SESSION and "
        f"{served_strong} STRONG reads served by it (all fresh)"
    )
    assert stale_eventual >= 1, "the stopped follower never served the older value to EVENTUAL reads"
    assert served_session >= 1 and served_strong >= 1  # the "never stale" checks were exercised


# ----- 2. SESSION: read-your-writes over every replica and shard -------------------------------


@pytest.mark.parametrize("policy", [ReadPolicy.ROUND_ROBIN, ReadPolicy.FOLLOWERS_ONLY])
def test_session_reads_your_writes_on_every_replica(cluster: LocalCluster, policy: ReadPolicy) -> None:
    leaders = {s["shard"]: s["leader"] for s in cluster.status()}
    ring = cluster.cluster_map().slots
    keys = [b"ryw:%s:%d" % (policy.value.encode(), i) for i in range(8)]
    assert {ring.shard_for(k) for k in keys} == set(range(SHARDS))
    servers: dict[int, Counter[str]] = {s: Counter() for s in range(SHARDS)}
    deadline = time.monotonic() + 20
    ops = 0
    with Client.from_cluster(cluster.dir, consistency=Consistency.SESSION, read_policy=policy) as kv:
        while ops < 300 and time.monotonic() < deadline:
            key = keys[ops % len(keys)]
            value = b"%d" % ops
            kv.put(key, value)
            response = served(kv, key)
            assert response.kv.value == value, f"op {ops}: read {response.kv.value!r} after writing {value!r}"
            servers[ring.shard_for(key)][response.header.served_by] += 1
            ops += 1
    assert ops >= 100, f"only {ops} write-then-read rounds in 20 s"
    for shard, counts in servers.items():
        followers = {name for name in counts if name != leaders[shard]}
        if policy == ReadPolicy.ROUND_ROBIN:
            assert len(counts) == 3, counts  # every replica of the shard served reads
        else:
            assert len(followers) == 2, counts  # both followers served reads


# ----- 3. BOUNDED(s) is never older than s ------------------------------------------------------


def check_bounded(reads: list[tuple[float, bytes, int]], writer: Writer, bound: float) -> None:
    """Each read (call time, key, value) must show every write acknowledged before call time - bound."""
    for called, key, value in reads:
        floor = writer.floor(key, called - bound)
        assert value >= floor, f"read {value} at {called:.3f}, but {floor} was acknowledged {bound}s earlier"
        assert value <= writer.highest, f"read {value}, never written"


def test_bounded_reads_are_never_older_than_the_bound(cluster: LocalCluster) -> None:
    bound = 0.5
    key = key_on_shard(cluster, 0, "bounded")
    leader = cluster.leader_of(0)
    writer = Writer(cluster.dir, [key], max_ops=5000, max_seconds=4.0)
    writer.start()
    wait_until(lambda: writer.acks[key], 10, 0.01)
    reads: list[tuple[float, bytes, int]] = []
    servers: Counter[str] = Counter()

    def reader() -> None:
        with Client.from_cluster(
            cluster.dir, consistency=Consistency.bounded(bound), read_policy=ReadPolicy.FOLLOWERS_ONLY
        ) as kv:
            for _ in range(3000):
                if not writer.is_alive():
                    return
                called = time.monotonic()
                response = served(kv, key)
                reads.append((called, key, as_int(response)))
                servers[response.header.served_by] += 1

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    writer.stop()
    assert len(reads) >= 100 and len(writer.acks[key]) >= 100, (len(reads), len(writer.acks[key]))
    check_bounded(reads, writer, bound)
    assert sum(n for name, n in servers.items() if name != leader) >= 1, servers  # followers served


def test_bounded_reads_at_a_follower_stopped_longer_than_the_bound(cluster: LocalCluster) -> None:
    """Reads pinned to a follower right after it was stopped for longer than the bound: each one is
    either served fresh enough, or refused (the client then falls back to a strong read)."""
    bound, stopped_for = 0.3, 0.65  # stopped longer than the bound, shorter than an election timeout
    _, lagger = leader_and_follower(cluster, 0)
    key = key_on_shard(cluster, 0, "bounded-stop")
    replica = Replica(address_of(cluster, lagger))
    bounded = read_options(pb.BOUNDED, bound=bound)
    writer = Writer(cluster.dir, [key], max_ops=5000, max_seconds=10.0)
    reads: list[tuple[float, bytes, int]] = []
    refused = 0
    writer.start()
    try:
        wait_until(lambda: len(writer.acks[key]) >= 20, 10, 0.01)
        stopped_at = time.monotonic()
        cluster.kill(lagger, "STOP")
        try:
            time.sleep(stopped_for)
            queued = [(time.monotonic(), replica.get_later(key, bounded)) for _ in range(3)]
            time.sleep(0.05)  # let them reach the stopped process's socket
        finally:
            cluster.kill(lagger, "CONT")
        continued_at = time.monotonic()
        with pinned_client(cluster, lagger, Consistency.bounded(bound)) as pinned:
            while time.monotonic() < continued_at + 1.0:
                queued.append((time.monotonic(), replica.get_later(key, bounded)))
                called = time.monotonic()
                reads.append((called, key, int(pinned.get(key) or -1)))
        for called, future in queued:
            got = outcome(future)
            if isinstance(got, errors.ReplicaBehind):
                refused += 1
            else:
                assert isinstance(got, pb.GetResponse), got
                reads.append((called, key, as_int(got)))
    finally:
        writer.stop()
        replica.close()
    # Writes were acknowledged while the follower was stopped and more than `bound` before the
    # reads: serving the follower's pre-stop state would have failed check_bounded.
    missed = [v for t, v in writer.acks[key] if stopped_at < t < continued_at - bound]
    assert missed, "no write was acknowledged while the follower was stopped"
    assert len(reads) >= 10, len(reads)
    check_bounded(reads, writer, bound)
    # The reads queued while it was stopped are answered as it resumes, before it has caught up.
    assert refused >= 1, "the follower never refused a bounded read right after being stopped"
    print(f"bounded reads at a just-continued follower: {len(reads)} served, {refused} refused")


# ----- 4. monotonic reads ------------------------------------------------------------------------


def test_session_reads_alternating_replicas_never_go_back(cluster: LocalCluster) -> None:
    keys = [key_on_shard(cluster, shard, "monotonic") for shard in range(SHARDS)]
    writer = Writer(cluster.dir, keys, max_ops=5000, max_seconds=4.0)
    writer.start()
    last = {k: (0, -1) for k in keys}  # revision, value
    revisions_seen: dict[bytes, set[int]] = {k: set() for k in keys}
    servers: set[str] = set()
    try:
        with Client.from_cluster(
            cluster.dir, consistency=Consistency.SESSION, read_policy=ReadPolicy.ROUND_ROBIN
        ) as reader:
            for i in range(2000):
                if not writer.is_alive():
                    break
                key = keys[i % len(keys)]
                response = served(reader, key)
                seen = (response.kv.revision, as_int(response))
                assert seen >= last[key], f"{key!r} went back from {last[key]} to {seen}"
                last[key] = seen
                revisions_seen[key].add(seen[0])
                servers.add(response.header.served_by)
    finally:
        writer.stop()
    assert len(servers) == 3 * SHARDS, servers  # the reads alternated over every replica
    assert all(len(seen) >= 5 for seen in revisions_seen.values()), revisions_seen  # while writes landed


# ----- 5. session token hand-off -----------------------------------------------------------------


def test_session_token_handed_to_another_client_reads_the_writes(cluster: LocalCluster) -> None:
    ring = cluster.cluster_map().slots
    with Client.from_cluster(cluster.dir) as a:
        for i in range(40):
            key, value = b"handoff:%d" % i, b"value-%d" % i
            revision = a.put(key, value)
            token = a.session_token()
            assert decode_session(token)[ring.shard_for(key)] >= revision
            with Client.from_cluster(
                cluster.dir,
                session=token,
                consistency=Consistency.SESSION,
                read_policy=ReadPolicy.FOLLOWERS_ONLY,
            ) as b:
                assert b.core.session == a.core.session
                response = served(b, key)
                assert response.kv.value == value and response.kv.revision == revision
        assert set(decode_session(a.session_token())) == set(range(SHARDS))


@pytest.mark.parametrize("policy", [ReadPolicy.FOLLOWERS_ONLY, ReadPolicy.LEADER])
def test_read_policy_holds_for_a_client_that_never_wrote(cluster: LocalCluster, policy: ReadPolicy) -> None:
    """docs/consistency.md: FOLLOWERS_ONLY goes to the leader only when no follower can serve;
    LEADER starts at the leader. A client that only reads must know which replica leads too."""
    leader = cluster.leader_of(0)
    key = key_on_shard(cluster, 0, "policy")
    with Client.from_cluster(cluster.dir) as writer:
        writer.put(key, b"x")
    full = cluster.cluster_map()
    # The map's replica order is arbitrary; put the leader last, as it is for 2 in 3 elections.
    shards = tuple(
        ShardInfo(s.id, tuple(sorted(s.replicas, key=lambda r: r.name == leader))) for s in full.shards
    )
    core = ClientCore(
        cluster_map=ClusterMap(full.epoch, shards, full.vnodes_per_shard),
        consistency=Consistency.SESSION,
        read_policy=policy,
    )
    with Client(_core=core) as reader:
        counts = Counter(served(reader, key).header.served_by for _ in range(30))
    if policy == ReadPolicy.FOLLOWERS_ONLY:
        assert leader not in counts, f"healthy followers, yet the leader {leader} served: {counts}"
    else:
        assert counts == {leader: 30}, f"LEADER policy, leader {leader}: {counts}"


# ----- 6. the behavioural suite both SDK doors pass: tests/cluster/test_sdk_doors.py ---------------


# ----- 7. replica progress in Admin.Status -------------------------------------------------------


def test_status_shows_progress_and_followers_converge(cluster: LocalCluster) -> None:
    with Client.from_cluster(cluster.dir) as kv:
        revisions = kv.put_many({b"status:%d" % i: b"s" for i in range(30)}, atomic=False)
    assert set(revisions) == set(range(SHARDS))

    def converged() -> list[dict[str, Any]] | None:
        shards = cluster.status()
        for shard in shards:
            replicas = shard["replicas"]
            applied = {r["applied_index"] for r in replicas}
            if not shard["leader"] or len(applied) != 1 or min(applied) < revisions[shard["shard"]]:
                return None
        return shards

    shards = wait_until(converged, 15)
    assert isinstance(shards, list)
    for shard in shards:
        leader = next(r for r in shard["replicas"] if r["node"] == shard["leader"])
        assert leader["commit_index"] >= revisions[shard["shard"]]
        for r in shard["replicas"]:
            assert r["role"] in ("leader", "follower"), r
            assert r["commit_index"] >= r["applied_index"] >= revisions[shard["shard"]], r
            assert r["leader_commit_index"] >= revisions[shard["shard"]], r
            if r["role"] == "follower":
                assert 0.0 <= r["staleness_seconds"] < 1.0, r  # a healthy follower is fresh


# ----- 8. the CLI at every level -----------------------------------------------------------------


def test_cli_get_at_every_consistency_level(cluster: LocalCluster) -> None:
    with Client.from_cluster(cluster.dir) as kv:
        kv.put(b"cli:greeting", b"hello from the cli")
    exe = str(Path(sys.executable).with_name("kvstore"))
    levels = ["strong", "session", "eventual", "bounded:0.5s", "sometimes"]
    procs = {
        level: subprocess.Popen(
            [exe, "--cluster", str(cluster.dir), "get", "cli:greeting", "--consistency", level],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for level in levels
    }
    try:
        results = {level: (p.communicate(timeout=60), p.returncode) for level, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for level in levels[:-1]:
        (out, err), code = results[level]
        assert code == 0 and out == "hello from the cli", (level, out, err)
    (out, err), code = results["sometimes"]
    assert code == 2 and "unknown consistency" in err, (out, err)
