"""Hostile input, fuzzed: every RPC and the Raft ports of real node processes, driven by hypothesis.

Each generated request must get a clear status (OK or a definite refusal, never UNKNOWN or
INTERNAL, always with a message), a refused write must change nothing, and the node must stay
healthy (grpc.health.v1 SERVING, writes still commit). The same holds after every node restarts.

Inputs are built around every limit (at, just under and just over), with duplicates, empty and
maximal counts and raw random bytes in place of a protobuf message. Example counts are small
(each example is a real RPC to a 3-replica Raft group on 2 cores) and the database is off, so a
run is bounded and repeatable from its seed.
"""

from __future__ import annotations

import os
import socket
import string
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.cluster.local import LocalCluster, free_ports
from kvstore.config import Limits, grpc_message_options
from kvstore.proto import kvstore_pb2 as pb
from kvstore.replication import commands
from tests.conftest import running_cluster, stop_process, wait_until

pytestmark = pytest.mark.slow

MOVE_STEP_SET = {"MoveClaim", "ExportKeys", "ExportChanges", "ImportChanges", "DropMoved"}
SERVICE_OF = {
    **dict.fromkeys(
        ["Put", "Get", "Delete", "MultiPut", "MultiGet", "Scan", "CompareAndSet", "Batch"], "kvstore.v2.KV"
    ),
    **dict.fromkeys(
        ["Status", "ClusterMap", "Backup", *(MOVE_STEPS := sorted(MOVE_STEP_SET))], "kvstore.v2.Admin"
    ),
}
# Backup chunk sizes at and around the limits (server/backup.py: 0 = default, else 64 KiB..4 MiB).
CHUNK_SIZES = [0, 1, (64 << 10) - 1, 64 << 10, 4 << 20, (4 << 20) + 1, 2**32 - 1]
STREAMING = {"Backup"}  # server-streaming: every message is read (a backup copy is bounded by the store)
NODE_METHODS = sorted(SERVICE_OF)
ROUTER_METHODS = sorted(m for m, service in SERVICE_OF.items() if service == "kvstore.v2.KV")  # KV only
# A refusal must be one of these, and say why: anything else (UNKNOWN, INTERNAL) is a bug.
DEFINITE_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,  # an admin-only call without the admin secret
}
# Answers that are not about the request itself (leadership moved, overloaded for a moment).
TRANSIENT = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}
# Examples per fuzzing round (more with KVSTORE_FUZZ_EXAMPLES: the generator is seeded at random).
EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CHANNEL_OPTIONS = grpc_message_options(256 << 20)


class Node:
    """Raw access to one node: any bytes to any KV method, and its health."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(
        self, method: str, payload: bytes, timeout: float = 15.0, metadata: tuple[tuple[str, str], ...] = ()
    ) -> tuple[grpc.StatusCode, str, bytes]:
        path = f"/{SERVICE_OF[method]}/{method}"
        try:
            if method in STREAMING:
                messages = self.channel.unary_stream(path)(
                    payload, timeout=timeout, metadata=metadata or None
                )
                return grpc.StatusCode.OK, "", b"".join(messages)
            return (
                grpc.StatusCode.OK,
                "",
                self.channel.unary_unary(path)(payload, timeout=timeout, metadata=metadata or None),
            )
        except grpc.RpcError as err:
            return err.code(), err.details() or "", b""

    def serving(self) -> bool:
        try:
            answer = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("fuzz")) as c:
        yield c


@pytest.fixture(scope="module")
def limits(cluster: LocalCluster) -> Limits:
    return cluster.node_config(cluster.node_names()[0]).limits


def leader(cluster: LocalCluster) -> Node:
    name = str(wait_until(lambda: cluster.leader_of(0), 15))
    return Node(cluster.cluster_map().replica(name)[1].address)


def sizes_around(limit: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted({0, 1, max(0, limit - 1), limit, limit + 1}))


def key_strategy(limits: Limits) -> st.SearchStrategy[bytes]:
    """Keys at and around the key limit, short random keys, and empty ones."""
    sized = sizes_around(limits.max_key_bytes).map(lambda n: (b"fz:" + b"k" * n)[:n])
    return st.one_of(sized, st.binary(min_size=0, max_size=24).map(lambda b: b"fz:" + b))


def value_strategy(limits: Limits) -> st.SearchStrategy[bytes]:
    return st.one_of(sizes_around(limits.max_value_bytes).map(lambda n: b"v" * n), st.binary(max_size=64))


def count_strategy(limits: Limits) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 17, limits.max_batch_keys, limits.max_batch_keys + 1])


def read_options() -> st.SearchStrategy[pb.ReadOptions]:
    return st.builds(
        pb.ReadOptions,
        consistency=st.sampled_from([0, 1, 2, 3, 4, 99, -1]),
        max_staleness_seconds=st.sampled_from([0.0, -1.0, 0.5, 3600.0, 3601.0, float("inf"), float("nan")]),
    )


def keys_of(draw: st.DrawFn, limits: Limits) -> list[bytes]:
    """A key list: many short keys, or a few at any size (huge counts of huge keys are just slow)."""
    count = draw(count_strategy(limits))
    if count > 17:
        base = draw(st.binary(min_size=0, max_size=6))
        keys = [b"fz:%s:%d" % (base, i) for i in range(count)]
    else:
        keys = [draw(key_strategy(limits)) for _ in range(count)]
    if keys and draw(st.booleans()):
        keys.append(keys[0])  # a duplicate
    return keys


@st.composite
def requests(draw: st.DrawFn, limits: Limits, methods: list[str]) -> tuple[str, bytes, list[bytes]]:
    """(method, serialized request, keys it names), for one of `methods`."""
    method = draw(st.sampled_from(methods))
    if draw(st.integers(0, 9)) == 0:  # not a protobuf message at all
        return method, draw(st.binary(max_size=256)), []
    request_id = draw(st.one_of(st.just(b""), st.binary(max_size=commands.REQUEST_ID_BYTES[-1] + 2)))
    if method == "Put":
        key, value = draw(key_strategy(limits)), draw(value_strategy(limits))
        return method, pb.PutRequest(key=key, value=value, request_id=request_id).SerializeToString(), [key]
    if method == "Get":
        key = draw(key_strategy(limits))
        return method, pb.GetRequest(key=key, read=draw(read_options())).SerializeToString(), [key]
    if method == "Delete":
        keys = keys_of(draw, limits)
        return method, pb.DeleteRequest(keys=keys, request_id=request_id).SerializeToString(), keys
    if method == "MultiPut":
        keys = keys_of(draw, limits)
        big = len(keys) <= 17
        values = [draw(value_strategy(limits)) if big else b"v" for _ in keys]
        if keys and draw(st.booleans()):
            values = values[:-1]  # unpaired lists
        request = pb.MultiPutRequest(keys=keys, values=values, request_id=request_id)
        return method, request.SerializeToString(), keys
    if method == "MultiGet":
        keys = keys_of(draw, limits)
        return method, pb.MultiGetRequest(keys=keys, read=draw(read_options())).SerializeToString(), keys
    if method == "Scan":
        request = pb.ScanRequest(
            start=draw(key_strategy(limits)),
            end=draw(st.one_of(st.just(b""), key_strategy(limits))),
            prefix=draw(st.one_of(st.just(b""), st.just(b"fz:"), key_strategy(limits))),
            limit=draw(st.sampled_from([0, 1, limits.max_scan_limit, limits.max_scan_limit + 1, 2**32 - 1])),
            continuation=draw(st.one_of(st.just(b""), key_strategy(limits))),
            read=draw(read_options()),
        )
        return method, request.SerializeToString(), []
    if method == "CompareAndSet":
        key = draw(key_strategy(limits))
        request = pb.CompareAndSetRequest(
            key=key,
            value=draw(value_strategy(limits)),
            expected_revision=draw(st.sampled_from([0, 1, 2**63, 2**64 - 1])),
            request_id=request_id,
        )
        return method, request.SerializeToString(), [key]
    if method in ("Status", "ClusterMap"):  # Admin: empty requests, so only junk bytes vary
        return method, draw(st.binary(max_size=64)), []
    if method in MOVE_STEP_SET:
        return method, move_step(draw, method, limits).SerializeToString(), []
    if method == "Backup":  # a whole copy of the store per call: the shard and chunk size vary
        request = pb.BackupRequest(
            shard=draw(st.sampled_from([0, 1, 2**32 - 1])),
            chunk_bytes=draw(st.sampled_from(CHUNK_SIZES)),
        )
        return method, request.SerializeToString(), []
    # Batch: empty, one op, the limit and past it. Big batches are gets of one key (the
    # amplification case) and puts of distinct keys (a put per key would be a Raft entry each).
    count = draw(st.sampled_from([0, 1, 3, 10_000, 10_001]))
    key = draw(key_strategy(limits))
    ops = []
    for i in range(count):
        if i % 2 or count > 3:
            ops.append(pb.BatchOp(get=pb.GetRequest(key=key)))
        else:
            ops.append(pb.BatchOp(put=pb.PutRequest(key=b"%s:%d" % (key, i), value=b"b")))
    if count and draw(st.booleans()):
        ops.append(pb.BatchOp())  # an empty op
    return method, pb.BatchRequest(ops=ops).SerializeToString(), [key]


def move_step(draw: st.DrawFn, method: str, limits: Limits) -> Any:
    """A slot-move step with fields at and past their bounds. Never a claim this node would take
    (its shard is 0; a claim names another): fuzzing with the admin secret must not fence the
    shard; every other step names a move no shard has a claim for."""
    move = draw(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]))
    shard = draw(st.sampled_from([0, 1, 2**32 - 1]))
    limit = draw(st.sampled_from([0, 1, 10_000, 10_001, 2**32 - 1]))
    slot = st.sampled_from([0, 1, 65_535, 65_536, 2**32 - 1])
    if method == "MoveClaim":
        return pb.MoveClaimRequest(
            shard=draw(st.sampled_from([1, 2**32 - 1])),
            move=move,
            ranges=[
                pb.SlotRange(first=draw(slot), last=draw(slot))
                for _ in range(draw(st.sampled_from([0, 1, 2])))
            ],
            side=draw(st.sampled_from(["out", "in", "", "sideways"])),
            phase=draw(
                st.sampled_from(["logging", "fenced", "gone", "importing", "serving", "aborted", "x"])
            ),
            epoch=draw(st.sampled_from([0, 2**64 - 1])),
        )
    if method == "ExportKeys":
        return pb.ExportKeysRequest(
            shard=shard,
            move=move,
            resume=draw(st.booleans()),
            after_slot=draw(slot),
            after_key=draw(key_strategy(limits)),
            limit=limit,
        )
    if method == "ExportChanges":
        return pb.ExportChangesRequest(
            shard=shard, move=move, after_revision=draw(st.sampled_from([0, 2**64 - 1])), limit=limit
        )
    if method == "ImportChanges":
        keys = keys_of(draw, limits)
        values = [draw(value_strategy(limits)) if len(keys) <= 17 else b"v" for _ in keys]
        deleted = [draw(st.booleans()) for _ in keys]
        if keys and draw(st.booleans()):
            deleted = deleted[:-1]  # unpaired
        return pb.ImportChangesRequest(shard=shard, move=move, keys=keys, values=values, deleted=deleted)
    return pb.DropMovedRequest(shard=shard, move=move, limit=limit)


def snapshot_of(node: Node, keys: list[bytes], limits: Limits) -> dict[bytes, tuple[bytes, int]]:
    """Current value and revision of every valid key named (strong reads)."""
    out: dict[bytes, tuple[bytes, int]] = {}
    valid = [k for k in dict.fromkeys(keys) if 0 < len(k) <= limits.max_key_bytes][:200]
    for key in valid:
        code, details, raw = node.call("Get", pb.GetRequest(key=key).SerializeToString())
        assert code == grpc.StatusCode.OK, (code, details)
        answer = pb.GetResponse.FromString(raw)
        out[key] = (answer.kv.value, answer.kv.revision) if answer.found else (b"", 0)
    return out


def assert_writes_commit(node: Node) -> None:
    code, details, _ = node.call(
        "Put", pb.PutRequest(key=b"fz:alive", value=b"%f" % time.time()).SerializeToString()
    )
    assert code == grpc.StatusCode.OK, (code, details)


def fuzz_rpcs(
    target: Node,
    state: Node,
    limits: Limits,
    examples: int,
    methods: list[str] = NODE_METHODS,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, set[grpc.StatusCode]]:
    """Send `examples` generated requests to `target` (a node or a router), checking each answer,
    that a refused write left `state` (the leader) unchanged, and that both stay healthy."""
    seen: dict[str, set[grpc.StatusCode]] = {}

    @settings(FUZZ, max_examples=examples)
    @given(request=requests(limits, methods))
    def check(request: tuple[str, bytes, list[bytes]]) -> None:
        method, payload, keys = request
        writes = method in ("Put", "Delete", "MultiPut", "CompareAndSet")
        before = snapshot_of(state, keys, limits) if writes else {}
        code, details, _ = target.call(method, payload, metadata=metadata)
        seen.setdefault(method, set()).add(code)
        assert code == grpc.StatusCode.OK or code in DEFINITE_REFUSALS | TRANSIENT, (method, code, details)
        if code != grpc.StatusCode.OK:
            assert details, f"{method} answered {code} without saying why"
        if writes and code in DEFINITE_REFUSALS:
            assert snapshot_of(state, keys, limits) == before, f"refused {method} changed state: {details}"
        assert target.serving() and state.serving(), f"unhealthy after {method} -> {code}: {details}"

    check()
    assert_writes_commit(state)
    return seen


def test_every_rpc_answers_clearly_and_refusals_change_nothing(cluster: LocalCluster, limits: Limits) -> None:
    node = leader(cluster)
    seen: dict[str, set[grpc.StatusCode]] = {}
    try:
        # Every RPC gets its share of the examples (drawn among 18 methods at random, one could
        # go without any in a run: 0.1% of runs did).
        for method in NODE_METHODS:
            for name, codes in fuzz_rpcs(
                node, node, limits, max(4, EXAMPLES // len(NODE_METHODS)), [method]
            ).items():
                seen.setdefault(name, set()).update(codes)
    finally:
        node.close()
    # The generator reached every RPC and both sides of the limits: some served, some refused.
    assert set(seen) == set(SERVICE_OF), sorted(seen)
    codes = set().union(*seen.values())
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= codes, seen


def test_slot_move_steps_need_the_admin_secret_and_refuse_hostile_fields_clearly(
    cluster: LocalCluster, limits: Limits
) -> None:
    """Without the admin secret every step is PERMISSION_DENIED (above); with it, steps for moves
    this shard has no part in, and malformed ones, are refused clearly and change nothing."""
    node = leader(cluster)
    token = ((errors.ADMIN_TOKEN_KEY, cluster.admin_token()),)
    try:
        seen = fuzz_rpcs(node, node, limits, max(40, EXAMPLES // 2), MOVE_STEPS, token)
        code, _, _ = node.call("DropMoved", pb.DropMovedRequest(shard=0, move=1, limit=1).SerializeToString())
        assert code == grpc.StatusCode.PERMISSION_DENIED  # no secret, no step
    finally:
        node.close()
    assert set(seen) == MOVE_STEP_SET, sorted(seen)
    assert grpc.StatusCode.PERMISSION_DENIED not in set().union(*seen.values()), seen
    assert grpc.StatusCode.INVALID_ARGUMENT in set().union(*seen.values()), seen


def test_a_cluster_id_in_the_metadata_is_served_only_when_it_is_this_clusters(
    cluster: LocalCluster, limits: Limits
) -> None:
    """`kvstore-cluster-id` (issue 15, item 2b), fuzzed on every RPC: this cluster's id is served as
    without it; any other value is refused FAILED_PRECONDITION, saying why, before any work (a
    refused put writes nothing)."""
    node = leader(cluster)
    own = cluster.node_config(cluster.node_names()[0]).cluster.id
    ids = st.one_of(
        st.just(own), st.text(alphabet=string.ascii_letters + string.digits + "-_.:", max_size=64)
    )

    @settings(FUZZ, max_examples=max(20, EXAMPLES // 4))
    @given(request=requests(limits, NODE_METHODS), cluster_id=ids)
    def check(request: tuple[str, bytes, list[bytes]], cluster_id: str) -> None:
        method, payload, keys = request
        before = snapshot_of(node, keys, limits) if method != "Status" else {}
        code, details, _ = node.call(method, payload, metadata=((errors.CLUSTER_ID_KEY, cluster_id),))
        if cluster_id == own:
            assert code == grpc.StatusCode.OK or code in DEFINITE_REFUSALS | TRANSIENT, (
                method,
                code,
                details,
            )
            assert "belongs to cluster" not in details
        else:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (method, cluster_id, code, details)
            assert f"belongs to cluster {own}" in details
            assert snapshot_of(node, keys, limits) == before, f"refused {method} changed state"

    try:
        check()
        assert node.serving()
        assert_writes_commit(node)
    finally:
        node.close()


def test_the_router_answers_hostile_requests_as_clearly(cluster: LocalCluster, limits: Limits) -> None:
    port = free_ports(1)[0]
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore",
            "router",
            "--cluster",
            str(cluster.dir),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    through_router, node = Node(f"127.0.0.1:{port}"), leader(cluster)
    try:
        wait_until(through_router.serving, 20)
        seen = fuzz_rpcs(through_router, node, limits, EXAMPLES // 2, ROUTER_METHODS)
        assert grpc.StatusCode.OK in set().union(*seen.values()), seen
    finally:
        through_router.close()
        node.close()
        stop_process(router)


# ----- Raft ports ---------------------------------------------------------------------------------

_FRAME = struct.Struct("i")  # pysyncobj's frame header: a native int length


@st.composite
def raft_garbage(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "huge_length", "negative_length", "zlib_bomb", "pickle", "short"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    if kind == "huge_length":
        return _FRAME.pack(draw(st.sampled_from([2**31 - 1, 1 << 30, 64 << 20]))) + b"x" * 64
    if kind == "negative_length":
        return _FRAME.pack(-draw(st.integers(1, 2**31 - 1))) + b"x" * 16
    if kind == "zlib_bomb":
        data = zlib.compress(b"\0" * (64 << 20), 9)
        return _FRAME.pack(len(data)) + data
    if kind == "pickle":
        # A pickle that would call os.system if anyone unpickled it without an allow-list.
        marker = draw(st.sampled_from(["fz-marker"]))
        payload = b"cos\nsystem\n(S'touch /tmp/%s'\ntR." % marker.encode()
        data = zlib.compress(payload)
        return _FRAME.pack(len(data)) + data
    return draw(st.binary(min_size=1, max_size=3))  # shorter than a header


def send_raw(address: str, data: bytes, hold: float = 0.05) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2.0) as sock:
        try:
            sock.sendall(data)
            time.sleep(hold)
        except OSError:
            pass  # the node closed the connection: that is an answer too


def test_random_frames_at_raft_ports_change_nothing(cluster: LocalCluster, limits: Limits) -> None:
    marker = Path("/tmp/fz-marker")
    marker.unlink(missing_ok=True)
    raft_ports = [cluster.node_config(n).raft_bind for n in cluster.node_names()]
    node = leader(cluster)

    @FUZZ
    @given(frame=raft_garbage(), target=st.sampled_from(raft_ports))
    def check(frame: bytes, target: str) -> None:
        send_raw(target, frame)

    try:
        check()
        time.sleep(0.5)
        assert not marker.exists(), "a pickled call sent to a Raft port ran"
        assert node.serving()
        assert_writes_commit(node)
    finally:
        node.close()
        marker.unlink(missing_ok=True)


def test_after_restart_every_node_is_healthy_agrees_and_still_answers_clearly(
    cluster: LocalCluster, limits: Limits
) -> None:
    """What the fuzzing left in the log and the store survives a restart of every node, and the
    restarted nodes answer hostile requests just as clearly."""
    node = leader(cluster)
    try:
        assert_writes_commit(node)
    finally:
        node.close()
    cluster.down()
    cluster.start_all()
    cluster.wait_for_leaders(30)
    nodes = [Node(cluster.cluster_map().replica(n)[1].address) for n in cluster.node_names()]
    try:
        wait_until(lambda: all(n.serving() for n in nodes), 20)
        node = leader(cluster)
        try:
            fuzz_rpcs(node, node, limits, EXAMPLES // 2)
        finally:
            node.close()

        def converged() -> bool:
            replicas = cluster.status()[0]["replicas"]
            return len({r["applied_index"] for r in replicas}) == 1 and all(
                r["health"] == "serving" for r in replicas
            )

        wait_until(converged, 30)
    finally:
        for n in nodes:
            n.close()
