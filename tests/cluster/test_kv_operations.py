"""Every API call against a real 3-replica shard, and bad input that must change nothing."""

from __future__ import annotations

import socket

import grpc
import pytest

from kvstore import AsyncClient, Client, Consistency, errors
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def kv(shared_cluster: LocalCluster) -> Client:
    with Client.from_cluster(shared_cluster.dir) as c:
        yield c


def _leader_address(cluster: LocalCluster) -> str:
    leader = cluster.leader_of(0)
    return cluster.cluster_map().replica(leader)[1].address


def test_put_get_delete_roundtrip(kv: Client) -> None:
    revision = kv.put(b"api:k", b"v1")
    assert revision > 0
    item = kv.get_item(b"api:k")
    assert item is not None and item.value == b"v1" and item.revision == revision
    assert kv.get(b"api:missing") is None
    assert kv.delete(b"api:k") is True
    assert kv.get(b"api:k") is None
    assert kv.delete(b"api:k") is False


def test_revisions_grow_with_each_write(kv: Client) -> None:
    first = kv.put(b"api:rev", b"a")
    second = kv.put(b"api:rev", b"b")
    assert second > first
    assert kv.get_item(b"api:rev").revision == second


def test_compare_and_set(kv: Client) -> None:
    created = kv.compare_and_set(b"api:cas", b"one", expected_revision=0)
    assert created.succeeded and created.revision > 0
    # Must-not-exist fails once it exists, and reports what is there.
    again = kv.compare_and_set(b"api:cas", b"two", expected_revision=0)
    assert not again.succeeded
    assert again.current is not None and again.current.value == b"one"
    assert again.current.revision == created.revision
    swapped = kv.compare_and_set(b"api:cas", b"two", expected_revision=created.revision)
    assert swapped.succeeded
    stale = kv.compare_and_set(b"api:cas", b"three", expected_revision=created.revision)
    assert not stale.succeeded and stale.current.value == b"two"
    assert kv.get(b"api:cas") == b"two"


def test_multi_put_is_atomic_and_multi_get_returns_found_keys(kv: Client) -> None:
    items = {b"api:m:%d" % i: b"val%d" % i for i in range(20)}
    revision = kv.multi_put(items)
    got = kv.multi_get([*items, b"api:m:absent"])
    assert got == items
    assert {kv.get_item(k).revision for k in items} == {revision}  # one entry, one revision
    assert kv.delete_many(list(items), atomic=True) == 20
    assert kv.multi_get(list(items)) == {}


def test_scan_prefix_range_and_continuation(kv: Client) -> None:
    keys = [b"api:scan:%03d" % i for i in range(25)]
    kv.multi_put({k: k[-3:] for k in keys})
    kv.put(b"api:scan", b"outside-prefix-boundary")
    kv.put(b"api:scao", b"after-prefix")
    seen: list[bytes] = []
    continuation = b""
    pages = 0
    while True:
        page = kv.scan(prefix=b"api:scan:", limit=10, continuation=continuation)
        seen += [i.key for i in page]
        pages += 1
        if not page.continuation:
            break
        continuation = page.continuation
        assert pages < 10
    assert seen == keys and pages == 3
    ranged = kv.scan(start=b"api:scan:005", end=b"api:scan:010")
    assert [i.key for i in ranged] == keys[5:10]


def test_session_token_round_trips(kv: Client, shared_cluster: LocalCluster) -> None:
    kv.put(b"api:session", b"x")
    token = kv.session_token()
    with Client.from_cluster(shared_cluster.dir, session=token, consistency=Consistency.SESSION) as other:
        assert other.core.session == kv.core.session
        assert other.get(b"api:session") == b"x"


async def test_async_client_same_answers(shared_cluster: LocalCluster) -> None:
    async with AsyncClient.from_cluster(shared_cluster.dir) as akv:
        revision = await akv.put(b"api:async", b"a")
        assert (await akv.get_item(b"api:async")).revision == revision
        result = await akv.compare_and_set(b"api:async", b"b", expected_revision=revision)
        assert result.succeeded
        assert await akv.multi_get([b"api:async"]) == {b"api:async": b"b"}
        assert await akv.delete(b"api:async")


# ----- bad input: a clear status, nothing written, the node stays up ----------------------------


@pytest.mark.parametrize(
    "key, value, why",
    [
        (b"", b"v", "empty"),
        (b"k" * 512, b"v", "512 bytes"),  # LMDB's limit is 511: refused before the log
        (b"api:big", b"v" * ((1 << 20) + 1), "1048577 bytes"),
    ],
)
def test_bad_put_is_rejected_and_changes_nothing(kv: Client, key: bytes, value: bytes, why: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=why):
        kv.put(key, value)
    if 0 < len(key) <= 511:
        assert kv.get(key) is None


def test_raw_invalid_requests_get_invalid_argument(shared_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(_leader_address(shared_cluster)) as channel:
        stub = pb_grpc.KVStub(channel)
        cases = [
            lambda: stub.Put(pb.PutRequest(key=b"", value=b"x")),
            lambda: stub.MultiPut(pb.MultiPutRequest()),
            lambda: stub.MultiPut(pb.MultiPutRequest(keys=[b"d", b"d"], values=[b"1", b"2"])),
            lambda: stub.MultiPut(pb.MultiPutRequest(keys=[b"d", b"e"], values=[b"1"])),  # unpaired
            lambda: stub.Get(pb.GetRequest(key=b"k", read=pb.ReadOptions(consistency=pb.BOUNDED))),
            lambda: stub.Get(pb.GetRequest(key=b"k", read=pb.ReadOptions(consistency=9))),
            lambda: stub.Put(pb.PutRequest(key=b"k", value=b"x", request_id=b"r" * 65)),
            lambda: stub.Scan(pb.ScanRequest(limit=1_000_000)),
        ]
        for call in cases:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert dict(info.value.trailing_metadata())["kvstore-error"] == "invalid_argument"
        assert stub.Get(pb.GetRequest(key=b"d")).found is False


def test_malformed_message_and_garbage_bytes(shared_cluster: LocalCluster, kv: Client) -> None:
    address = _leader_address(shared_cluster)
    with grpc.insecure_channel(address) as channel:
        raw_put = channel.unary_unary("/kvstore.v2.KV/Put")  # no serializer: bytes go as they are
        with pytest.raises(grpc.RpcError) as info:
            raw_put(b"\xff\xfe\x00garbage-that-is-not-protobuf", timeout=5)
        assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    raft_address = shared_cluster.cluster_map().shard(0).replicas[0].raft_address
    for target in (address, raft_address):
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"\x00\x00\x00\x10" + b"\xde\xad\xbe\xef" * 64)
    # Still up and still correct.
    assert kv.put(b"api:after-garbage", b"ok") > 0
    assert kv.get(b"api:after-garbage") == b"ok"
    assert all(r["role"] in ("leader", "follower") for r in shared_cluster.status()[0]["replicas"])


def test_follower_redirects_writes_to_the_leader(shared_cluster: LocalCluster) -> None:
    leader = shared_cluster.leader_of(0)
    follower = next(n for n in shared_cluster.node_names() if n != leader)
    follower_address = shared_cluster.cluster_map().replica(follower)[1].address
    with grpc.insecure_channel(follower_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KVStub(channel).Put(pb.PutRequest(key=b"api:redirect", value=b"x"))
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.NotLeader)
    assert error.leader == _leader_address(shared_cluster)
    # The client follows the redirect without surfacing it.
    with Client([follower_address]) as kv:
        kv.put(b"api:redirect", b"x")
        assert kv.get(b"api:redirect") == b"x"


def test_retried_write_with_the_same_request_id_applies_once(shared_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(_leader_address(shared_cluster)) as channel:
        stub = pb_grpc.KVStub(channel)
        client_id = b"api-dedup-client"  # a request id is a 16-byte client id + an 8-byte sequence
        first = stub.Put(pb.PutRequest(key=b"api:dedup", value=b"v1", request_id=client_id + bytes(7) + b"A"))
        second = stub.Put(
            pb.PutRequest(key=b"api:dedup", value=b"v2", request_id=client_id + bytes(7) + b"B")
        )
        retry = stub.Put(
            pb.PutRequest(key=b"api:dedup", value=b"v1", request_id=client_id + bytes(7) + b"A", retry=True)
        )
        assert retry.header.revision == first.header.revision < second.header.revision
        got = stub.Get(pb.GetRequest(key=b"api:dedup"))
        assert (got.kv.value, got.kv.revision) == (b"v2", second.header.revision)
        # A retried compare-and-set reports its first outcome instead of failing on its own write.
        cas = pb.CompareAndSetRequest(
            key=b"api:dedup",
            value=b"v3",
            expected_revision=second.header.revision,
            request_id=client_id + bytes(7) + b"C",
        )
        done = stub.CompareAndSet(cas)
        again = stub.CompareAndSet(cas)
        assert done.succeeded and again.succeeded and again.header.revision == done.header.revision
