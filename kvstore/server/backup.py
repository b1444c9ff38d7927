"""The server side of `kvstore backup`: Admin.Backup streams a copy of this replica's store.

The copy itself (a read barrier, a pinned LMDB read transaction copied compacted by a background
thread into a pipe) is `Shard.backup_copy` (kvstore/replication/backup_copy.py); here it becomes
messages: a header whose revision is the copy's applied index, data chunks of at most
`chunk_bytes`, and a last message with the copy's size and SHA-256. A stream that fails ends with
the error's status (errors.py), like any RPC; a caller that goes away stops the copy, and so does
one that takes no message for `STALL_SECONDS` (its stream then ends unavailable).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.proto import kvstore_pb2 as pb
from kvstore.server.rpc import abort_for, check_well_formed

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
# Bounded work per byte: no stream of tiny messages; far below the gRPC message limit.
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 10, 4 << 20
STALL_SECONDS = 30.0  # a caller that takes no message for this long loses its copy


def stream_errors(
    method: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """`rpc.rpc_errors` for server-streaming methods: the stream ends with the error's status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            check_well_formed(request)
            async for message in method(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(exc, context, method.__name__)

    return wrapper


async def backup_stream(ctx: Any, request: pb.BackupRequest) -> AsyncIterator[pb.BackupChunk]:
    """`ctx`: the node's `NodeContext` (config, shard, header)."""
    if request.shard != ctx.config.shard:
        raise errors.InvalidArgument(
            f"this node ({ctx.config.name}) holds shard {ctx.config.shard}, not shard {request.shard}"
        )
    chunk_bytes = request.chunk_bytes or DEFAULT_CHUNK_BYTES
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise errors.InvalidArgument(
            f"chunk_bytes {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} "
            f"(0: the default, {DEFAULT_CHUNK_BYTES})"
        )
    shard = ctx.shard
    copy = await shard.backup_copy()
    loop = asyncio.get_running_loop()

    def stalled() -> None:
        # The caller stopped taking messages: the stream may wait for it, the copy may not (its
        # pinned transaction holds old pages and map growth; it takes this replica's only slot).
        log.warning("backup copy of shard %d stopped: no message taken for %gs", shard_id, STALL_SECONDS)
        shard.release_backup_copy(copy)

    shard_id = ctx.config.shard
    watchdog = loop.call_later(STALL_SECONDS, stalled)
    try:
        log.info("backup copy of shard %d at applied index %d started", shard_id, copy.applied_index)
        yield pb.BackupChunk(header=ctx.header(copy.applied_index))
        watchdog.cancel()
        while data := await copy.read_chunk(chunk_bytes):
            watchdog = loop.call_later(STALL_SECONDS, stalled)
            yield pb.BackupChunk(data=data)
            watchdog.cancel()
        sha256 = copy.finish()
        shard.release_backup_copy(copy)  # copied: nothing is pinned any more
        log.info("backup copy of shard %d done: %d bytes", shard_id, copy.size)
        yield pb.BackupChunk(done=True, size=copy.size, sha256=sha256)
    finally:
        watchdog.cancel()
        shard.release_backup_copy(copy)
