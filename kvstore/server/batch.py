"""The Batch RPC's fan-out on a servicer (node or router): each op served by the servicer's own
method, as if sent alone, concurrently, within one answer budget."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvstore import errors
from kvstore.batch_ops import METHOD_BY_FIELD
from kvstore.config import Limits
from kvstore.proto import kvstore_pb2 as pb
from kvstore.server.validation import check_batch

log = logging.getLogger(__name__)


class ResponseBudget:
    """The bytes of keys and values a Batch's answer may still take (`Limits.max_response_bytes`).

    Batched read ops charge what they read as they read it, each in one synchronous step, so the
    answer under construction never holds much more than the budget. The first op to charge is
    always admitted (alone, any op's answer fits one message: a value is at most 1 MiB, and a
    MultiGet is refused by its own read if it is larger); an op that arrives once the budget is
    spent is answered `Deferred` (nothing done: the client sends it again, in another batch).
    Once one op was deferred, read ops check `admit()` first and are deferred without reading."""

    __slots__ = ("limit", "used", "full")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.full = False

    def admit(self) -> None:
        """Before reading: defer at once if an earlier op already found the budget spent."""
        if self.full:
            raise self._deferred()

    def charge(self, size: int) -> None:
        """After reading `size` bytes of keys and values: keep them, or defer the op."""
        if self.used and self.used + size > self.limit:
            self.full = True
            raise self._deferred()
        self.used += size

    def _deferred(self) -> errors.Deferred:
        return errors.Deferred(
            f"the batch's answer reached its {self.limit}-byte limit first: send this op again"
        )


async def run_batch(servicer: Any, request: pb.BatchRequest, limits: Limits) -> pb.BatchResponse:
    """Serve each op of a batch concurrently with the servicer's own method, as if sent alone,
    within one answer budget (`ResponseBudget`; the methods take it as their `budget` argument).

    Running them concurrently is what lets the shard coalesce the writes into one Raft entry and
    the strong reads behind one barrier."""
    budget = ResponseBudget(limits.max_response_bytes)

    async def one(op: pb.BatchOp) -> dict[str, Any]:
        """The op's result as the keyword for `BatchResult` (built once, in the response)."""
        kind = op.WhichOneof("op")
        if kind is None:
            return _error_result(errors.InvalidArgument("empty batch op"))
        method = getattr(type(servicer), METHOD_BY_FIELD[kind]).__wrapped__
        try:
            return {kind: await method(servicer, getattr(op, kind), None, budget)}
        except errors.KvError as err:
            return _error_result(err)
        except Exception:
            log.exception("unexpected error in batched %s", kind)
            return _error_result(errors.KvError(f"internal error in batched {kind}"))

    check_batch(len(request.ops), limits)
    response = pb.BatchResponse()
    add = response.results.add  # copies each op's response once
    for result in await asyncio.gather(*(one(op) for op in request.ops)):
        add(**result)
    return response


def _error_result(err: errors.KvError) -> dict[str, Any]:
    code, details, metadata = errors.to_grpc_status(err)
    return {"error": pb.OpError(code=code.value[0], message=details, metadata=dict(metadata))}
