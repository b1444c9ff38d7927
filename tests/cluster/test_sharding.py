"""Sharding end to end on real 3-shard clusters (the pure ring properties live in test_ring.py).

1. hash tags keep keys on one shard and one Raft entry; atomic writes across shards are refused
   and write nothing; non-atomic writes across shards report one revision per shard touched;
2. the smart client and the router give the same answers to the same workload;
3. scans across shards return every key once, in order, and continuations are portable;
4. a client holding a stale map is redirected and succeeds without seeing an error;
5. killing one shard's leader only disturbs that shard, which fails over and catches up;
6. `kvstore cluster status --json` and `kvstore ring` tell the truth.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from kvstore import Client, errors
from kvstore.cluster.local import LocalCluster, free_ports
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap
from tests.conftest import client_with_map, new_leader, stop_process, wait_until

SHARDS = 3


# ----- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv(sharded_cluster: LocalCluster) -> Iterator[Client]:
    with Client.from_cluster(sharded_cluster.dir) as c:
        yield c


@pytest.fixture(scope="module")
def router(sharded_cluster: LocalCluster) -> Iterator[str]:
    """A router subprocess in front of the module's cluster; its address. Stopped by PID."""
    address = f"127.0.0.1:{free_ports(1)[0]}"
    log_path = sharded_cluster.dir / "logs" / "router.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvstore",
                "router",
                "--cluster",
                str(sharded_cluster.dir),
                "--listen",
                address,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: _listening(address, proc, log_path), 30, interval=0.2)
        yield address
    finally:
        stop_process(proc)


def _listening(address: str, proc: subprocess.Popen[bytes], log_path: Any) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"router exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        except grpc.FutureTimeoutError:
            return False
    return True


@pytest.fixture(scope="module")
def thin(router: str) -> Iterator[Client]:
    with Client(router=router) as c:
        yield c


@pytest.fixture(params=["smart", "router"])
def door(request: pytest.FixtureRequest) -> Client:
    """The same test through the smart client and through the router."""
    return request.getfixturevalue("kv" if request.param == "smart" else "thin")


def tag_per_shard(cluster_map: ClusterMap, stem: bytes) -> dict[int, bytes]:
    """One hash tag owned by each shard (found by walking candidate tags; deterministic)."""
    tags: dict[int, bytes] = {}
    for i in range(10_000):
        tag = b"%s%d" % (stem, i)
        tags.setdefault(cluster_map.slots.shard_for(b"{%s}" % tag), tag)
        if len(tags) == len(cluster_map.shards):
            return tags
    raise AssertionError("could not find a tag for every shard")


def keys_by_shard(cluster_map: ClusterMap, prefix: bytes, per_shard: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {s.id: [] for s in cluster_map.shards}
    i = 0
    while any(len(v) < per_shard for v in out.values()):
        key = b"%s%05d" % (prefix, i)
        bucket = out[cluster_map.slots.shard_for(key)]
        if len(bucket) < per_shard:
            bucket.append(key)
        i += 1
    return out


def raw_get(address: str, key: bytes) -> pb.GetResponse:
    """A Get sent straight to one replica, bypassing all client routing."""
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.KVStub(channel).Get(
                pb.GetRequest(key=key, read=pb.ReadOptions(consistency=pb.STRONG)), timeout=10
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None


def scan_all(
    kv: Client, limit: int, continuation: bytes = b"", **kwargs: Any
) -> list[list[tuple[bytes, bytes]]]:
    """Every page of a scan from `continuation` on, following continuations (bounded)."""
    pages: list[list[tuple[bytes, bytes]]] = []
    for _ in range(1000):
        page = kv.scan(limit=limit, continuation=continuation, **kwargs)
        pages.append([(i.key, i.value) for i in page])
        if not page.continuation:
            return pages
        assert page.continuation == page.items[-1].key  # a continuation is just the last key
        continuation = page.continuation
    raise AssertionError("scan did not end within 1000 pages")


# ----- 1. hash tags and cross-shard writes --------------------------------------------------------


def test_tagged_keys_share_one_shard_and_one_revision(kv: Client, sharded_cluster: LocalCluster) -> None:
    cluster_map = kv.cluster_map()
    fields = [b"name", b"email", b"age", b"city", b"zip", b"phone"]
    keys = [b"{user:7}:" + f for f in fields]
    owner = cluster_map.slots.shard_for(keys[0])
    assert {cluster_map.slots.shard_for(k) for k in keys} == {owner}
    # Without the braces the same keys spread out: the tag is what keeps them together.
    assert len({cluster_map.slots.shard_for(b"user:7:" + f) for f in fields}) > 1

    revision = kv.multi_put({k: b"v-" + k for k in keys})
    assert revision > 0
    assert [kv.get_item(k).revision for k in keys] == [revision] * len(keys)  # one Raft entry
    # The server-side header names the owning shard.
    again = kv.put_many({k: b"w-" + k for k in keys}, atomic=True)
    assert list(again) == [owner] and again[owner] > revision

    # Physically there: every replica of the owner serves the key; other shards refuse it.
    for shard in cluster_map.shards:
        for replica in shard.replicas:
            if shard.id == owner:
                got = raw_get(replica.address, keys[0])
                assert got.found and got.kv.value == b"w-" + keys[0] and got.header.shard == owner
            else:
                with pytest.raises(errors.WrongShard):
                    raw_get(replica.address, keys[0])


def test_atomic_writes_across_shards_raise_and_write_nothing(
    door: Client, kv: Client, request: pytest.FixtureRequest
) -> None:
    cluster_map = kv.cluster_map()
    stem = b"x%s-" % request.node.callspec.id.encode()
    tags = tag_per_shard(cluster_map, stem)
    (a, tag_a), (b, tag_b) = sorted(tags.items())[:2]
    keys = [b"{%s}:1" % tag_a, b"{%s}:2" % tag_a, b"{%s}:1" % tag_b]
    expected_message = rf"span shards \[{a}, {b}\].*hash tag.*atomic=False"

    with pytest.raises(errors.CrossShardWrite, match=expected_message):
        door.multi_put({k: b"v" for k in keys})
    with pytest.raises(errors.CrossShardWrite, match=expected_message):
        door.put_many({k: b"v" for k in keys}, atomic=True)
    assert door.multi_get(keys) == {}
    assert [kv.get(k) for k in keys] == [None] * len(keys)

    written = door.put_many({k: b"keep-" + k for k in keys}, atomic=False)
    assert set(written) == {a, b}
    before = {k: kv.get_item(k) for k in keys}
    with pytest.raises(errors.CrossShardWrite, match=expected_message):
        door.delete_many(keys, atomic=True)
    assert {k: kv.get_item(k) for k in keys} == before  # nothing deleted, revisions untouched
    assert door.delete_many(keys, atomic=False) == len(keys)
    assert door.multi_get(keys) == {}


def test_non_atomic_put_many_reports_each_shard_touched(
    door: Client, kv: Client, request: pytest.FixtureRequest
) -> None:
    cluster_map = kv.cluster_map()
    prefix = b"pm-%s:" % request.node.callspec.id.encode()
    spread = keys_by_shard(cluster_map, prefix, 3)
    everywhere = {k: b"v-" + k for keys in spread.values() for k in keys}
    revisions = door.put_many(everywhere, atomic=False)
    assert set(revisions) == set(spread) and all(r > 0 for r in revisions.values())
    for shard, keys in spread.items():
        assert {kv.get_item(k).revision for k in keys} == {revisions[shard]}  # one entry per shard

    two = {k: b"two" for shard in sorted(spread)[:2] for k in spread[shard]}
    touched = door.put_many(two, atomic=False)
    assert set(touched) == set(sorted(spread)[:2])


# ----- 2. the router and the smart client give the same answers -----------------------------------


def _workload(seed: int, count: int) -> list[tuple[Any, ...]]:
    """A seeded list of abstract operations on relative keys (no revisions: those differ per run)."""
    rng = random.Random(seed)
    plain = [b"k%02d" % i for i in range(12)]
    groups = [[b"{grp%d}:f%d" % (g, f) for f in range(4)] for g in range(3)]
    every = plain + [k for g in groups for k in g]
    ops: list[tuple[Any, ...]] = []
    for i in range(count):
        kind = rng.choices(
            ["put", "get", "delete", "cas", "multi_put", "multi_get", "scan"], [5, 5, 2, 3, 2, 2, 1]
        )[0]
        if kind == "cas":
            ops.append(("cas", rng.choice(every), b"c%d" % i, rng.choice(["known", "zero", "wrong"])))
        elif kind == "multi_put":
            group = rng.choice(groups)
            ops.append(("multi_put", tuple(rng.sample(group, rng.randint(2, 4))), b"m%d" % i))
        elif kind == "multi_get":
            ops.append(("multi_get", tuple(rng.sample(every, 6))))
        elif kind == "scan":
            ops.append(("scan", rng.choice([3, 5, 8])))
        else:
            ops.append((kind, rng.choice(every), b"v%d" % i))
    return ops


def _run_workload(kv: Client, prefix: bytes, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Run `ops` under `prefix`; return answers with revisions left out (checked here instead)."""
    known: dict[bytes, int] = {}  # last write revision per relative key (0: absent)
    history: dict[bytes, list[int]] = {}

    def wrote(key: bytes, revision: int) -> None:
        assert revision > 0 and revision > max(history.get(key, [0])), (key, revision, history.get(key))
        history.setdefault(key, []).append(revision)
        known[key] = revision

    results: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind == "put":
            wrote(op[1], kv.put(prefix + op[1], op[2]))
            results.append(("put", op[1]))
        elif kind == "get":
            item = kv.get_item(prefix + op[1])
            assert (item.revision if item else 0) == known.get(op[1], 0)
            results.append(("get", op[1], item.value if item else None))
        elif kind == "delete":
            found = kv.delete(prefix + op[1])
            known[op[1]] = 0
            results.append(("delete", op[1], found))
        elif kind == "cas":
            current = known.get(op[1], 0)
            expected = {"known": current, "zero": 0, "wrong": current + 10_000_000}[op[3]]
            cas = kv.compare_and_set(prefix + op[1], op[2], expected_revision=expected)
            if cas.succeeded:
                wrote(op[1], cas.revision)
            else:
                assert (cas.current.revision if cas.current else 0) == current
            results.append(("cas", op[1], cas.succeeded, cas.current.value if cas.current else None))
        elif kind == "multi_put":
            revision = kv.multi_put({prefix + k: op[2] for k in op[1]})
            for k in op[1]:
                wrote(k, revision)
            results.append(("multi_put", op[1]))
        elif kind == "multi_get":
            got = kv.multi_get([prefix + k for k in op[1]])
            results.append(("multi_get", sorted((k[len(prefix) :], v) for k, v in got.items())))
        else:
            pages = scan_all(kv, op[1], prefix=prefix)
            results.append(("scan", [[(k[len(prefix) :], v) for k, v in page] for page in pages]))
    return results


def test_router_and_smart_client_give_the_same_answers(kv: Client, thin: Client) -> None:
    ops = _workload(seed=7, count=150)
    smart = _run_workload(kv, b"same-smart:", ops)
    routed = _run_workload(thin, b"same-router:", ops)
    assert routed == smart
    # The workload did exercise what it claims to.
    kinds = Counter(op[0] for op in ops)
    assert min(kinds.values()) >= 3 and len(kinds) == 7
    assert any(r[0] == "cas" and r[2] for r in smart) and any(r[0] == "cas" and not r[2] for r in smart)
    assert any(r[0] == "scan" and len(r[1]) > 1 for r in smart)


# ----- 3. scans across shards ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_keys(kv: Client) -> list[bytes]:
    keys = [b"scan3:%04d" % i for i in range(300)]
    kv.put_many({k: b"val-" + k for k in keys}, atomic=False)
    return keys


def test_scan_across_shards_returns_each_key_once_in_order(
    door: Client, kv: Client, scan_keys: list[bytes]
) -> None:
    ring = kv.cluster_map().slots
    assert set(Counter(ring.shard_for(k) for k in scan_keys)) == set(range(SHARDS))
    pages = scan_all(door, 37, prefix=b"scan3:")
    assert [len(p) for p in pages] == [37] * 8 + [4]
    assert [k for page in pages for k, _ in page] == scan_keys
    assert all(v == b"val-" + k for page in pages for k, v in page)

    ranged = scan_all(door, 37, start=b"scan3:0100", end=b"scan3:0200")
    assert [k for page in ranged for k, _ in page] == scan_keys[100:200]


def test_scan_continuation_is_portable(
    kv: Client, thin: Client, sharded_cluster: LocalCluster, scan_keys: list[bytes]
) -> None:
    first = kv.scan(prefix=b"scan3:", limit=37)
    second = kv.scan(prefix=b"scan3:", limit=37, continuation=first.continuation)
    assert second.continuation == scan_keys[73]
    rest = scan_keys[74:]
    with Client.from_cluster(sharded_cluster.dir) as fresh:
        resumed = scan_all(fresh, 37, prefix=b"scan3:", continuation=second.continuation)
    assert [k for page in resumed for k, _ in page] == rest
    routed = scan_all(thin, 37, prefix=b"scan3:", continuation=second.continuation)
    assert [k for page in routed for k, _ in page] == rest


# ----- 4. a stale map is corrected without surfacing an error ---------------------------------------


def _stale_client(real: ClusterMap) -> tuple[Client, list[errors.WrongShard]]:
    """A client holding an older map with a different ring; records every WrongShard it meets."""
    return client_with_map(ClusterMap(epoch=0, shards=real.shards, vnodes_per_shard=16))


def _moved_and_kept(real: ClusterMap, prefix: bytes, each: int) -> tuple[list[bytes], list[bytes]]:
    """Keys the stale ring sends to the wrong shard, and keys it happens to route right."""
    stale_ring = ClusterMap(epoch=0, shards=real.shards, vnodes_per_shard=16).ring
    moved: list[bytes] = []
    kept: list[bytes] = []
    for i in range(10_000):
        key = b"%s%04d" % (prefix, i)
        bucket = moved if stale_ring.shard_for(key) != real.slots.shard_for(key) else kept
        if len(bucket) < each:
            bucket.append(key)
        if len(moved) == len(kept) == each:
            return moved, kept
    raise AssertionError("the stale ring routes too few keys differently")


@pytest.mark.parametrize("first_op", ["put", "get"])
def test_stale_map_is_redirected_and_refreshed(kv: Client, first_op: str) -> None:
    real = kv.cluster_map()
    assert real.epoch > 0
    moved, kept = _moved_and_kept(real, b"stale-%s:" % first_op.encode(), 25)
    keys = [moved[0], *kept, *moved[1:]]  # the first request is one that must be redirected
    client, redirects = _stale_client(real)
    with client:
        assert client.core.cluster_map.epoch == 0
        if first_op == "get":
            assert client.get(keys[0]) is None
            assert redirects and client.core.cluster_map.epoch == real.epoch
        revisions = {k: client.put(k, b"v-" + k) for k in keys}
        assert {k: client.get(k) for k in keys} == {k: b"v-" + k for k in keys}
        assert client.core.cluster_map.epoch == real.epoch
        assert client.core.cluster_map.slots.shard_for(moved[1]) == real.slots.shard_for(moved[1])
    assert len(redirects) >= 1 and all(r.epoch == real.epoch for r in redirects)
    # Written where the real map says, at the revisions the stale client was told.
    assert {k: kv.get_item(k).revision for k in keys} == revisions


def test_stale_map_multi_key_ops_are_split_again(kv: Client) -> None:
    """Non-atomic multi-key operations grouped by a stale ring must be regrouped by the fresh one.

    The stale ring puts these keys on one shard; the real ring spreads them over several. Nothing
    here is atomic, so the client has no reason to refuse once it learns the new map."""
    real = kv.cluster_map()
    stale_ring = ClusterMap(epoch=0, shards=real.shards, vnodes_per_shard=16).ring
    candidates = [b"stale-multi:%03d" % i for i in range(300)]
    keys = [k for k in candidates if stale_ring.shard_for(k) == 0][:30]
    real_shards = {real.slots.shard_for(k) for k in keys}
    assert len(real_shards) > 1  # one group under the stale ring, several under the real one
    values = {k: b"v-" + k for k in keys}

    def stale_call(op: Callable[[Client], Any]) -> Any:
        client, redirects = _stale_client(real)
        with client:
            result = op(client)
        assert redirects  # it really was redirected
        return result

    revisions = stale_call(lambda c: c.put_many(values, atomic=False))
    assert set(revisions) == real_shards
    assert kv.multi_get(keys) == values
    assert stale_call(lambda c: c.multi_get(keys)) == values
    assert stale_call(lambda c: c.delete_many(keys, atomic=False)) == len(keys)
    assert kv.multi_get(keys) == {}


# ----- 6. the status and ring CLI --------------------------------------------------------------------


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _status(directory: Any) -> list[dict[str, Any]]:
    return json.loads(_cli("cluster", "status", "--dir", str(directory), "--json"))["shards"]


def _all_keys(kv: Client) -> list[bytes]:
    return [k for page in scan_all(kv, 1000) for k, _ in page]


def test_cluster_status_json_reports_shards_and_key_counts(kv: Client, sharded_cluster: LocalCluster) -> None:
    shards = _status(sharded_cluster.dir)
    cluster_map = sharded_cluster.cluster_map()
    assert [s["shard"] for s in shards] == [s.id for s in cluster_map.shards]
    for shard, info in zip(shards, cluster_map.shards, strict=True):
        names = [r.name for r in info.replicas]
        assert shard["leader"] in names and shard["vnodes"] == cluster_map.vnodes_per_shard
        assert isinstance(shard["key_count"], int)
        assert [r["node"] for r in shard["replicas"]] == names
        for replica, expected in zip(shard["replicas"], info.replicas, strict=True):
            assert replica["address"] == expected.address
            assert replica["pid"] == sharded_cluster.pid(expected.name)
            assert replica["role"] in ("leader", "follower")
            assert replica["metrics"]["term"] > 0 and replica["metrics"]["applied_index"] > 0
        assert [r["role"] for r in shard["replicas"]].count("leader") == 1
        assert next(r for r in shard["replicas"] if r["role"] == "leader")["node"] == shard["leader"]

    def counts_match(expected: Counter[int]) -> bool:
        return {s["shard"]: s["key_count"] for s in _status(sharded_cluster.dir)} == {
            i: expected.get(i, 0) for i in range(SHARDS)
        }

    ring = cluster_map.slots
    baseline = Counter(ring.shard_for(k) for k in _all_keys(kv))
    wait_until(lambda: counts_match(baseline), 20, interval=0.5)
    n = 40
    new = keys_by_shard(cluster_map, b"status-count:", n // SHARDS + 1)
    added = [k for keys in new.values() for k in keys][:n]
    kv.put_many({k: b"x" for k in added}, atomic=False)
    after = Counter(ring.shard_for(k) for k in _all_keys(kv))
    assert after == baseline + Counter(ring.shard_for(k) for k in added)
    wait_until(lambda: counts_match(after), 20, interval=0.5)
    assert sum(s["key_count"] for s in _status(sharded_cluster.dir)) == sum(baseline.values()) + n


def test_ring_cli_names_the_owning_shard(sharded_cluster: LocalCluster) -> None:
    expected = sharded_cluster.cluster_map().slots.shard_for(b"user:42")
    for key in ("user:42", "{user:42}:cart"):  # the tagged key hashes only "user:42"
        out = _cli("--cluster", str(sharded_cluster.dir), "ring", "--key", key)
        match = re.search(r"^shard:\s+(\d+)", out, re.MULTILINE)
        assert match and int(match.group(1)) == expected, out
        assert "routing key:  b'user:42'" in out


# ----- 5. one shard's leader dies: only that shard notices --------------------------------------------


@dataclass(frozen=True)
class OpRecord:
    start: float
    end: float
    shard: int
    ok: bool
    error: str = ""


def _load(
    cluster: LocalCluster, keys: dict[int, list[bytes]], stop_at: float, out: list[OpRecord], seed: int
) -> None:
    """put+get round robin over the shards in `keys` until `stop_at` (or 2,000 ops).

    Keys are this thread's own, so a read must return the thread's last write. Each op has a 3 s
    budget, so a failover longer than that shows up as a recorded failure instead of a slow op."""
    shards = sorted(keys)
    rng = random.Random(seed)
    with Client.from_cluster(cluster.dir, timeout=3.0) as kv:
        for i in range(2000):
            if time.monotonic() >= stop_at:
                return
            shard = shards[i % len(shards)]
            key = rng.choice(keys[shard])
            value = b"%d-%d" % (seed, i)
            start = time.monotonic()
            try:
                kv.put(key, value)
                got = kv.get(key)
            except errors.KvError as err:
                out.append(OpRecord(start, time.monotonic(), shard, False, f"{err.kind}: {err.message}"))
                continue
            error = "" if got == value else f"wrong value: read {got!r} after writing {value!r} to {key!r}"
            out.append(OpRecord(start, time.monotonic(), shard, not error, error))


def _failover_window(records: list[OpRecord], shard: int) -> float:
    """First error on `shard` to the first success on it completed after that error (0: no error)."""
    mine = [r for r in records if r.shard == shard]
    failures = [r for r in mine if not r.ok]
    if not failures:
        return 0.0
    first = min(failures, key=lambda r: r.start)
    recovered = min(r.end for r in mine if r.ok and r.end > first.end)
    return recovered - first.start


def _longest_silence(records: list[OpRecord], shard: int, since: float) -> float:
    """Longest time after `since` with no successful op completing on `shard`."""
    ends = sorted(r.end for r in records if r.shard == shard and r.ok and r.end >= since)
    marks = [since, *ends]
    return max(b - a for a, b in zip(marks, marks[1:], strict=False))


def test_killing_one_shards_leader_only_disturbs_that_shard(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster("isolation", shards=SHARDS)
    cluster_map = cluster.cluster_map()
    victim = 1
    records: list[OpRecord] = []
    begin = time.monotonic()
    stop_at = begin + 20.0
    # Three threads spread over every shard, plus one pinned to each shard: a synchronous thread
    # stuck on the dead shard cannot show that the other shards kept serving meanwhile.
    loads = [keys_by_shard(cluster_map, b"iso%d:" % seed, 10) for seed in range(3)]
    loads += [{s: keys_by_shard(cluster_map, b"pin%d:" % s, 10)[s]} for s in range(SHARDS)]
    threads = [
        threading.Thread(target=_load, args=(cluster, keys, stop_at, records, seed), daemon=True)
        for seed, keys in enumerate(loads)
    ]
    for t in threads:
        t.start()
    time.sleep(5.0)
    killed = cluster.leader_of(victim)
    assert killed is not None
    killed_at = time.monotonic()
    cluster.kill(killed, "KILL")
    elected = new_leader(cluster, victim, killed, timeout=15)
    elected_at = time.monotonic()
    for t in threads:
        t.join(timeout=stop_at - time.monotonic() + 10)
    assert not any(t.is_alive() for t in threads), "load threads did not stop in time"
    assert time.monotonic() - begin < 40

    by_shard = {s: [r for r in records if r.shard == s] for s in range(SHARDS)}
    failures = {s: [r.error for r in rs if not r.ok] for s, rs in by_shard.items()}
    window = _failover_window(records, victim)
    silence = _longest_silence(records, victim, killed_at)
    # The victim is back at the end of the first op that started after the kill and succeeded.
    back_at = min((r.end for r in by_shard[victim] if r.ok and r.start > killed_at), default=stop_at)
    served_meanwhile = {
        s: sum(r.ok and r.start >= killed_at and r.end <= back_at for r in by_shard[s])
        for s in range(SHARDS)
        if s != victim
    }
    print(
        f"\nkilled {killed} (shard {victim}) at +{killed_at - begin:.1f}s, {elected} seen as leader "
        f"after {elected_at - killed_at:.1f}s; ops per shard {[len(by_shard[s]) for s in range(SHARDS)]}; "
        f"victim errors {len(failures[victim])} {dict(Counter(e.split(':')[0] for e in failures[victim]))}; "
        f"failover window (first error -> first success after) {window:.2f}s; victim back after "
        f"{back_at - killed_at:.2f}s, longest victim silence {silence:.2f}s; ops on the other shards "
        f"meanwhile {served_meanwhile}"
    )
    assert not [e for errs in failures.values() for e in errs if e.startswith("wrong value")]
    for shard in range(SHARDS):
        if shard != victim:
            assert failures[shard] == [], f"shard {shard} saw errors: {failures[shard][:5]}"
            assert served_meanwhile[shard] >= 5, "another shard stalled while the victim failed over"
    assert sum(r.ok and r.start > elected_at for r in by_shard[victim]) > 10, "victim never recovered"
    assert window < 10.0 and silence < 10.0

    # The killed node comes back and catches up with the new leader (no more writes are coming).
    cluster.start(killed)

    def caught_up() -> bool:
        replicas = {r["node"]: r for r in cluster.status()[victim]["replicas"]}
        leader, back = replicas[elected], replicas[killed]
        return (
            back["role"] == "follower"
            and back["applied_index"] >= leader["applied_index"] > 0
            and back["key_count"] == leader["key_count"]
        )

    wait_until(caught_up, 30, interval=0.5)


def test_router_rejects_unpaired_multi_put_lists(router: str, kv: Client) -> None:
    with grpc.insecure_channel(router) as channel:
        stub = pb_grpc.KVStub(channel)
        request = pb.MultiPutRequest(keys=[b"unpaired-a", b"unpaired-b"], values=[b"1"], non_atomic=True)
        with pytest.raises(grpc.RpcError) as info:
            stub.MultiPut(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "pair up" in info.value.details()
    assert kv.multi_get([b"unpaired-a", b"unpaired-b"]) == {}
