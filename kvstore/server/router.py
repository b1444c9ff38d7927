"""The router: a stateless gRPC service with the same `KV` API, for thin clients.

It runs the smart client's core (one routing implementation, two front doors): each request is
routed by the ring to its shard, split across shards where the API allows, and answered with the
shard's own response header. It keeps no session state of its own: a caller's session tokens travel
in the request and come back in the response header. Several routers can run side by side; each
refreshes its map when a node answers "wrong shard".
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from kvstore.client.aio import AsyncClient
from kvstore.client.core import ClientCore, ClientSettings, ReadConsistency, combine_multi_get
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap
from kvstore.server import validation as check
from kvstore.server.health import add_health, serving_servicer
from kvstore.server.status import add_service, rpc_errors, run_batch

log = logging.getLogger(__name__)


def _consistency(read: pb.ReadOptions) -> ReadConsistency:
    return ReadConsistency(read.consistency, read.max_staleness_seconds)


class RouterServicer(pb_grpc.KVServicer):
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.core = client.core

    @rpc_errors
    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        return await self.client._run(self.core.write([request.key], "Put", request))

    @rpc_errors
    async def CompareAndSet(
        self, request: pb.CompareAndSetRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareAndSetResponse:
        return await self.client._run(self.core.write([request.key], "CompareAndSet", request))

    @rpc_errors
    async def MultiPut(
        self, request: pb.MultiPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.MultiPutResponse:
        check.check_paired(request.keys, request.values)  # the nodes check everything else
        items = list(zip(request.keys, request.values, strict=True))
        plan = self.core.multi_put(
            items, atomic=not request.non_atomic, request_id=request.request_id, retry=request.retry
        )
        return await self.client._run(plan)

    @rpc_errors
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        plan = self.core.delete(
            list(request.keys),
            atomic=not request.non_atomic,
            request_id=request.request_id,
            retry=request.retry,
        )
        return await self.client._run(plan)

    @rpc_errors
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:
        plan = self.core.get(request.key, _consistency(request.read), dict(request.read.session))
        return await self.client._run(plan)

    @rpc_errors
    async def MultiGet(
        self, request: pb.MultiGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.MultiGetResponse:
        keys = list(request.keys)
        plan = self.core.multi_get(keys, _consistency(request.read), dict(request.read.session))
        return combine_multi_get(keys, await self.client._run(plan))

    @rpc_errors
    async def Batch(self, request: pb.BatchRequest, context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        return await run_batch(self, request)

    @rpc_errors
    async def Scan(self, request: pb.ScanRequest, context: grpc.aio.ServicerContext) -> pb.ScanResponse:
        plan = self.core.scan(
            start=request.start,
            end=request.end,
            prefix=request.prefix,
            limit=request.limit or 1000,
            continuation=request.continuation,
            consistency=_consistency(request.read),
            session=dict(request.read.session),
        )
        return await self.client._run(plan)


def make_router_client(cluster_map: ClusterMap | None, seeds: list[str]) -> AsyncClient:
    if cluster_map is not None:
        cluster_map.ring  # noqa: B018 (a map from another key placement stops the router at start)
    # Short attempts: the router must move off a cut-off leader well within one attempt of its
    # caller (a thin client tries each router call for a third of its deadline).
    settings = ClientSettings(timeout=8.0, rpc_timeout=1.0)
    core = ClientCore(seeds=seeds, cluster_map=cluster_map, track_session=False, settings=settings)
    return AsyncClient(_core=core)


async def serve_router(listen: str, cluster_map: ClusterMap | None, seeds: list[str]) -> None:
    client = make_router_client(cluster_map, seeds)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    add_service(server, RouterServicer(client), "KV")
    health = await serving_servicer()
    add_health(server, health)
    port = server.add_insecure_port(listen)
    await server.start()
    log.info("router serving on %s (port %d)", listen, port)
    print(f"router listening on {listen}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await client.close()


def run_router(listen: str, cluster_map: ClusterMap | None, seeds: list[str]) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve_router(listen, cluster_map, seeds))
