"""The gRPC glue of the servicers (nodes and router): registering a service with tolerant request
decoding, turning kvstore errors into gRPC statuses (the mapping itself is in errors.py), and the
concurrency gate in front of the KV methods."""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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
            check_well_formed(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(exc, context, method.__name__)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def check_well_formed(request: Any) -> None:
    """Raise InvalidArgument for a request `_tolerant` could not decode."""
    if isinstance(request, Malformed):
        raise errors.InvalidArgument(f"malformed request: {request.reason}")


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext, name: str) -> None:
    """End the call with `exc`'s status (errors.py's mapping), or INTERNAL for an unexpected one
    (logged with its traceback: call it from the `except` block). Unary and streaming methods."""
    if isinstance(exc, errors.KvError):
        code, details, metadata = errors.to_grpc_status(exc)
        await context.abort(code, details, trailing_metadata=tuple(metadata))
    log.exception("unexpected error in %s", name)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}")


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


class ConcurrencyGate:
    """At most `max_rpcs` RPCs of a service in progress at once, and at most `max_ops` ops (a Batch
    counts one per op: each costs a task and an answer, ~6 KB of memory, for ~20 bytes sent).
    One more is refused at once with `Overloaded` (RESOURCE_EXHAUSTED), before any work; an RPC
    arriving while nothing is in progress is always served (a legal Batch never starves).

    Our own count rather than grpc.aio.server(maximum_concurrent_rpcs=...): in grpcio 1.62 a refused
    RPC also decrements that counter, so after the first burst the cap no longer holds
    (grpc/grpc#41531, measured here: 17 of 30 calls admitted under a cap of 6); and that cap would
    refuse health checks too, which must answer under load. Exact here: one event loop."""

    __slots__ = ("max_rpcs", "max_ops", "rpcs", "ops")

    def __init__(self, max_rpcs: int, max_ops: int) -> None:
        self.max_rpcs = max_rpcs
        self.max_ops = max_ops
        self.rpcs = 0
        self.ops = 0

    def wrap(self, method: Callable[[Any, Any], Awaitable[T]]) -> Callable[[Any, Any], Awaitable[T]]:
        async def gated(request: Any, context: grpc.aio.ServicerContext) -> T:
            ops = len(request.ops) if isinstance(request, pb.BatchRequest) else 1
            if self.rpcs and (self.rpcs >= self.max_rpcs or self.ops + ops > self.max_ops):
                refusal = errors.Overloaded(
                    f"the server already serves {self.rpcs} requests of {self.ops} ops, its limit "
                    f"(server.max_concurrent_rpcs {self.max_rpcs}, server.max_concurrent_ops "
                    f"{self.max_ops}): nothing was done, retry after a back-off"
                )
                await abort_for(refusal, context, "the concurrency gate")
            self.rpcs += 1
            self.ops += ops
            try:
                return await method(request, context)
            finally:
                self.rpcs -= 1
                self.ops -= ops

        return gated


def same_cluster(
    cluster_id: str, method: Callable[[Any, Any], Awaitable[T]]
) -> Callable[[Any, Any], Awaitable[T]]:
    """Refuse a call that names another cluster (`kvstore-cluster-id` metadata) with ClusterMismatch
    (FAILED_PRECONDITION), before any work: a client never talks to a copy that took its cluster's
    addresses. A call without the metadata (a client that does not know the id yet, grpcurl) passes."""

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> T:
        await _refuse_another_cluster(cluster_id, context)
        return await method(request, context)

    return checked


def same_cluster_stream(
    cluster_id: str, method: Callable[[Any, Any], AsyncIterator[T]]
) -> Callable[[Any, Any], AsyncIterator[T]]:
    """`same_cluster` for a server-streaming RPC (Admin.Backup: a backup never copies another
    cluster's node)."""

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        await _refuse_another_cluster(cluster_id, context)
        async for message in method(request, context):
            yield message

    return checked


async def _refuse_another_cluster(cluster_id: str, context: grpc.aio.ServicerContext) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == errors.CLUSTER_ID_KEY and value != cluster_id:
            refusal = errors.ClusterMismatch(
                f"this server belongs to cluster {cluster_id or '(none)'}, the request is for "
                f"cluster {value}: nothing was done (another cluster's node at this address?)"
            )
            await abort_for(refusal, context, "the cluster check")


def admin_only(secret: str, method: Callable[[Any, Any], Awaitable[T]]) -> Callable[[Any, Any], Awaitable[T]]:
    """Refuse a call without the cluster's admin secret (`kvstore-admin-token`) before any work,
    PERMISSION_DENIED; every call when this node has no secret (`server.admin_secret_file`)."""

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> T:
        given = next((v for k, v in context.invocation_metadata() or () if k == errors.ADMIN_TOKEN_KEY), "")
        if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
            why = (
                "this node has no admin secret (server.admin_secret_file)"
                if not secret
                else ("the call carries no admin secret" if not given else "the call's admin secret is wrong")
            )
            await abort_for(errors.PermissionDenied(f"{why}: nothing was done"), context, "the admin check")
        return await method(request, context)

    return checked


def add_service(
    server: grpc.aio.Server,
    servicer: Any,
    service_name: str,
    gate: ConcurrencyGate | None = None,
    cluster_id: str | None = None,
    admin_methods: frozenset[str] = frozenset(),
    admin_secret: str = "",
) -> None:
    """Register `servicer` for a service of proto/kvstore.proto, its RPCs counted by `gate`,
    (`cluster_id`) refused when they name another cluster (`same_cluster`), and `admin_methods`
    refused without `admin_secret` (`admin_only`).

    Like the generated add_*Servicer_to_server, except that undecodable bytes reach the method as
    `Malformed` and are answered INVALID_ARGUMENT (gRPC's default would be a bare UNKNOWN)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:  # e.g. Admin.Backup; never gated (a service of its own bounds)
            if cluster_id is not None:
                behaviour = same_cluster_stream(cluster_id, behaviour)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                behaviour,
                request_deserializer=_tolerant(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
            continue
        if method.name in admin_methods:
            behaviour = admin_only(admin_secret, behaviour)
        if cluster_id is not None:
            behaviour = same_cluster(cluster_id, behaviour)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            gate.wrap(behaviour) if gate is not None else behaviour,
            request_deserializer=_tolerant(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
