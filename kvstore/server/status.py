"""Turning kvstore errors into gRPC statuses inside a grpc.aio servicer (uses the mapping in errors)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from kvstore import errors
from kvstore.proto import kvstore_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")


def rpc_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Abort the call with the error's status; an unexpected exception becomes INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            if isinstance(request, Malformed):
                raise errors.InvalidArgument(f"malformed request: {request.reason}")
            return await method(self, request, context)
        except errors.KvError as err:
            code, details, metadata = errors.to_grpc_status(err)
            await context.abort(code, details, trailing_metadata=tuple(metadata))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return Malformed(f"cannot decode {message_cls.__name__}: {exc}")

    return deserialize


def add_service(server: grpc.aio.Server, servicer: Any, service_name: str) -> None:
    """Register `servicer` for a service of proto/kvstore.proto.

    Like the generated add_*Servicer_to_server, except that undecodable bytes reach the method as
    `Malformed` and are answered INVALID_ARGUMENT (gRPC's default would be a bare UNKNOWN)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


# BatchOp field -> the servicer method that serves it alone.
_BATCH_METHODS = {
    "put": "Put",
    "get": "Get",
    "delete": "Delete",
    "compare_and_set": "CompareAndSet",
    "multi_put": "MultiPut",
    "multi_get": "MultiGet",
}


MAX_BATCH_OPS = 10_000


async def run_batch(servicer: Any, request: pb.BatchRequest) -> pb.BatchResponse:
    """Serve each op of a batch concurrently with the servicer's own method, as if sent alone.

    Running them concurrently is what lets the shard coalesce the writes into one Raft entry and
    the strong reads behind one barrier."""

    async def one(op: pb.BatchOp) -> dict[str, Any]:
        """The op's result as the keyword for `BatchResult` (built once, in the response)."""
        kind = op.WhichOneof("op")
        if kind is None:
            return _error_result(errors.InvalidArgument("empty batch op"))
        method = getattr(type(servicer), _BATCH_METHODS[kind]).__wrapped__
        try:
            return {kind: await method(servicer, getattr(op, kind), None)}
        except errors.KvError as err:
            return _error_result(err)
        except Exception:
            log.exception("unexpected error in batched %s", kind)
            return _error_result(errors.KvError(f"internal error in batched {kind}"))

    if len(request.ops) > MAX_BATCH_OPS:
        raise errors.InvalidArgument(f"{len(request.ops)} ops in one batch; the limit is {MAX_BATCH_OPS}")
    response = pb.BatchResponse()
    add = response.results.add  # copies each op's response once
    for result in await asyncio.gather(*(one(op) for op in request.ops)):
        add(**result)
    return response


def _error_result(err: errors.KvError) -> dict[str, Any]:
    code, details, metadata = errors.to_grpc_status(err)
    return {"error": pb.OpError(code=code.value[0], message=details, metadata=dict(metadata))}
