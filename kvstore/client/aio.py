"""`AsyncClient`: the asyncio front door. Runs the core's plans with grpc.aio channels."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from kvstore import errors
from kvstore.batch_ops import FIELD_BY_METHOD
from kvstore.client import arguments as check
from kvstore.client import factory, results
from kvstore.client.core import ClientCore, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.pipeline import Pipeline, lane
from kvstore.client.plans import Call, Parallel, Plan, Sleep
from kvstore.client.results import CasResult, Item, Items, ScanPage
from kvstore.client.retry import RetryPolicy
from kvstore.client.transport import STUBS
from kvstore.config import Limits
from kvstore.routing.cluster_map import ClusterMap


class AsyncClient:
    """Asyncio kvstore client. Same API and behaviour as `Client` (both run `ClientCore`).

    async with AsyncClient.from_cluster(".kvstore/demo") as kv:
        await kv.put(b"k", b"v")

    Arguments, checks, `timeout` and `retry` as for `Client`. One per event loop: its channels
    belong to the loop of its first call, and it is not thread-safe (share it between the tasks
    of one loop; a thread with a loop of its own makes its own). After `close()` every call
    raises `errors.ClientClosed`.

    `pipelining`, `pipeline_depth`: concurrent calls to one node travel together as Batch RPCs,
    at most `pipeline_depth` in flight per node and lane (README, "The Python SDK").
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        router: str | None = None,
        consistency: ReadConsistency | str = Consistency.STRONG,
        read_policy: ReadPolicy | str = ReadPolicy.LEADER,
        session: str | None = None,
        timeout: float = factory.DEFAULT_TIMEOUT,
        zone: str = "",
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        pipelining: bool = True,
        pipeline_depth: int = 1,
        _core: ClientCore | None = None,
    ) -> None:
        if _core is not None and (endpoints is not None or router is not None):
            raise errors.InvalidArgument(factory.WHERE)
        check.flag(pipelining, "pipelining")
        if type(pipeline_depth) is not int or pipeline_depth < 1:
            raise errors.InvalidArgument(
                f"pipeline_depth must be an int of at least 1, not {pipeline_depth!r}"
            )
        self.core = _core or factory.make_core(
            endpoints, router, None, consistency, read_policy, session, timeout, zone, retry, limits
        )
        # Concurrent calls to one endpoint travel as Batch RPCs, at most `pipeline_depth` of them
        # in flight per endpoint and lane (`pipeline.lane`): a Python gRPC call costs ~0.3 ms of CPU
        # on each side, a batched op a small fraction of it.
        self.pipelining = pipelining
        self.pipeline_depth = pipeline_depth
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        # One channel per endpoint, shared by every call to it (grpc.aio multiplexes over HTTP/2).
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # its channels' loop: its first call's

    @classmethod
    def from_cluster(cls, directory: str | Path, **kwargs: Any) -> AsyncClient:
        """As `Client.from_cluster`: a smart client for the local cluster in `directory`."""
        core = factory.core_from_cluster(directory, kwargs)
        return cls(_core=core, **kwargs)

    # ----- running plans ---------------------------------------------------------------------

    async def _run(self, plan: Plan) -> Any:
        if self._closed:
            plan.close()
            raise errors.ClientClosed("the client is closed: nothing was sent")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            plan.close()
            raise RuntimeError(
                "this AsyncClient belongs to the event loop of its first call (its gRPC channels are "
                "bound to it): make one AsyncClient per event loop"
            )
        try:
            step = next(plan)
        except StopIteration as done:
            return done.value
        return await self._run_from(plan, step)

    async def _run_from(self, plan: Plan, step: Any) -> Any:
        try:
            while True:
                try:
                    outcome = await self._perform(step)
                except errors.KvError as err:
                    step = plan.throw(err)
                else:
                    step = plan.send(outcome)
        except StopIteration as done:
            return done.value

    async def _perform(self, step: Any) -> Any:
        if isinstance(step, Call):
            return await self._start(step)
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, Parallel):
            return await self._run_parallel(step.plans)
        raise TypeError(f"unknown plan step {step!r}")

    def _start(self, call: Call) -> Awaitable[Any]:
        """The call under way: a pipelined one is a plain future (no task of its own)."""
        if self.pipelining and call.service == "KV" and call.method in FIELD_BY_METHOD:
            return self._pipeline(call.address, lane(call)).submit(call)
        return self._call(call)

    async def _run_parallel(self, plans: list[Plan]) -> list[Any]:
        """Run plans concurrently. The usual plan (one shard's part of a split operation) is a
        single call: every plan's first call is submitted now and awaited as plain futures, and
        only a plan that needs more steps (a retry, a redirect) continues as a task. A task per
        part cost ~10% of a client's CPU on multi-shard multi_get."""
        results: list[Any] = [None] * len(plans)
        started: list[tuple[int, Plan, Awaitable[Any]]] = []
        for i, plan in enumerate(plans):
            try:
                step = next(plan)
            except StopIteration as done:
                results[i] = done.value
                continue
            started.append((i, plan, self._start(step) if isinstance(step, Call) else self._perform(step)))
        outcomes = await asyncio.gather(*(first for _, _, first in started), return_exceptions=True)
        more: list[tuple[int, Awaitable[Any]]] = []
        for (i, plan, _), outcome in zip(started, outcomes, strict=True):
            try:
                if isinstance(outcome, errors.KvError):
                    step = plan.throw(outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    step = plan.send(outcome)
            except StopIteration as done:
                results[i] = done.value
                continue
            more.append((i, self._run_from(plan, step)))
        if more:
            for (i, _), value in zip(more, await asyncio.gather(*(rest for _, rest in more)), strict=True):
                results[i] = value
        return results

    async def _call(self, step: Call, timeout: float | None = None) -> Any:
        stub = self._stub(step.address, step.service)
        try:
            return await getattr(stub, step.method)(
                step.request, timeout=timeout or step.timeout, metadata=step.metadata or None
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        except asyncio.CancelledError:
            # Closing the client closed the channel, and grpc.aio cancels the calls on it; a
            # cancellation of the caller's own task stays one.
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise errors.ClientClosed(
                    "the client was closed during the call; a write may still apply"
                ) from None
            raise

    def _pipeline(self, address: str, lane_name: str) -> Pipeline:
        pipeline = self._pipelines.get((address, lane_name))
        if pipeline is None:
            pipeline = self._pipelines[address, lane_name] = Pipeline(
                address, self.pipeline_depth, self._call, lambda: self._stub(address, "KV")
            )
        return pipeline

    def _stub(self, address: str, service: str) -> Any:
        if self._closed:
            raise errors.ClientClosed("the client is closed")
        key = (address, service)
        stub = self._stubs.get(key)
        if stub is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.aio.insecure_channel(
                    address, options=self.core.limits.grpc_options()
                )
            stub = self._stubs[key] = STUBS[service](channel)
        return stub

    async def close(self) -> None:
        """Close the channels. Calls waiting to be sent fail with `ClientClosed`, unsent; calls in
        flight fail with it too (a write among them may or may not apply). Closing is final;
        closing twice is harmless."""
        self._closed = True
        for pipeline in self._pipelines.values():
            pipeline.close()
        channels, self._channels = self._channels, {}
        self._stubs.clear()
        for channel in channels.values():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- the API (keep in step with sync.Client) ------------------------------------------

    async def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> int:
        """Write `value` under `key`; return the write's revision (its shard's Raft log index).

        Retried under one request id until applied, refused, or `timeout` (seconds; None: the
        client's) runs out: it applies at most once. Raises `UnknownOutcome` when it may or may
        not have applied (read the key back, or write again: a put is idempotent)."""
        return (await self._run(self.core.put(key, value, timeout))).header.revision

    async def get(
        self, key: bytes, *, consistency: ReadConsistency | str | None = None, timeout: float | None = None
    ) -> bytes | None:
        """The value of `key`, or None if it does not exist. `consistency`: this read's level (a
        `Consistency` level or its name; None: the client's); `timeout` in seconds (None: the
        client's). Raises `Timeout` if no replica answered in time."""
        return results.get_result(await self._run(self.core.get(key, consistency, timeout=timeout)))

    async def get_item(
        self, key: bytes, *, consistency: ReadConsistency | str | None = None, timeout: float | None = None
    ) -> Item | None:
        """`key` with its value and revision (what `compare_and_set` expects), or None if it
        does not exist. Arguments as for `get`."""
        return results.get_item_result(await self._run(self.core.get(key, consistency, timeout=timeout)))

    async def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Delete `key`; True if it existed. Retried as `put` is (at most once; `UnknownOutcome`
        when it may or may not have applied)."""
        return (await self._run(self.core.delete([key], timeout=timeout))).deleted == 1

    async def delete_many(self, keys: list[bytes], *, atomic: bool, timeout: float | None = None) -> int:
        """Delete `keys`; return how many existed. `atomic` must be said: True, one Raft entry on
        one shard (keys that span shards raise `CrossShardWrite`: give them a shared {hash tag});
        False, one write per shard (and per request's limits), each atomic on its own. A failure
        after some part applied raises `UnknownOutcome` (retry: each part applies at most once)."""
        return (await self._run(self.core.delete(keys, atomic, timeout=timeout))).deleted

    async def compare_and_set(
        self, key: bytes, value: bytes, *, expected_revision: int, timeout: float | None = None
    ) -> CasResult:
        """Write `value` only if `key`'s revision is `expected_revision` (0: only if it does not
        exist). Returns a `CasResult`: `succeeded`; on success `revision` (the write's); on
        failure `revision` is None and `current` is what the key holds now (None: absent), whose
        `current_revision` to retry against. Retried as `put` is."""
        return results.cas_result(
            await self._run(self.core.compare_and_set(key, value, expected_revision, timeout))
        )

    async def multi_put(self, items: Items, *, timeout: float | None = None) -> int:
        """Write all `items` (a mapping, or (key, value) pairs) atomically: one Raft entry, so
        the keys must share a shard (a shared {hash tag}, else `CrossShardWrite`) and fit one
        request's limits. Returns its revision (every key gets it)."""
        return (await self._run(self.core.multi_put(items, atomic=True, timeout=timeout))).header.revision

    async def put_many(self, items: Items, *, atomic: bool, timeout: float | None = None) -> dict[int, int]:
        """Write `items` (a mapping, or (key, value) pairs) that may span shards. `atomic` must
        be said: True, as `multi_put` (one shard, one entry); False, one write per shard (and per
        request's limits), each atomic on its own. Returns {shard: revision} for each shard
        written. A failure after some part applied raises `UnknownOutcome` (retry: each part
        applies at most once)."""
        return results.revisions(await self._run(self.core.multi_put(items, atomic=atomic, timeout=timeout)))

    async def multi_get(
        self,
        keys: list[bytes],
        *,
        consistency: ReadConsistency | str | None = None,
        timeout: float | None = None,
    ) -> dict[bytes, bytes]:
        """The values of the `keys` that exist, {key: value} in the order asked (keys may span
        shards: read from each in parallel). Arguments as for `get`."""
        keys = check.keys(keys, self.core.limits)
        return results.multi_get_result(
            keys, (await self._run(self.core.multi_get(keys, consistency, timeout=timeout)))
        )

    async def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | str | None = None,
        timeout: float | None = None,
    ) -> ScanPage:
        """One page of keys in key order across every shard: those from `start` (inclusive) to
        `end` (exclusive; b"": no end) that begin with `prefix`, at most `limit` (1 to 10,000).
        The page's `continuation` (b"" on the last page) passed back as `continuation=` gives
        the next page. Arguments as for `get`."""
        plan = self.core.scan(
            start=start,
            end=end,
            prefix=prefix,
            limit=limit,
            continuation=continuation,
            consistency=consistency,
            timeout=timeout,
        )
        return results.scan_result(await self._run(plan))

    async def send(self, request: Message, *, timeout: float | None = None) -> Message:
        """Send one KV request message (a `kvstore.proto.kvstore_pb2` PutRequest, GetRequest,
        MultiPutRequest, MultiGetRequest, DeleteRequest, CompareAndSetRequest or ScanRequest)
        the way this client sends its own calls (routing, split by shard, retries), and return the
        response message with its header: for proxies (the router) and tools that need revisions
        the typed methods do not return (`ClientCore.send` says which request fields count)."""
        return await self._run(self.core.send(request, timeout))

    def session_token(self) -> str:
        """This client's session token: the revisions it has written or read, per shard. Give it
        to another client (`Client(..., session=token, consistency="session")`) and that client
        reads at least what this one wrote. Local: nothing is sent."""
        return self.core.session_token()

    async def cluster_map(self, *, timeout: float | None = None) -> ClusterMap:
        """The cluster map (shards, their replicas' addresses, the map's epoch), fetched afresh
        from the nodes (the newest a node holds; the one this client has if none answers)."""
        return await self._run(self.core.refresh_map(deadline=self.core.deadline(check.timeout(timeout))))
