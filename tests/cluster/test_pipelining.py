"""AsyncClient pipelining: concurrent calls to one node travel as one Batch RPC, each op on its own."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import grpc
import pytest

from kvstore import AsyncClient, errors
from kvstore.client.pipeline import Pipeline
from kvstore.client.plans import Call
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import new_leader


async def test_concurrent_ops_are_batched_and_keep_their_own_results(shared_cluster: LocalCluster) -> None:
    async with AsyncClient.from_cluster(shared_cluster.dir) as kv:
        await kv.put(b"pipe:warm", b"x")
        batches = 0
        writes = kv._pipeline(kv.core.leaders[0], "write")
        original = writes._send

        async def counting_send(batch: list, now: float) -> None:  # type: ignore[type-arg]
            nonlocal batches
            batches += 1
            await original(batch, now)

        writes._send = counting_send  # type: ignore[method-assign]
        keys = [b"pipe:%03d" % i for i in range(200)]
        revisions = await asyncio.gather(*(kv.put(k, k) for k in keys))
        assert len(set(revisions)) >= 1 and all(r > 0 for r in revisions)
        assert 1 <= batches <= 4, f"200 concurrent puts should leave in a few RPCs, not {batches}"
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


# --- the pipeline itself, against a fake endpoint: what waits, what leaves together --------------


class _FakeEndpoint:
    """Stands in for AsyncClient under one `Pipeline`: records what is sent, answers on release
    (a Batch RPC fails with `batch_error` if set, or is cancelled as a closing channel does)."""

    def __init__(
        self, batch_error: grpc.StatusCode | None = None, cancel: bool = False, unary_silent: bool = False
    ) -> None:
        self.sent: list[list[bytes]] = []  # keys of each RPC, in order
        self.release = asyncio.Event()
        self.batch_error = batch_error
        self.cancel = cancel
        self.unary_silent = unary_silent  # a unary call fails as an unanswered one (UNAVAILABLE)

    async def _call(self, call: Call, timeout: float | None = None) -> str:
        self.sent.append([call.request.key])
        await self.release.wait()
        if self.unary_silent:
            raise errors.from_status(grpc.StatusCode.UNAVAILABLE, "fake", {})
        return "ok"

    def _stub(self, address: str, service: str) -> _FakeEndpoint:
        return self

    def pipeline(self, depth: int = 1) -> Pipeline:
        return Pipeline("fake:1", depth, self._call, lambda: self)

    async def Batch(self, request: pb.BatchRequest, timeout: float) -> pb.BatchResponse:  # noqa: N802
        self.sent.append([op.put.key or op.get.key for op in request.ops])
        await self.release.wait()
        if self.cancel:
            raise asyncio.CancelledError
        if self.batch_error is not None:
            error, self.batch_error = self.batch_error, None
            raise grpc.aio.AioRpcError(error, grpc.aio.Metadata(), grpc.aio.Metadata(), details="fake")
        response = pb.BatchResponse()
        for _ in request.ops:
            response.results.add(put=pb.PutResponse())
        return response


def _put(key: bytes, timeout: float = 5.0) -> Call:
    return Call("fake:1", "KV", "Put", pb.PutRequest(key=key, value=b"v"), timeout)


def _get(key: bytes, consistency: int) -> Call:
    read = pb.ReadOptions(consistency=consistency)  # type: ignore[arg-type]
    return Call("fake:1", "KV", "Get", pb.GetRequest(key=key, read=read), 5.0)


async def test_calls_made_while_the_slot_is_busy_leave_together_when_it_frees() -> None:
    endpoint = _FakeEndpoint()
    pipeline = endpoint.pipeline()
    first = pipeline.submit(_put(b"a"))
    await asyncio.sleep(0.01)
    assert endpoint.sent == [[b"a"]]  # alone: sent at once
    later = []
    for key in (b"b", b"c", b"d"):  # one per loop iteration, all while "a" is in flight
        later.append(pipeline.submit(_put(key)))
        await asyncio.sleep(0)
    assert endpoint.sent == [[b"a"]], "the only slot is busy: nothing else may leave yet"
    endpoint.release.set()
    await asyncio.gather(first, *later)
    assert endpoint.sent == [[b"a"], [b"b", b"c", b"d"]]


async def test_a_deadline_that_passes_while_queued_fails_the_call_unsent() -> None:
    endpoint = _FakeEndpoint()
    pipeline = endpoint.pipeline()
    first = pipeline.submit(_put(b"slow"))
    await asyncio.sleep(0.01)
    hasty = pipeline.submit(_put(b"hasty", timeout=0.02))
    await asyncio.sleep(0.1)
    assert hasty.done(), "a queued call fails at its own deadline, not when the busy slot frees"
    with pytest.raises(errors.Unavailable, match="not sent"):
        await hasty
    endpoint.release.set()
    await first
    assert endpoint.sent == [[b"slow"]], "a call whose deadline passed in the queue is never sent"


async def test_an_op_in_flight_fails_at_its_own_deadline_not_its_batchs() -> None:
    endpoint = _FakeEndpoint()
    pipeline = endpoint.pipeline()
    short = pipeline.submit(_put(b"short", timeout=0.05))
    long = pipeline.submit(_put(b"long", timeout=5.0))
    await asyncio.sleep(0.15)
    assert endpoint.sent == [[b"short", b"long"]]
    assert short.done() and not long.done()
    with pytest.raises(errors.UnknownOutcome):  # it was sent: a write may still apply
        await short
    endpoint.release.set()
    assert (await long).ByteSize() == 0  # the fake's empty PutResponse


async def test_a_batch_the_node_does_not_answer_fails_the_queued_calls_unsent() -> None:
    endpoint = _FakeEndpoint(batch_error=grpc.StatusCode.UNAVAILABLE)
    pipeline = endpoint.pipeline()
    in_flight = [pipeline.submit(_put(b"a")), pipeline.submit(_put(b"b"))]
    await asyncio.sleep(0.01)
    queued = pipeline.submit(_put(b"c"))
    endpoint.release.set()
    for future in in_flight:
        with pytest.raises(errors.Unavailable) as info:
            await future
        assert not info.value.from_server, "sent and unanswered: a write may have applied"
    with pytest.raises(errors.Unavailable, match="not sent") as info:
        await queued
    assert info.value.from_server, "never sent: certainly not applied"
    assert endpoint.sent == [[b"a", b"b"]], "nothing more goes to a node that did not answer"


async def test_a_lone_call_the_node_does_not_answer_fails_the_queued_calls_unsent_too() -> None:
    endpoint = _FakeEndpoint(unary_silent=True)
    pipeline = endpoint.pipeline()
    alone = pipeline.submit(_put(b"a"))
    await asyncio.sleep(0.01)
    queued = pipeline.submit(_put(b"b"))
    endpoint.release.set()
    with pytest.raises(errors.Unavailable):
        await alone
    with pytest.raises(errors.Unavailable, match="not sent"):
        await queued
    assert endpoint.sent == [[b"a"]]


async def test_a_batch_whose_answer_is_too_large_is_asked_again_op_by_op() -> None:
    endpoint = _FakeEndpoint(batch_error=grpc.StatusCode.RESOURCE_EXHAUSTED)
    endpoint.release.set()
    pipeline = endpoint.pipeline()
    assert await asyncio.gather(pipeline.submit(_put(b"a")), pipeline.submit(_put(b"b"))) == ["ok", "ok"]
    assert endpoint.sent[0] == [b"a", b"b"] and sorted(endpoint.sent[1:]) == [[b"a"], [b"b"]]


async def test_closing_fails_waiting_and_in_flight_calls_and_is_final() -> None:
    endpoint = _FakeEndpoint(cancel=True)
    pipeline = endpoint.pipeline()
    in_flight = [pipeline.submit(_put(b"a")), pipeline.submit(_put(b"b"))]
    await asyncio.sleep(0.01)
    waiting = pipeline.submit(_put(b"c"))
    pipeline.close()
    endpoint.release.set()  # the fake now raises CancelledError, as grpc.aio does on channel close
    for future in [*in_flight, waiting]:
        with pytest.raises(errors.ClientClosed):
            await future
    with pytest.raises(errors.ClientClosed):
        await pipeline.submit(_put(b"d"))
    assert endpoint.sent == [[b"a", b"b"]]


async def test_eventual_reads_do_not_wait_behind_writes_strong_or_session_reads() -> None:
    kv = AsyncClient("fake:1")
    endpoint = _FakeEndpoint()
    kv._call = endpoint._call  # type: ignore[method-assign]
    write = kv._start(_put(b"w"))
    strong = kv._start(_get(b"s", pb.STRONG))
    session = kv._start(_get(b"n", pb.SESSION))
    await asyncio.sleep(0.01)
    eventual = kv._start(_get(b"e", pb.EVENTUAL))
    await asyncio.sleep(0.01)
    assert sorted(endpoint.sent) == [[b"e"], [b"n"], [b"s"], [b"w"]], "each lane has its own slot"
    second_write = kv._start(_put(b"w2"))
    await asyncio.sleep(0.01)
    assert [b"w2"] not in endpoint.sent, "a write waits behind the write in flight"
    endpoint.release.set()
    await asyncio.gather(write, strong, session, eventual, second_write)
    assert endpoint.sent[-1] == [b"w2"]


def test_pipeline_depth_must_be_positive() -> None:
    with pytest.raises(errors.InvalidArgument, match="pipeline_depth"):
        AsyncClient("fake:1", pipeline_depth=0)


# --- a real cluster: what queues behind a hung batch must move on ------------------------------


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def test_pipelined_writes_move_on_when_the_leader_is_paused(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """A SIGSTOPped leader holds the write lane's only slot until the attempt times out. Writes
    queued behind it must not wait for a second timeout: an attempt's timeout counts from when it
    was made, and one that passes in the queue is never sent. None acknowledged may be lost."""
    cluster = make_cluster()
    old_leader = cluster.leader_of(0)
    assert old_leader is not None
    acked: dict[bytes, bytes] = {}
    failures: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    async with AsyncClient.from_cluster(cluster.dir, timeout=10.0) as kv:

        async def writer(w: int) -> None:
            for i in range(3_000):  # bounded in count as well as by `stop`
                if stop.is_set():
                    return
                key, value = b"pause:%02d:%05d" % (w, i), b"v%d" % i
                try:
                    await kv.put(key, value)
                    acked[key] = value
                except errors.KvError as err:
                    failures[err.kind] += 1

        async def late_put(i: int) -> float:
            started = time.monotonic()
            await kv.put(b"late:%d" % i, b"x")
            acked[b"late:%d" % i] = b"x"
            return time.monotonic() - started

        writers = [asyncio.ensure_future(writer(w)) for w in range(32)]
        try:
            await _until(lambda: len(acked) >= 300, 20, "writes flow")
            await asyncio.to_thread(cluster.kill, old_leader, "STOP")
            try:
                await asyncio.sleep(0.2)  # the writers' batch to the old leader now hangs
                late = []
                for i in range(4):  # queued behind the hung batch, at different times
                    late.append(asyncio.ensure_future(late_put(i)))
                    await asyncio.sleep(0.2)
                latencies = await asyncio.wait_for(asyncio.gather(*late), 30)
                await asyncio.to_thread(new_leader, cluster, 0, old_leader, 20.0)
                paused_at = len(acked)
                await _until(lambda: len(acked) >= paused_at + 300, 30, "writes flow through the new leader")
            finally:
                await asyncio.to_thread(cluster.kill, old_leader, "CONT")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 30)
        # About one attempt timeout (each queued call fails at its own deadline, or at once when
        # the hung batch fails), then the new leader: not a second timeout. Without the queue
        # deadline and the timeout counted from submission, these took 5.5-6.5 s.
        limit = 1.6 * kv.core.settings.rpc_timeout
        assert max(latencies) < limit, f"late writes took {[round(x, 1) for x in latencies]}s"
        assert set(failures) <= {"unknown_outcome", "unavailable"}, failures
        keys = sorted(acked)
        for first in range(0, len(keys), 1_000):
            chunk = keys[first : first + 1_000]
            got = await kv.multi_get(chunk)  # strong
            missing = [k for k in chunk if got.get(k) != acked[k]]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
