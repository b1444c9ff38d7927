"""Typed errors, and their mapping to gRPC status codes: the one place that mapping lives.

Servers raise these; `kvstore.server` turns them into a status with `to_grpc_status`. Clients turn
an `grpc.RpcError` back into the same class with `from_rpc_error`. Extra fields (the leader's
address, the map epoch) travel as trailing metadata, so any gRPC client can read them.
"""

from __future__ import annotations

import grpc

# Trailing metadata keys (gRPC requires lower case).
KIND_KEY = "kvstore-error"
LEADER_KEY = "kvstore-leader"
EPOCH_KEY = "kvstore-epoch"


class KvError(Exception):
    """Base of every kvstore error."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: str = "internal"
    #: True when the client may retry the same request elsewhere or later without risk.
    retryable: bool = False

    def __init__(self, message: str = "", *, from_server: bool = True) -> None:
        super().__init__(message or self.__class__.__doc__ or self.kind)
        self.message = message or (self.__class__.__doc__ or self.kind).strip()
        #: False when the error came from the transport (no kvstore server said it) after the
        #: request may have left: for a write, it may have reached a server and been applied.
        #: Errors known to arise before anything was sent (no connection) keep it True.
        self.from_server = from_server

    def metadata(self) -> list[tuple[str, str]]:
        return [(KIND_KEY, self.kind)]


class InvalidArgument(KvError):
    """The request is malformed or exceeds a limit; nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_argument"


class CrossShardWrite(InvalidArgument):
    """An atomic multi-key write spans several shards."""

    kind = "cross_shard"


class NotLeader(KvError):
    """This replica is not its shard's leader; `leader` is the leader's gRPC address if known."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "not_leader"
    retryable = True

    def __init__(self, message: str = "", leader: str = "") -> None:
        super().__init__(message or f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader

    def metadata(self) -> list[tuple[str, str]]:
        return [*super().metadata(), (LEADER_KEY, self.leader)]


class WrongShard(KvError):
    """The key belongs to another shard under the cluster map at `epoch`: refresh the map and retry."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "wrong_shard"
    retryable = True

    def __init__(self, message: str = "", epoch: int = 0) -> None:
        super().__init__(message or f"key not owned by this shard (map epoch {epoch})")
        self.epoch = epoch

    def metadata(self) -> list[tuple[str, str]]:
        return [*super().metadata(), (EPOCH_KEY, str(self.epoch))]


class Moving(KvError):
    """The key's slot is moving between shards right now (the source has fenced it, or the
    destination has not yet started serving it): nothing was done; retry shortly (the SDK and the
    router do, as Redis Cluster clients do on TRYAGAIN)."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "moving"
    retryable = True


class UnknownShard(KvError):
    """The request names a shard that is not in the cluster map."""

    code = grpc.StatusCode.NOT_FOUND
    kind = "unknown_shard"


class ReplicaBehind(KvError):
    """This replica has not caught up to the requested session token or staleness bound in time."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "replica_behind"
    retryable = True


class Unavailable(KvError):
    """No leader, no quorum, or the node is shutting down; the request was not applied."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "unavailable"
    retryable = True


class DiskFull(KvError):
    """Insufficient storage: the node's disk is nearly full, so writes are refused (reads still work).

    Nothing was applied. Writes resume by themselves once space is freed; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "disk_full"


class UnknownOutcome(KvError):
    """A write was proposed but its outcome is unknown (timeout, leader change): it may or may not apply.

    Not the same as a failure. Retrying with the same request id is safe: it applies at most once.
    """

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = "unknown_outcome"
    retryable = True


class Timeout(KvError):
    """The client's deadline passed before any replica gave an answer."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = "timeout"


class ClientClosed(KvError):
    """The client was closed (`close()`) before the call completed; closing is final."""

    code = grpc.StatusCode.CANCELLED
    kind = "client_closed"


_BY_KIND: dict[str, type[KvError]] = {
    cls.kind: cls
    for cls in (
        KvError,
        InvalidArgument,
        CrossShardWrite,
        NotLeader,
        WrongShard,
        Moving,
        UnknownShard,
        ReplicaBehind,
        Unavailable,
        DiskFull,
        UnknownOutcome,
        Timeout,
    )
}

# Status codes that carry no kvstore metadata (raised by gRPC itself, or by a peer that is not a
# kvstore server) and what they mean to a kvstore client.
_BY_CODE: dict[grpc.StatusCode, type[KvError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnknownOutcome,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.NOT_FOUND: UnknownShard,
}


def to_grpc_status(err: KvError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """(code, details, trailing metadata) for a servicer to abort with."""
    return err.code, err.message, err.metadata()


def from_rpc_error(exc: grpc.RpcError) -> KvError:
    """Rebuild the typed error a server raised (or the nearest meaning of a bare gRPC status)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    # Sync calls give a tuple of pairs, grpc.aio a Metadata object: both iterate as pairs.
    trailing = dict(list(exc.trailing_metadata() or ())) if hasattr(exc, "trailing_metadata") else {}
    return from_status(code, details, trailing)


def from_status(code: grpc.StatusCode, details: str, metadata: dict[str, str]) -> KvError:
    """The typed error for a status and its kvstore metadata (also used for per-op batch errors)."""
    kind = metadata.get(KIND_KEY)
    if kind == NotLeader.kind:
        return NotLeader(details, leader=str(metadata.get(LEADER_KEY, "")))
    if kind == WrongShard.kind:
        return WrongShard(details, epoch=int(metadata.get(EPOCH_KEY, "0") or 0))
    if kind in _BY_KIND:
        return _BY_KIND[kind](details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _GRPC_CONCURRENCY_LIMIT in details:
        return Overloaded(f"{code.name}: {details}")  # refused before the method ran: not applied
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _NEVER_SENT):
        # No connection: the channel failed the call before sending it, so it cannot have applied.
        return Unavailable(f"not sent (no connection): {details}")
    return _BY_CODE.get(code, KvError)(f"{code.name}: {details}", from_server=False)


# What gRPC says when a call fails because no connection could be made: the call never left.
_NEVER_SENT = ("failed to connect to all addresses", "DNS resolution failed")

_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


class SessionExpired(KvError):
    """A retried write was refused: the server no longer holds its client session (evicted, or
    expired), so it cannot tell whether an earlier attempt applied. Nothing was applied now; an
    earlier attempt may have applied. Definite for this attempt: do not retry it blindly (read,
    then decide)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "session_expired"


_BY_KIND[SessionExpired.kind] = SessionExpired


# ----- bounded work per request (issue 12) ---------------------------------------------------------


class ResourceExhausted(KvError):
    """The answer would exceed the response size limit (or a message the gRPC limit); nothing was
    changed: ask for less (fewer keys in one multi_get, a smaller scan page)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "resource_exhausted"


class Overloaded(Unavailable):
    """Too much work is already in progress (a bounded queue is full, or the node serves as many
    RPCs as it may): the request was refused before it started, so nothing was applied. Retry
    after a back-off; the SDK does so by itself until the call's timeout."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "overloaded"
    retryable = True


class Deferred(Overloaded):
    """An op of a Batch RPC the node did not serve because the batch's answer had reached its size
    limit (the ops that fit were answered). Nothing was changed: send it again, in another batch."""

    kind = "deferred"


# What grpc.aio answers (RESOURCE_EXHAUSTED) when a server's maximum_concurrent_rpcs is reached.
_GRPC_CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded"

_BY_KIND.update({cls.kind: cls for cls in (ResourceExhausted, Overloaded, Deferred)})
# Without kvstore metadata, RESOURCE_EXHAUSTED comes from gRPC itself: a message over its size limit.
_BY_CODE[grpc.StatusCode.RESOURCE_EXHAUSTED] = ResourceExhausted


# ----- cluster identity (issue 15, item 2b) --------------------------------------------------------

CLUSTER_ID_KEY = "kvstore-cluster-id"  # request metadata: the cluster the client means to talk to


class ClusterMismatch(KvError):
    """The server belongs to another cluster than the one the client talks to (another cluster's
    node, e.g. a restored copy, took the address). Nothing was done; the client must not retry
    there: point it at its own cluster's addresses."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "cluster_mismatch"


_BY_KIND[ClusterMismatch.kind] = ClusterMismatch


# ----- the metadata group (issue 16) ---------------------------------------------------------------


class MapConflict(KvError):
    """The cluster map changed between reading it and writing the next one (another change won).
    Nothing was written: read the map again and decide again."""

    code = grpc.StatusCode.ABORTED
    kind = "map_conflict"


_BY_KIND[MapConflict.kind] = MapConflict


ADMIN_TOKEN_KEY = "kvstore-admin-token"  # request metadata: the cluster's admin secret


class PermissionDenied(KvError):
    """The call needs the cluster's admin secret (`kvstore-admin-token` metadata: a slot-move
    step, a write to the metadata group) and did not carry it; nothing was done."""

    code = grpc.StatusCode.PERMISSION_DENIED
    kind = "permission_denied"


_BY_KIND[PermissionDenied.kind] = PermissionDenied
