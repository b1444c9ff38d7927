"""Client-side pipelining: concurrent KV calls to one node travel together as Batch RPCs.

`AsyncClient` hands every pipelined call to the `Pipeline` of its (node, lane). A Python gRPC call
costs ~0.3 ms of CPU on each side and a batched op a small fraction of that, so under load fewer,
bigger RPCs are most of the throughput (docs/performance.md, finding 14). Knows nothing of plans,
routing or retries: an op's outcome, or its typed error, goes back to the plan that made it.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import errors
from kvstore.batch_ops import FIELD_BY_METHOD
from kvstore.client.plans import Call
from kvstore.proto import kvstore_pb2 as pb

_WRITES = frozenset({"Put", "Delete", "CompareAndSet", "MultiPut"})
# A read's lane is its consistency level: each waits differently on the node (strong: a barrier;
# session: up to session_wait for the replica to catch up; bounded and eventual: not at all).
_READ_LANES = {level: f"read:{pb.Consistency.Name(level).lower()}" for level in pb.Consistency.values()}


def lane(call: Call) -> str:
    """Calls that wait alike share a pipeline: an eventual read never waits behind a write's
    fsync, a strong read's barrier or a session read's catching up."""
    if call.method in _WRITES:
        return "write"
    # An unknown level gets a lane of its own; the node answers it with INVALID_ARGUMENT.
    return _READ_LANES.get(call.request.read.consistency, "read:other")


def _payload_bytes(request: Any) -> int:
    """About what an op adds to a batch: its keys and values (the other fields are small).
    Cheaper than `ByteSize()`, which with upb serialises the message once more."""
    if isinstance(request, pb.MultiPutRequest):
        return sum(map(len, request.keys)) + sum(map(len, request.values))
    if isinstance(request, pb.PutRequest | pb.CompareAndSetRequest):
        return len(request.key) + len(request.value)
    if isinstance(request, pb.DeleteRequest | pb.MultiGetRequest):
        return sum(map(len, request.keys))
    return len(request.key)


# A Batch RPC carries at most this many ops and (beyond its first op) this many bytes of them,
# inside the server's limits (Limits: 10,000 ops; a message of max_request_bytes plus framing).
# Answers are bounded by the node: ops whose answers do not fit its answer limit come back
# `Deferred` and are sent again in the next batch.
_MAX_BATCH_OPS = 1_000
_MAX_BATCH_BYTES = 8 << 20
# What may wait for a slot, per endpoint and lane: a caller that submits faster than the node
# answers gets `Overloaded` (never sent) instead of a queue that grows without end. The plans
# treat it as a busy node: they back off and try again until the call's own timeout.
MAX_PENDING_OPS = 10 * _MAX_BATCH_OPS
MAX_PENDING_BYTES = 8 * _MAX_BATCH_BYTES


class _AnswerTooLarge(Exception):
    """A Batch RPC's answer exceeded gRPC's message limit (a bare RESOURCE_EXHAUSTED)."""


@dataclass
class _Queued:
    call: Call
    future: asyncio.Future[Any]
    deadline: float  # loop time: the op's timeout counts from when the caller made it
    size: int  # `_payload_bytes` of its request
    alone: bool = False  # send it in an RPC of its own (its batch's answer was too large)


class Pipeline:
    """Coalesces the KV calls made to one endpoint into Batch RPCs, at most `depth` in flight.

    A call made while the endpoint has a free slot leaves at the end of the current event-loop
    iteration, together with every other call made in that iteration. A call made while all slots
    are busy waits, and leaves with everything else that waited as soon as a slot frees (as a Kafka
    producer's `max.in.flight`): under load, fewer and bigger RPCs, which is what throughput is
    made of when a Python gRPC call costs ~0.3 ms of CPU; under light load, no waiting at all.

    Every op keeps its own timeout, counted from when it was made: one still queued at its
    deadline fails unsent (`Unavailable`); one in flight fails as `UnknownOutcome`, as a gRPC
    deadline would, even though the batch's RPC waits for the op with the latest deadline.

    Each op keeps its own outcome: a per-op error is raised to that op's plan only, exactly as if
    it had been sent alone (the plan then retries or redirects it by itself).

    What waits is bounded (`max_pending_ops`, `max_pending_bytes`): beyond it a call fails at
    once with `Overloaded`, unsent, as a Kafka producer's full buffer does (its plan backs off and
    tries again within its timeout, so a burst waits and a runaway producer is told)."""

    def __init__(
        self,
        address: str,
        depth: int,
        send_one: Callable[[Call, float], Awaitable[Any]],
        kv_stub: Callable[[], Any],
        max_pending_ops: int = MAX_PENDING_OPS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self._address = address
        self._depth = depth
        self._max_pending_ops = max_pending_ops
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._send_one = send_one  # one op alone: the plain unary RPC (raises KvError)
        self._kv_stub = kv_stub  # the endpoint's KV stub, for Batch
        self._in_flight = 0
        self._flush_scheduled = False
        self._closed = False
        self._pending: deque[_Queued] = deque()
        self._expiry: asyncio.TimerHandle | None = None  # the earliest queued deadline
        self._tasks: set[asyncio.Task[Any]] = set()  # asyncio keeps only weak references to tasks

    def submit(self, call: Call) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(errors.ClientClosed("the client is closed: the call was not sent"))
            return future
        size = _payload_bytes(call.request)
        if self._pending and (
            len(self._pending) >= self._max_pending_ops
            or self._pending_bytes + size > self._max_pending_bytes
        ):
            future.set_exception(
                errors.Overloaded(
                    f"not sent to {self._address}: {len(self._pending)} calls ({self._pending_bytes} "
                    f"bytes) already wait for it, the client's limit ({self._max_pending_ops} calls, "
                    f"{self._max_pending_bytes} bytes)"
                )
            )
            return future
        self._pending.append(_Queued(call, future, loop.time() + call.timeout, size))
        self._pending_bytes += size
        self._schedule_flush()
        self._arm_expiry()
        return future

    def close(self) -> None:
        """Fail what waits, unsent; what is in flight fails when the channel closes (`_send`)."""
        self._closed = True
        self._cancel_expiry()
        self._fail_pending(errors.ClientClosed("the client was closed: the call was not sent"))

    # ----- sending -----------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._pending and not self._flush_scheduled and self._in_flight < self._depth:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        now = asyncio.get_running_loop().time()
        while self._pending and self._in_flight < self._depth:
            batch = self._take_batch(now)
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(batch, now))
            self._tasks.add(task)
            task.add_done_callback(self._on_sent)
        if self._pending:
            self._arm_expiry()
        else:
            self._cancel_expiry()

    def _on_sent(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._schedule_flush()

    def _take_batch(self, now: float) -> list[_Queued]:
        """The oldest pending ops that fit one Batch RPC (ops whose caller gave up are dropped)."""
        batch: list[_Queued] = []
        size = 0
        while self._pending and len(batch) < _MAX_BATCH_OPS:
            queued = self._pending.popleft()
            self._pending_bytes -= queued.size
            if not self._still_waiting(queued, now):
                continue
            if batch and (queued.alone or size + queued.size > _MAX_BATCH_BYTES):
                self._requeue([queued])
                break
            batch.append(queued)
            size += queued.size
            if queued.alone:
                break
        return batch

    def _requeue(self, ops: list[_Queued]) -> None:
        """Put ops back at the head of the queue, in order (they were first in line). Not counted
        against the bound: they were admitted once already."""
        for queued in reversed(ops):
            self._pending.appendleft(queued)
            self._pending_bytes += queued.size

    async def _send(self, batch: list[_Queued], now: float) -> None:
        loop = asyncio.get_running_loop()
        expiry = _InFlightExpiry(loop, batch, self._address)
        try:
            await self._exchange(batch, max(queued.deadline for queued in batch) - now)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not self._closed:
                for queued in batch:
                    queued.future.cancel()
                raise
            # Closing the client closed the channel, and grpc.aio cancels the calls on it.
            closed = errors.ClientClosed("the client was closed during the call; a write may still apply")
            for queued in batch:
                _settle(queued.future, error=closed)
        except Exception as exc:  # a bug here must not leave its callers waiting forever
            for queued in batch:
                _settle(queued.future, error=exc)
        finally:
            expiry.cancel()

    async def _exchange(self, batch: list[_Queued], timeout: float) -> None:
        """Send the ops and settle each with its result or its own error."""
        outcomes: list[Any]
        try:
            if len(batch) == 1:  # alone: the plain unary RPC, no batch envelope
                outcomes = [await self._send_one(batch[0].call, timeout)]
            else:
                outcomes = await self._send_batch(batch, timeout)
        except _AnswerTooLarge:
            # The answers together outgrew gRPC's message limit (a node that predates answer
            # budgets): each goes again in an RPC of its own, as the slot allows. (Writes carry
            # request ids, so asking again never applies one twice.)
            self._send_again([queued for queued in batch if not queued.future.done()], alone=True)
            return
        except errors.KvError as err:  # the RPC itself failed: no op got an answer
            if not err.from_server and isinstance(err, errors.Unavailable | errors.UnknownOutcome):
                # The node did not answer (deadline, connection): what waits for it would only
                # wait out another timeout there, so it fails now, unsent.
                self._fail_pending(self._not_sent(f"it did not answer the call before: {err.message}"))
            outcomes = [err, *(copy.copy(err) for _ in batch[1:])]  # one exception per raiser
        deferred: list[_Queued] = []
        for queued, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, errors.Deferred) and not queued.future.done():
                deferred.append(queued)  # the batch's answer was full: it goes in the next one
            elif isinstance(outcome, errors.KvError):
                _settle(queued.future, error=outcome)
            else:
                _settle(queued.future, result=outcome)
        if deferred:
            self._send_again(deferred)

    def _send_again(self, ops: list[_Queued], alone: bool = False) -> None:
        """Queue ops the node did not answer, ahead of everything else (their deadlines stand)."""
        if self._closed:
            for queued in ops:
                _settle(queued.future, error=errors.ClientClosed("the client was closed: not sent again"))
            return
        for queued in ops:
            queued.alone = queued.alone or alone
        self._requeue(ops)
        self._arm_expiry()  # the slot frees (and the flush runs) when this batch's send returns

    async def _send_batch(self, batch: list[_Queued], timeout: float) -> list[Any]:
        """One Batch RPC: each op's response, or the `KvError` the node answered it with."""
        request = pb.BatchRequest()
        add = request.ops.add  # copies each op's request once (BatchOp(...) then ops=[...] copied twice)
        for queued in batch:
            add(**{FIELD_BY_METHOD[queued.call.method]: queued.call.request})
        try:
            response = await self._kv_stub().Batch(request, timeout=timeout)
        except grpc.RpcError as exc:
            err = errors.from_rpc_error(exc)
            if type(err) is errors.ResourceExhausted and not err.from_server:
                raise _AnswerTooLarge from None  # gRPC's own message limit, not a kvstore answer
            raise err from None
        outcomes: list[Any] = []
        for queued, result in zip(batch, response.results, strict=True):
            if result.WhichOneof("result") == "error":
                error = result.error
                code = errors.status_code(error.code)
                outcomes.append(errors.from_status(code, error.message, dict(error.metadata)))
            else:
                outcomes.append(getattr(result, FIELD_BY_METHOD[queued.call.method]))
        return outcomes

    # ----- deadlines of queued ops -------------------------------------------------------------

    def _not_sent(self, why: str) -> errors.Unavailable:
        # Never sent, so certainly not applied: the plan treats it as an unresponsive node
        # (tries another replica, or retries until the operation's own deadline).
        return errors.Unavailable(f"not sent to {self._address}: {why}")

    def _fail_pending(self, error: errors.KvError) -> None:
        pending, self._pending = self._pending, deque()
        self._pending_bytes = 0
        for queued in pending:
            _settle(queued.future, error=error)

    def _arm_expiry(self) -> None:
        """While ops wait for a slot, one timer fails each at its own deadline (not when a slot
        frees, which may be much later if the node hangs)."""
        if self._expiry is None and self._pending and self._in_flight >= self._depth:
            earliest = min(queued.deadline for queued in self._pending)
            self._expiry = asyncio.get_running_loop().call_at(earliest, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = asyncio.get_running_loop().time()
        self._pending = deque(queued for queued in self._pending if self._still_waiting(queued, now))
        self._pending_bytes = sum(queued.size for queued in self._pending)
        self._arm_expiry()

    def _still_waiting(self, queued: _Queued, now: float) -> bool:
        """False for an op whose caller gave up, or whose deadline passed (it then fails, unsent)."""
        if queued.future.done():
            return False
        if now >= queued.deadline:
            queued.future.set_exception(self._not_sent("timed out waiting for the connection"))
            return False
        return True

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class _InFlightExpiry:
    """Fails each op of a batch in flight at its own deadline, as a gRPC deadline would (the RPC
    itself waits for the op with the latest one). One timer per batch, usually never firing."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batch: list[_Queued], address: str) -> None:
        self._loop, self._batch, self._address = loop, batch, address
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        deadlines = [queued.deadline for queued in self._batch if not queued.future.done()]
        if len(deadlines) > 1 and min(deadlines) < max(deadlines):  # else the RPC's own deadline
            self._timer = self._loop.call_at(min(deadlines), self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        for queued in self._batch:
            if not queued.future.done() and now >= queued.deadline:
                error = errors.UnknownOutcome(
                    f"no answer from {self._address} in time; a write may apply", from_server=False
                )
                queued.future.set_exception(error)
        self._arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _settle(future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Give a queued op its outcome, unless its caller has stopped waiting for it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
