"""The router: a stateless gRPC service with the same `KV` API, for thin clients.

It runs the smart client's core (one routing implementation, two front doors): each request goes
through its client's `AsyncClient.send`, routed by the ring to its shard, split across shards
where the API allows, and answered with the shard's own response header. It keeps no session state
of its own: a caller's session tokens travel in the request and come back in the response header.
Several routers can run side by side; each refreshes its map when a node answers "wrong shard".
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import errors
from kvstore.client.aio import AsyncClient
from kvstore.client.core import ClientCore, ClientSettings
from kvstore.config import Limits, ServerSettings
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap
from kvstore.server import validation as check
from kvstore.server.batch import ResponseBudget, run_batch
from kvstore.server.health import add_health, serving_servicer
from kvstore.server.rpc import ConcurrencyGate, add_service, rpc_errors

log = logging.getLogger(__name__)


class RouterServicer(pb_grpc.KVServicer):
    """Each method takes an optional `budget`: a batched op's share of the Batch answer limit."""

    def __init__(self, client: AsyncClient, limits: Limits | None = None) -> None:
        self.client = client
        self.limits = limits or Limits()

    @rpc_errors
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext, budget: ResponseBudget | None = None
    ) -> pb.PutResponse:
        return await self.client.send(request)

    @rpc_errors
    async def CompareAndSet(
        self,
        request: pb.CompareAndSetRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.CompareAndSetResponse:
        response = await self.client.send(request)
        if budget is not None and response.HasField("current"):
            budget.charge(len(response.current.key) + len(response.current.value))
        return response

    @rpc_errors
    async def MultiPut(
        self,
        request: pb.MultiPutRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.MultiPutResponse:
        check.check_paired(request.keys, request.values)  # the nodes check everything else
        return await self.client.send(request)

    @rpc_errors
    async def Delete(
        self,
        request: pb.DeleteRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.DeleteResponse:
        return await self.client.send(request)

    @rpc_errors
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext, budget: ResponseBudget | None = None
    ) -> pb.GetResponse:
        if budget is not None:
            budget.admit()
        response = await self.client.send(request)
        if budget is not None and response.found:
            budget.charge(len(response.kv.key) + len(response.kv.value))
        return response

    @rpc_errors
    async def MultiGet(
        self,
        request: pb.MultiGetRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.MultiGetResponse:
        # Read each key once (as the nodes do): the answer names each found key once anyway.
        keys = check.distinct(check.check_keys(request.keys, self.limits))
        if budget is not None:
            budget.admit()
        if len(keys) != len(request.keys):
            request = pb.MultiGetRequest(keys=keys, read=request.read)
        response = await self.client.send(request)
        # Each shard's part is within the answer limit; together they may not be.
        size = sum(map(len, response.keys)) + sum(map(len, response.values))
        if size > self.limits.max_response_bytes:
            raise errors.ResourceExhausted(
                f"the values of these {len(keys)} keys exceed the {self.limits.max_response_bytes}-byte "
                "answer limit (limits.max_response_bytes): ask for fewer keys at a time"
            )
        if budget is not None:
            budget.charge(size)
        return response

    @rpc_errors
    async def Batch(self, request: pb.BatchRequest, context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        return await run_batch(self, request, self.limits)

    @rpc_errors
    async def Scan(self, request: pb.ScanRequest, context: grpc.aio.ServicerContext) -> pb.ScanResponse:
        request.limit = check.check_scan_limit(request.limit, self.limits)
        return await self.client.send(request)


def make_router_client(
    cluster_map: ClusterMap | None, seeds: list[str], limits: Limits | None = None
) -> AsyncClient:
    if cluster_map is not None:
        cluster_map.slots  # noqa: B018 (a map from another key placement stops the router at start)
    # Short attempts: the router must move off a cut-off leader well within one attempt of its
    # caller (a thin client tries each router call for a third of its deadline).
    settings = ClientSettings(timeout=8.0, rpc_timeout=1.0)
    # The nodes' limits: the core checks sizes against them before it sends (the SDK's checks).
    core = ClientCore(
        seeds=seeds, cluster_map=cluster_map, track_session=False, settings=settings, limits=limits
    )
    return AsyncClient(_core=core)


@dataclass
class RunningRouter:
    server: grpc.aio.Server
    client: AsyncClient  # the router's own smart client, to the nodes
    port: int  # the port bound (for a listen address ending in :0)
    health: Any  # grpc_health's HealthServicer


async def start_router(
    listen: str,
    cluster_map: ClusterMap | None,
    seeds: list[str],
    limits: Limits | None = None,
    server_settings: ServerSettings | None = None,
) -> RunningRouter:
    """Start serving. `limits` must be the
    nodes' (the defaults unless a cluster changed them); the router caps its concurrent RPCs at
    `server_settings.max_concurrent_rpcs`, as a node does."""
    limits = limits or Limits()
    server_settings = server_settings or ServerSettings()
    client = make_router_client(cluster_map, seeds, limits)
    server = grpc.aio.server(options=limits.grpc_options())
    gate = ConcurrencyGate(server_settings.max_concurrent_rpcs, server_settings.max_concurrent_ops)
    # A router started from a map knows its cluster: a call naming another is refused, as by a node.
    known_id = cluster_map.cluster_id if cluster_map is not None and cluster_map.cluster_id else None
    add_service(server, RouterServicer(client, limits), "KV", gate, cluster_id=known_id)
    health = await serving_servicer()
    add_health(server, health)  # outside the gate: probes answer under load
    port = server.add_insecure_port(listen)
    await server.start()
    return RunningRouter(server, client, port, health)


async def serve_router(listen: str, cluster_map: ClusterMap | None, seeds: list[str]) -> None:
    router = await start_router(listen, cluster_map, seeds)
    log.info("router serving on %s (port %d)", listen, router.port)
    print(f"router listening on {listen}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.health.enter_graceful_shutdown()
    await router.server.stop(grace=2.0)
    await router.client.close()


def run_router(listen: str, cluster_map: ClusterMap | None, seeds: list[str]) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve_router(listen, cluster_map, seeds))
