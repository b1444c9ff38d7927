"""Bounded work per request (issue 12, item 3 and part of 8): real nodes, real gRPC.

Each memory-amplification reproduction is run against the leader while a probe watches its RSS
(tests/amplification.py): the answer must be a clear status, quickly, and the leader's memory must
stay within a small multiple of the answer limit. Also: duplicate keys, request size limits, the
concurrency cap (node and router), the bounded proposal queue and client pipeline. The range
checks of the settings are in tests/{unit,cluster}/test_config_ranges.py.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kvstore import AsyncClient, Client, errors
from kvstore.client import pipeline as pipeline_module
from kvstore.client.pipeline import Pipeline
from kvstore.client.plans import Call
from kvstore.cluster.local import LocalCluster
from kvstore.config import MAX_PROPOSAL_BYTES, Limits, ServerSettings
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.replication import commands
from kvstore.server.router import start_router
from tests import amplification as amp
from tests.conftest import running_cluster, wait_until

LIMITS = Limits()
# What the leader may grow by while it answers an amplification attempt: the answer limit
# (8 MiB) held a few times over (values read, the protobuf answer, its serialised bytes) plus
# allocator slack; the unfixed code grew by gigabytes (see docs/reliability.md).
MAX_GROWTH = 100 * 10**6


# ----- a cluster holding large values ------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(shared_cluster: LocalCluster) -> Iterator[tuple[LocalCluster, pb_grpc.KVStub, int]]:
    """The shared 1x3 cluster with one 1 MiB key and 60 more under a prefix; (cluster, a raw stub
    on the leader, the leader's PID)."""
    _, pid, address = amp.leader(shared_cluster)
    with grpc.insecure_channel(address, options=amp.CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.KVStub(channel)
        amp.load_data(stub)
        time.sleep(1.0)  # the apply's own allocations settle before any probe starts
        yield shared_cluster, stub, pid


def _kind(metadata: Any) -> str:
    return dict(list(metadata or ())).get(errors.KIND_KEY, "")  # sync: pairs; aio: Metadata


def test_multi_get_naming_one_large_key_5000_times_reads_it_once(loaded: Any) -> None:
    _, stub, pid = loaded
    with amp.RssProbe(pid) as probe:
        outcome = amp.multi_get_duplicates(stub, 5000)
    print(
        f"\nMultiGet x5000 of one 1 MiB key: {outcome.code.name} in {outcome.seconds:.2f}s; {probe.summary()}"
    )
    assert outcome.code == grpc.StatusCode.OK and outcome.note == "1 keys answered"
    assert outcome.response_bytes < 2 * amp.MiB
    assert outcome.seconds < 5
    assert probe.peak_growth < MAX_GROWTH, probe.summary()


def test_multi_get_over_the_answer_limit_fails_early(loaded: Any) -> None:
    _, stub, pid = loaded
    keys = [amp.SCAN_PREFIX + b"%03d" % i for i in range(amp.SCAN_VALUES)]  # 60 MiB of values
    with amp.RssProbe(pid) as probe, pytest.raises(grpc.RpcError) as info:
        stub.MultiGet(pb.MultiGetRequest(keys=keys), timeout=10)
    print(f"\nMultiGet of 60 values of 1 MiB: {info.value.code().name}; {probe.summary()}")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _kind(info.value.trailing_metadata()) == "resource_exhausted"
    assert "fewer keys" in (info.value.details() or "")
    assert probe.peak_growth < MAX_GROWTH, probe.summary()
    # The SDK raises it typed, and a multi_get within the limit still works.
    with Client.from_cluster(loaded[0].dir) as kv:
        with pytest.raises(errors.ResourceExhausted):
            kv.multi_get(keys)
        assert kv.multi_get(keys[:5]) == {k: amp.BIG_VALUE for k in keys[:5]}


def test_batch_of_10000_gets_of_a_large_key_answers_what_fits_and_defers_the_rest(loaded: Any) -> None:
    _, stub, pid = loaded
    # What 10,000 batched ops cost whatever they read (tasks, per-op answers): the baseline.
    stub.Put(pb.PutRequest(key=b"amp:small", value=b"v" * 100, request_id=os.urandom(24)), timeout=10)
    small = pb.BatchRequest(ops=[pb.BatchOp(get=pb.GetRequest(key=b"amp:small"))] * 10_000)
    with amp.RssProbe(pid) as baseline:
        stub.Batch(small, timeout=30)
    request = pb.BatchRequest(ops=[pb.BatchOp(get=pb.GetRequest(key=amp.BIG_KEY))] * 10_000)
    with amp.RssProbe(pid) as probe:
        started = time.monotonic()
        response = stub.Batch(request, timeout=30)
        seconds = time.monotonic() - started
    served = [r for r in response.results if r.WhichOneof("result") == "get"]
    deferred = [r for r in response.results if r.WhichOneof("result") == "error"]
    print(
        f"\nBatch of 10,000 gets of a 1 MiB key: {len(served)} served, {len(deferred)} deferred, "
        f"{response.ByteSize() / 1e6:.1f} MB in {seconds:.2f}s; {probe.summary()} "
        f"(10,000 gets of a 100-byte value: {baseline.summary()})"
    )
    assert 1 <= len(served) <= LIMITS.max_response_bytes // amp.MiB
    assert all(r.get.kv.value == amp.BIG_VALUE for r in served)
    assert len(served) + len(deferred) == 10_000
    assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in deferred)
    assert all(r.error.metadata[errors.KIND_KEY] == "deferred" for r in deferred)
    assert response.ByteSize() <= LIMITS.max_message_bytes
    assert seconds < 10
    # The values add a few copies of the answer limit (read, answer, serialised, sent) to the peak.
    assert probe.peak - baseline.peak < 8 * LIMITS.max_response_bytes, (probe.summary(), baseline.summary())
    assert probe.peak_growth < 2 * MAX_GROWTH, probe.summary()


def test_scan_of_large_values_ends_its_page_at_the_answer_limit(loaded: Any) -> None:
    cluster, stub, pid = loaded
    with amp.RssProbe(pid) as probe:
        outcome, response = amp._call(stub.Scan, pb.ScanRequest(prefix=amp.SCAN_PREFIX, limit=10_000), 30)
    print(
        f"\nScan over 60 values of 1 MiB: {outcome.code.name}, {len(response.kvs)} records; {probe.summary()}"
    )
    assert outcome.code == grpc.StatusCode.OK
    assert 1 <= len(response.kvs) <= LIMITS.max_response_bytes // amp.MiB
    assert response.continuation == response.kvs[-1].key, "a short page says where to go on"
    assert probe.peak_growth < MAX_GROWTH, probe.summary()
    # Paging through: every record once, in order.
    with Client.from_cluster(cluster.dir) as kv:
        keys: list[bytes] = []
        continuation = b""
        while True:
            page = kv.scan(prefix=amp.SCAN_PREFIX, limit=10_000, continuation=continuation)
            keys += [item.key for item in page]
            if not page.continuation:
                break
            continuation = page.continuation
    assert keys == [amp.SCAN_PREFIX + b"%03d" % i for i in range(amp.SCAN_VALUES)]


def test_scan_across_shards_pages_through_large_values_without_skipping(make_cluster: Any) -> None:
    """Shard 0 holds 1 MiB values, the others small ones: shard 0's page ends early at the answer
    limit while the others return many keys past it. The merged page must end where shard 0's did
    (else its keys after that would be skipped), and fit the answer limit too."""
    cluster = make_cluster("three", shards=3, replicas=1)
    keys = [b"amp:y:%04d" % i for i in range(90)]
    ring = cluster.cluster_map().slots
    items = {k: amp.BIG_VALUE if ring.shard_for(k) == 0 else b"s" * 100 for k in keys}
    assert 10 < sum(1 for v in items.values() if v is amp.BIG_VALUE) < 80
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many(items, atomic=False)
        seen: list[bytes] = []
        continuation = b""
        while True:
            page = kv.scan(prefix=b"amp:y:", limit=1000, continuation=continuation)
            assert sum(len(i.key) + len(i.value) for i in page) <= LIMITS.max_response_bytes
            seen += [item.key for item in page]
            if not page.continuation:
                break
            continuation = page.continuation
    assert seen == keys


def test_batch_of_failed_cas_on_a_large_value_stays_within_the_answer_limit(loaded: Any) -> None:
    _, stub, pid = loaded
    with amp.RssProbe(pid) as probe:
        outcome = amp.batch_failed_cas(stub, 2000)
    print(f"\nBatch of 2,000 failed CAS on a 1 MiB value: {outcome.note}; {probe.summary()}")
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.response_bytes <= LIMITS.max_message_bytes


async def test_sdk_pipelines_many_large_reads_through_deferrals(loaded: Any) -> None:
    """100 concurrent gets of a 1 MiB value: the node answers each batch up to its limit (7 values)
    and defers the rest; the pipeline sends those again, so every caller gets the value."""
    async with AsyncClient.from_cluster(loaded[0].dir, timeout=30.0) as kv:
        values = await asyncio.gather(*(kv.get(amp.BIG_KEY) for _ in range(100)))
    assert all(v == amp.BIG_VALUE for v in values)


# ----- request size limits and duplicates --------------------------------------------------------


def test_write_size_limits_and_duplicates(loaded: Any) -> None:
    cluster, stub, _ = loaded
    nine = [(b"amp:w%d" % i, amp.BIG_VALUE) for i in range(9)]  # 9 MiB > max_request_bytes
    for request in (
        pb.MultiPutRequest(keys=[k for k, _ in nine], values=[v for _, v in nine]),
        pb.MultiPutRequest(keys=[b"amp:d", b"amp:d"], values=[b"1", b"2"]),
        pb.DeleteRequest(keys=[b"amp:d", b"amp:d"]),
        pb.DeleteRequest(keys=[b"%04d" % i + b"k" * 4000 for i in range(2200)]),  # 8.8 MB of keys
        pb.MultiGetRequest(keys=[b"%04d" % i + b"k" * 4000 for i in range(2200)]),
    ):
        method = stub.MultiPut if isinstance(request, pb.MultiPutRequest) else stub.Delete
        if isinstance(request, pb.MultiGetRequest):
            method = stub.MultiGet
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert stub.Get(pb.GetRequest(key=b"amp:w0"), timeout=10).found is False, "a refusal changed nothing"
    with Client.from_cluster(cluster.dir) as kv:
        with pytest.raises(errors.InvalidArgument, match="atomic=False"):
            kv.multi_put(nine)  # refused before sending: one atomic write is one proposal
        # Not atomic: the SDK splits a shard's part into requests within the limits.
        assert kv.put_many(nine, atomic=False)
        assert kv.multi_get([k for k, _ in nine[:4]]) == dict(nine[:4])


def test_the_message_limit_fits_the_largest_legal_request_and_answer() -> None:
    per_key = LIMITS.max_request_bytes // LIMITS.max_batch_keys
    keys = [b"%05d" % i + b"k" * 15 for i in range(LIMITS.max_batch_keys)]
    values = [b"v" * (per_key - 20) for _ in keys]
    multi_put = pb.MultiPutRequest(keys=keys, values=values, request_id=os.urandom(32))
    assert sum(map(len, keys)) + sum(map(len, values)) <= LIMITS.max_request_bytes
    assert multi_put.ByteSize() <= LIMITS.max_message_bytes
    # The largest legal proposal stays below pysyncobj's chunked path (16 MiB), pickled as sent.
    entry = [(os.urandom(64), commands.multi_put(zip(keys, values, strict=True)))]
    assert len(pickle.dumps(entry, protocol=5)) < 16 << 20
    assert LIMITS.max_request_bytes <= MAX_PROPOSAL_BYTES < 16 << 20
    # A batch answer at its limit, with a full header on every op.
    header = pb.ResponseHeader(shard=99, revision=2**40, term=2**20, epoch=2**20, served_by="s99r9" * 4)
    header.leader = "255.255.255.255:65535"
    answer = pb.BatchResponse()
    big = LIMITS.max_response_bytes // LIMITS.max_batch_ops
    for i in range(LIMITS.max_batch_ops):
        answer.results.add(
            get=pb.GetResponse(
                header=header, found=True, kv=pb.KeyValue(key=b"%05d" % i, value=b"v" * big, revision=2**40)
            )
        )
    assert answer.ByteSize() <= LIMITS.max_message_bytes
    # The SDK's pipelined batch (1,000 ops, 8 MiB of keys and values beyond its first op) fits too.
    assert pipeline_module._MAX_BATCH_BYTES <= LIMITS.max_request_bytes
    assert pipeline_module._MAX_BATCH_OPS <= LIMITS.max_batch_ops
    batch = pb.BatchRequest()
    per_op = pipeline_module._MAX_BATCH_BYTES // pipeline_module._MAX_BATCH_OPS
    for i in range(pipeline_module._MAX_BATCH_OPS):
        batch.ops.add(
            put=pb.PutRequest(key=b"%05d" % i, value=b"v" * (per_op - 5), request_id=os.urandom(24))
        )
    assert batch.ByteSize() <= LIMITS.max_message_bytes


# ----- back-pressure: concurrent RPCs and proposals ----------------------------------------------


@pytest.fixture(scope="module")
def tight_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """1x3 with small caps: 24 RPCs (10,000 ops) at once, 8 writes waiting to be applied."""
    server = ServerSettings(
        max_concurrent_rpcs=24, max_concurrent_ops=10_000, max_pending_proposals=8, session_wait=2.0
    )
    with running_cluster(tmp_path_factory.mktemp("tight") / "c", server=server) as cluster:
        yield cluster


async def _session_reads(address: str, count: int) -> list[grpc.StatusCode]:
    """`count` reads at once that each wait `session_wait` (2 s here) for an index never reached."""
    read = pb.ReadOptions(consistency=pb.SESSION, session={0: 10**9})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)

        async def one() -> grpc.StatusCode:
            try:
                await stub.Get(pb.GetRequest(key=b"k", read=read), timeout=10)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert isinstance(errors.from_rpc_error(err), errors.Overloaded)
                return err.code()

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_concurrent_rpcs_per_node_are_capped(tight_cluster: LocalCluster) -> None:
    _, _, address = amp.leader(tight_cluster)
    codes = await _session_reads(address, 60)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 60 - refused  # replica_behind: served
    assert refused == 60 - 24, codes  # exactly: the gate counts on the event loop


async def test_batched_ops_in_progress_per_node_are_capped(tight_cluster: LocalCluster) -> None:
    """Two Batches of 6,000 reads that each wait: the first is served, the second would pass
    10,000 ops in progress and is refused at once (a task and an answer per op, ~6 KB each)."""
    _, _, address = amp.leader(tight_cluster)
    read = pb.ReadOptions(consistency=pb.SESSION, session={0: 10**9})
    batch = pb.BatchRequest(ops=[pb.BatchOp(get=pb.GetRequest(key=b"k", read=read))] * 6_000)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)
        first = asyncio.ensure_future(stub.Batch(batch, timeout=30))
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Batch(batch, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _kind(info.value.trailing_metadata()) == "overloaded"
        assert "max_concurrent_ops" in (info.value.details() or "")
        answered = await first
    assert len(answered.results) == 6_000


async def test_concurrent_rpcs_per_router_are_capped(tight_cluster: LocalCluster) -> None:
    router = await start_router(
        "127.0.0.1:0", tight_cluster.cluster_map(), [], server_settings=ServerSettings(max_concurrent_rpcs=6)
    )
    try:
        codes = await _session_reads(f"127.0.0.1:{router.port}", 30)
    finally:
        await router.server.stop(0)
        await router.client.close()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30 - 6, codes


async def test_the_proposal_queue_is_bounded(tight_cluster: LocalCluster) -> None:
    """With the followers paused nothing commits: 8 writes wait, every one after is refused at once
    with "overloaded" (nothing proposed); once the followers are back, writes commit again."""
    name, _, address = amp.leader(tight_cluster)
    followers = [n for n in tight_cluster.node_names() if n != name]
    for follower in followers:
        tight_cluster.kill(follower, "STOP")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.KVStub(channel)

            async def put(i: int) -> tuple[grpc.StatusCode, str]:
                try:
                    await stub.Put(
                        pb.PutRequest(key=b"q%d" % i, value=b"v", request_id=os.urandom(24)), timeout=10
                    )
                    return grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as err:
                    return err.code(), _kind(err.trailing_metadata())

            started = time.monotonic()
            waiting = [asyncio.ensure_future(put(i)) for i in range(8)]
            await asyncio.sleep(0.3)
            refused = await asyncio.gather(*(put(100 + i) for i in range(12)))
            assert time.monotonic() - started < 1.5, "refusals are immediate"
            assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")] * 12
            for task in waiting:
                task.cancel()
    finally:
        for follower in followers:
            tight_cluster.kill(follower, "CONT")
    with Client.from_cluster(tight_cluster.dir) as kv:
        assert wait_until(lambda: _put_ok(kv), 30)


def _put_ok(kv: Client) -> bool:
    try:
        return kv.put(b"after", b"ok") > 0
    except errors.KvError:
        return False


# ----- the client pipeline's queue ---------------------------------------------------------------


class _Endpoint:
    """A node that answers nothing until released; Batch ops named in `defer_once` come back
    `Deferred` the first time."""

    def __init__(self, defer_once: set[bytes] | None = None) -> None:
        self.sent: list[list[bytes]] = []
        self.release = asyncio.Event()
        self.defer_once = set(defer_once or ())

    async def _call(self, call: Call, timeout: float | None = None) -> str:
        self.sent.append([call.request.key])
        await self.release.wait()
        return "ok"

    async def Batch(self, request: pb.BatchRequest, timeout: float) -> pb.BatchResponse:  # noqa: N802
        self.sent.append([op.put.key for op in request.ops])
        await self.release.wait()
        response = pb.BatchResponse()
        for op in request.ops:
            if op.put.key in self.defer_once:
                self.defer_once.discard(op.put.key)
                code, details, metadata = errors.to_grpc_status(errors.Deferred("full"))
                response.results.add(
                    error=pb.OpError(code=code.value[0], message=details, metadata=dict(metadata))
                )
            else:
                response.results.add(put=pb.PutResponse())
        return response


def _put(key: bytes, size: int = 1) -> Call:
    return Call("fake:1", "KV", "Put", pb.PutRequest(key=key, value=b"v" * size), 5.0)


async def test_the_pipeline_queue_is_bounded_and_refuses_with_overloaded() -> None:
    endpoint = _Endpoint()
    pipeline = Pipeline(
        "fake:1", 1, endpoint._call, lambda: endpoint, max_pending_ops=3, max_pending_bytes=1000
    )
    first = pipeline.submit(_put(b"a"))
    await asyncio.sleep(0.01)  # in flight: what follows waits
    waiting = [pipeline.submit(_put(b"w%d" % i)) for i in range(3)]
    over = pipeline.submit(_put(b"x"))
    assert over.done() and isinstance(over.exception(), errors.Overloaded)
    assert over.exception().from_server, "never sent: certainly not applied"  # type: ignore[union-attr]
    endpoint.release.set()
    await asyncio.gather(first, *waiting)
    # The byte bound: one large call waits alone, the next one is refused.
    endpoint.release.clear()
    first = pipeline.submit(_put(b"a"))
    await asyncio.sleep(0.01)
    big = pipeline.submit(_put(b"big", 900))
    assert isinstance(pipeline.submit(_put(b"y", 200)).exception(), errors.Overloaded)
    endpoint.release.set()
    await asyncio.gather(first, big)
    assert [b"x"] not in endpoint.sent and [b"y"] not in endpoint.sent


async def test_deferred_ops_go_again_in_the_next_batch() -> None:
    endpoint = _Endpoint(defer_once={b"b", b"c"})
    endpoint.release.set()
    pipeline = Pipeline("fake:1", 1, endpoint._call, lambda: endpoint)
    first = pipeline.submit(_put(b"a0"))
    await asyncio.sleep(0)
    results = await asyncio.gather(first, *(pipeline.submit(_put(k)) for k in (b"a", b"b", b"c")))
    assert results[0] == "ok" and all(isinstance(r, pb.PutResponse) for r in results[1:])
    assert endpoint.sent[-1] == [b"b", b"c"], "the deferred ops, sent again together"


def test_error_mapping_of_resource_exhausted() -> None:
    assert isinstance(
        errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", {}),
        errors.Overloaded,
    )
    bare = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", {})
    assert type(bare) is errors.ResourceExhausted and not bare.from_server
    deferred = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", {errors.KIND_KEY: "deferred"})
    assert isinstance(deferred, errors.Deferred) and isinstance(deferred, errors.Unavailable)
    assert errors.Overloaded.code == errors.ResourceExhausted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
