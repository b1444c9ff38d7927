"""Client sessions and write outcomes (Raft dissertation §6.3): tables on a real Storage, the apply
rules of the state machine, and (with real node processes) the issue-12 reproductions."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from kvstore import Client, errors
from kvstore.cluster.local import LocalCluster
from kvstore.config import StorageSettings, grpc_message_options
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import running_cluster


def _id(client: int, seq: int) -> bytes:
    return client.to_bytes(16, "big") + seq.to_bytes(8, "big")


SESSION_CAP = 3


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """1 shard x 3 replicas keeping at most SESSION_CAP client sessions."""
    storage = StorageSettings(max_dedup_sessions=SESSION_CAP)
    with running_cluster(tmp_path_factory.mktemp("dedup"), storage=storage) as cluster:
        yield cluster


def _leader_stub(cluster: LocalCluster, channels: list[grpc.Channel]) -> pb_grpc.KVStub:
    leader = cluster.wait_for_leaders(30)[0]["leader"]
    channel = grpc.insecure_channel(
        cluster.cluster_map().replica(leader)[1].address,
        options=grpc_message_options(64 << 20),
    )
    channels.append(channel)
    return pb_grpc.KVStub(channel)


@pytest.fixture
def stub(capped: LocalCluster) -> Iterator[pb_grpc.KVStub]:
    channels: list[grpc.Channel] = []
    yield _leader_stub(capped, channels)
    for channel in channels:
        channel.close()


def _settled(cluster: LocalCluster) -> None:
    deadline = time.monotonic() + 15
    while len({r["applied_index"] for r in cluster.status()[0]["replicas"]}) != 1:
        assert time.monotonic() < deadline, "replicas did not converge"
        time.sleep(0.1)


def _data_file_sizes(cluster: LocalCluster) -> dict[str, int]:
    return {n: (cluster.dir / "data" / n / "lmdb" / "data.mdb").stat().st_size for n in cluster.node_names()}


def test_failed_compare_and_sets_against_a_large_value_do_not_grow_the_data_files(
    capped: LocalCluster,
) -> None:
    # Issue 12 reproduction: 200 failed CAS against a 1 MiB value grew the 3 replicas' data files
    # by 602 MiB (the pickled result, current value included, was kept per request id).
    with Client.from_cluster(capped.dir) as kv:
        revision = kv.put(b"cas:big", b"v" * (1 << 20))
        _settled(capped)
        before = _data_file_sizes(capped)
        for _ in range(200):
            result = kv.compare_and_set(b"cas:big", b"new", expected_revision=revision + 10_000)
            assert not result.succeeded and result.current is not None
        _settled(capped)
    growth = sum(_data_file_sizes(capped)[n] - before[n] for n in before)
    print(f"200 failed CAS on a 1 MiB value: data files grew {growth / 2**20:.2f} MiB over 3 replicas")
    assert growth < 4 << 20


def test_a_retry_after_110k_other_clients_request_ids_applies_once(
    capped: LocalCluster, stub: pb_grpc.KVStub
) -> None:
    # Issue 12 reproduction: the old window (100,000 ids, shared by all clients) was flushed by
    # ten Batch RPCs in seconds while the SDK still retried with the old id: the retry applied twice.
    first = stub.Put(pb.PutRequest(key=b"flush:k", value=b"first", request_id=_id(1, 1)))
    stub.Put(pb.PutRequest(key=b"flush:k", value=b"second", request_id=_id(2, 1)))
    for batch in range(11):
        request = pb.BatchRequest()
        for j in range(10_000):
            n = batch * 10_000 + j
            op = request.ops.add().put
            op.key, op.value, op.request_id = b"flush:o%05d" % j, b"x", _id(1000 + n % 1000, 1 + n // 1000)
        results = stub.Batch(request, timeout=120).results
        assert all(r.WhichOneof("result") == "put" for r in results)
    # 1,000 other clients wrote: far beyond the session cap, so client 1's session was evicted;
    # its outcome (kept for the retention whatever the traffic) still answers the retry.
    retry = stub.Put(pb.PutRequest(key=b"flush:k", value=b"first", request_id=_id(1, 1), retry=True))
    assert retry.header.revision == first.header.revision
    assert stub.Get(pb.GetRequest(key=b"flush:k")).kv.value == b"second"  # not applied again


def test_a_retry_from_an_evicted_session_gets_session_expired(
    capped: LocalCluster, stub: pb_grpc.KVStub
) -> None:
    stub.Put(pb.PutRequest(key=b"evict:k", value=b"1", request_id=_id(77, 1)))
    for client in range(100, 100 + SESSION_CAP + 2):  # other clients push client 77 out
        stub.Put(pb.PutRequest(key=b"evict:other", value=b"x", request_id=_id(client, 1)))
    # A retry of a write whose first attempt's fate is unknown: it may have applied, and the
    # server can no longer tell, so it refuses with a definite error instead of applying again.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Put(pb.PutRequest(key=b"evict:k", value=b"2", request_id=_id(77, 2), retry=True))
    error = errors.from_rpc_error(caught.value)
    assert isinstance(error, errors.SessionExpired) and not error.retryable
    assert stub.Get(pb.GetRequest(key=b"evict:k")).kv.value == b"1"  # nothing applied
    # A first attempt from the same client is a new write: applied (and it opens a new session).
    stub.Put(pb.PutRequest(key=b"evict:k", value=b"3", request_id=_id(77, 3)))
    assert stub.Get(pb.GetRequest(key=b"evict:k")).kv.value == b"3"


def test_sessions_and_outcomes_survive_a_restart_of_every_replica(capped: LocalCluster) -> None:
    channels: list[grpc.Channel] = []
    try:
        stub = _leader_stub(capped, channels)
        first = stub.Put(pb.PutRequest(key=b"restart:k", value=b"1", request_id=_id(5, 1)))
        stub.Put(pb.PutRequest(key=b"restart:k", value=b"2", request_id=_id(6, 1)))
        _settled(capped)
        for name in capped.node_names():
            capped.kill(name)
        capped.start_all()
        stub = _leader_stub(capped, channels)
        retry = stub.Put(
            pb.PutRequest(key=b"restart:k", value=b"1", request_id=_id(5, 1), retry=True), timeout=10
        )
        assert retry.header.revision == first.header.revision
        got = stub.Get(pb.GetRequest(key=b"restart:k"), timeout=10)
        assert got.kv.value == b"2"
    finally:
        for channel in channels:
            channel.close()
