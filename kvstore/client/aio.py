"""`AsyncClient`: the asyncio front door. Runs the core's plans with grpc.aio channels."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from kvstore import errors
from kvstore.batch_ops import FIELD_BY_METHOD
from kvstore.client import factory, results
from kvstore.client.core import ClientCore, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.pipeline import Pipeline, lane
from kvstore.client.plans import Call, Parallel, Plan, Sleep
from kvstore.client.retry import RetryPolicy
from kvstore.client.transport import CHANNEL_OPTIONS, STUBS


class AsyncClient:
    """Asyncio kvstore client. Same API and behaviour as `Client` (both run `ClientCore`).

    async with AsyncClient.from_cluster(".kvstore/demo") as kv:
        await kv.put(b"k", b"v")

    `timeout` and `retry` (a `RetryPolicy`) as for `Client`.
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        router: str | None = None,
        consistency: ReadConsistency = Consistency.STRONG,
        read_policy: ReadPolicy = ReadPolicy.LEADER,
        session: str | None = None,
        timeout: float = 10.0,
        zone: str = "",
        retry: RetryPolicy | None = None,
        pipelining: bool = True,
        pipeline_depth: int = 1,
        _core: ClientCore | None = None,
    ) -> None:
        self.core = _core or factory.make_core(
            endpoints, router, None, consistency, read_policy, session, timeout, zone, retry
        )
        # Concurrent calls to one endpoint travel as Batch RPCs, at most `pipeline_depth` of them
        # in flight per endpoint and lane (`pipeline.lane`): a Python gRPC call costs ~0.3 ms of CPU
        # on each side, a batched op a small fraction of it.
        self.pipelining = pipelining
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be at least 1, not {pipeline_depth}")
        self.pipeline_depth = pipeline_depth
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        # One channel per endpoint, shared by every call to it (grpc.aio multiplexes over HTTP/2).
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._closed = False

    @classmethod
    def from_cluster(cls, directory: str | Path, **kwargs: Any) -> AsyncClient:
        core = factory.core_from_cluster(directory, kwargs)
        return cls(_core=core, **kwargs)

    # ----- running plans ---------------------------------------------------------------------

    async def _run(self, plan: Plan) -> Any:
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
            return await getattr(stub, step.method)(step.request, timeout=timeout or step.timeout)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None

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
                    address, options=CHANNEL_OPTIONS
                )
            stub = self._stubs[key] = STUBS[service](channel)
        return stub

    async def close(self) -> None:
        """Close the channels. Calls waiting to be sent fail with `ClientClosed`, unsent; calls in
        flight fail with it too (a write among them may or may not apply). Closing is final."""
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

    async def put(self, key: bytes, value: bytes) -> int:
        """Write `value`; returns the write's revision. Raises UnknownOutcome if it may or may not apply."""
        return (await self._run(self.core.put(key, value))).header.revision

    async def get(self, key: bytes, *, consistency: ReadConsistency | None = None) -> bytes | None:
        return results.get_result(await self._run(self.core.get(key, consistency)))

    async def get_item(
        self, key: bytes, *, consistency: ReadConsistency | None = None
    ) -> results.Item | None:
        return results.get_item_result(await self._run(self.core.get(key, consistency)))

    async def delete(self, key: bytes) -> bool:
        return (await self._run(self.core.delete([key]))).deleted == 1

    async def delete_many(self, keys: list[bytes], *, atomic: bool = True) -> int:
        return (await self._run(self.core.delete(list(keys), atomic))).deleted

    async def compare_and_set(self, key: bytes, value: bytes, *, expected_revision: int) -> results.CasResult:
        return results.cas_result(await self._run(self.core.compare_and_set(key, value, expected_revision)))

    async def multi_put(self, items: Mapping[bytes, bytes] | list[tuple[bytes, bytes]]) -> int:
        """Atomic write of keys on one shard (use a shared {hash tag}); returns its revision."""
        return (await self._run(self.core.multi_put(results.as_items(items), atomic=True))).header.revision

    async def put_many(
        self, items: Mapping[bytes, bytes] | list[tuple[bytes, bytes]], *, atomic: bool = False
    ) -> dict[int, int]:
        """Write keys that may span shards: atomic per shard only. Returns {shard: revision}."""
        return results.revisions(await self._run(self.core.multi_put(results.as_items(items), atomic=atomic)))

    async def multi_get(
        self, keys: list[bytes], *, consistency: ReadConsistency | None = None
    ) -> dict[bytes, bytes]:
        keys = list(keys)
        return results.multi_get_result(keys, await self._run(self.core.multi_get(keys, consistency)))

    async def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | None = None,
    ) -> results.ScanPage:
        plan = self.core.scan(
            start=start,
            end=end,
            prefix=prefix,
            limit=limit,
            continuation=continuation,
            consistency=consistency,
        )
        return results.scan_result(await self._run(plan))

    async def send(self, request: Message) -> Message:
        """Send one KV request message the way this client sends its own calls (routing, split by
        shard, retries) and return the response message with its header (see `Client.send`)."""
        return await self._run(self.core.send(request))

    def session_token(self) -> str:
        return self.core.session_token()

    async def cluster_map(self) -> Any:
        return await self._run(self.core.refresh_map())
