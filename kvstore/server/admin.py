"""The Admin service of a node: its status, the cluster map it follows, online backups, and the
steps of slot moves (kvstore/server/moves.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server import moves
from kvstore.server.backup import backup_stream, stream_errors
from kvstore.server.rpc import rpc_errors

if TYPE_CHECKING:
    from kvstore.server.node import NodeContext


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    @rpc_errors
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        status = self.ctx.shard.status()
        config = self.ctx.config
        leader_name = ""
        for replica in self.ctx.cluster_map.shard(config.shard).replicas:
            if replica.raft_address == status.leader_raft_address:
                leader_name = replica.name
        return pb.StatusResponse(
            node=config.name,
            shard=config.shard,
            role=status.role,
            term=status.term,
            leader=leader_name,
            leader_address=status.leader_address,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            leader_commit_index=status.leader_commit_index,
            staleness_seconds=status.staleness_seconds,
            epoch=self.ctx.data_map.epoch,
            key_count=status.key_count,
            address=self.ctx.cluster_map.replica(config.name)[1].address,
            zone=config.zone,
            raft_log_size=status.raft_log_size,
            health=self.ctx.health.text,
            pid=os.getpid(),
            cluster_id=config.cluster.id,
        )

    @rpc_errors
    async def ClusterMap(
        self, request: pb.ClusterMapRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterMapResponse:
        response = self.ctx.data_map.to_proto()
        response.cluster_id = self.ctx.config.cluster.id  # the node's own, whatever the map file says
        return response

    # The steps of a slot move (kvstore/server/moves.py).

    @rpc_errors
    async def MoveClaim(
        self, request: pb.MoveClaimRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveClaimResponse:
        return await moves.move_claim(self.ctx, request)

    @rpc_errors
    async def ExportKeys(
        self, request: pb.ExportKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportKeysResponse:
        return await moves.export_keys(self.ctx, request)

    @rpc_errors
    async def ExportChanges(
        self, request: pb.ExportChangesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportChangesResponse:
        return await moves.export_changes(self.ctx, request)

    @rpc_errors
    async def ImportChanges(
        self, request: pb.ImportChangesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportChangesResponse:
        return await moves.import_changes(self.ctx, request)

    @rpc_errors
    async def DropMoved(
        self, request: pb.DropMovedRequest, context: grpc.aio.ServicerContext
    ) -> pb.DropMovedResponse:
        return await moves.drop_moved(self.ctx, request)

    @stream_errors
    async def Backup(
        self, request: pb.BackupRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BackupChunk]:
        async for chunk in backup_stream(self.ctx, request):  # kvstore/server/backup.py
            yield chunk
