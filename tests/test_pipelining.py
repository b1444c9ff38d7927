"""AsyncClient pipelining: concurrent calls to one node travel as one Batch RPC, each op on its own."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvstore import AsyncClient, errors
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc


async def test_concurrent_ops_are_batched_and_keep_their_own_results(shared_cluster: LocalCluster) -> None:
    async with AsyncClient.from_cluster(shared_cluster.dir) as kv:
        await kv.put(b"pipe:warm", b"x")
        batches = 0
        original = kv._pipeline(kv.core.leaders[0])._send

        async def counting_send(batch: list) -> None:  # type: ignore[type-arg]
            nonlocal batches
            batches += 1
            await original(batch)

        kv._pipeline(kv.core.leaders[0])._send = counting_send  # type: ignore[method-assign]
        keys = [b"pipe:%03d" % i for i in range(200)]
        revisions = await asyncio.gather(*(kv.put(k, k) for k in keys))
        assert len(set(revisions)) >= 1 and all(r > 0 for r in revisions)
        assert batches >= 1, "200 concurrent puts should have gone out in batches"
        values = await asyncio.gather(*(kv.get(k) for k in keys))
        assert values == keys
        # One bad op in a batch fails alone; its neighbours succeed.
        results = await asyncio.gather(
            kv.put(b"pipe:ok-1", b"1"),
            kv.put(b"", b"empty"),
            kv.put(b"pipe:ok-2", b"2"),
            return_exceptions=True,
        )
        assert isinstance(results[1], errors.InvalidArgument)
        assert isinstance(results[0], int) and isinstance(results[2], int)
        assert await kv.get(b"pipe:ok-2") == b"2"


async def test_pipelining_off_gives_the_same_answers(shared_cluster: LocalCluster) -> None:
    async with AsyncClient.from_cluster(shared_cluster.dir, pipelining=False) as kv:
        keys = [b"nopipe:%02d" % i for i in range(50)]
        await asyncio.gather(*(kv.put(k, k) for k in keys))
        assert await asyncio.gather(*(kv.get(k) for k in keys)) == keys


def test_batch_rpc_limits_and_empty_ops(shared_cluster: LocalCluster) -> None:
    leader = shared_cluster.leader_of(0)
    address = shared_cluster.cluster_map().replica(leader)[1].address
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)
        response = stub.Batch(pb.BatchRequest(ops=[pb.BatchOp(), pb.BatchOp(get=pb.GetRequest(key=b"nope"))]))
        assert response.results[0].WhichOneof("result") == "error"
        assert response.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert response.results[1].get.found is False
        with pytest.raises(grpc.RpcError) as info:
            stub.Batch(pb.BatchRequest(ops=[pb.BatchOp(get=pb.GetRequest(key=b"k"))] * 10_001))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
