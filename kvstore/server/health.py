"""The standard grpc.health.v1 service (grpcio-health-checking) for nodes and routers.

A node reports, for the overall service "" and for "kvstore.v2.KV", SERVING only while its replica
is not stuck (the Raft tick thread ticks, applies move when there are entries to apply) and its
storage takes writes (`Shard.health()`). "liveness" leaves storage out: a full disk makes a node
unready, but restarting it cannot help, so a liveness probe must not restart it for that.

The status is re-evaluated every `interval` seconds by a task on the event loop, so a probe reads a
stored answer. It is served on the node's main port and, when `health_listen` is set, on a
plaintext port of its own that serves nothing else: kubelet's gRPC probe cannot present a client
certificate, and the port reveals only SERVING or NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.proto import kvstore_pb2 as pb

log = logging.getLogger(__name__)

KV_SERVICE = pb.DESCRIPTOR.services_by_name["KV"].full_name  # "kvstore.v2.KV"
LIVENESS_SERVICE = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class NodeHealth:
    """Keeps a HealthServicer in step with `shard.health()`; `text` is what `cluster status` shows."""

    def __init__(self, shard: Any, interval: float = 0.5) -> None:
        self._shard = shard
        self._interval = interval
        self.servicer = health.aio.HealthServicer()
        self.serving = False
        self.reason = "starting"
        self._task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "serving" if self.serving else f"not_serving: {self.reason}"

    async def start(self) -> None:
        """Report NOT_SERVING before any server starts (the servicer's default for "" is SERVING)."""
        for service in ("", KV_SERVICE, LIVENESS_SERVICE):
            await self.servicer.set(service, NOT_SERVING)
        await self.update()
        self._task = asyncio.create_task(self._run())

    async def update(self) -> None:
        try:
            stuck = self._shard.stuck()
            serving, reason = self._shard.health()
        except Exception as exc:  # a health check that cannot tell must not say SERVING
            log.exception("health check failed")
            stuck = f"health check failed: {exc!r}"
            serving, reason = False, stuck
        if serving != self.serving:
            if serving:
                log.info("health: SERVING")
            else:
                log.warning("health: NOT_SERVING (%s)", reason)
        self.serving, self.reason = serving, reason
        status = SERVING if serving else NOT_SERVING
        for service in ("", KV_SERVICE):
            await self.servicer.set(service, status)
        await self.servicer.set(LIVENESS_SERVICE, NOT_SERVING if stuck else SERVING)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.update()

    async def shutdown(self) -> None:
        """NOT_SERVING for good: a stopping node must drop out of load balancing first."""
        if self._task is not None:
            self._task.cancel()
        self.serving, self.reason = False, "shutting down"
        await self.servicer.enter_graceful_shutdown()


async def serving_servicer() -> health.aio.HealthServicer:
    """For the router: SERVING while the process runs (it holds no state that can get stuck)."""
    servicer = health.aio.HealthServicer()
    for service in ("", KV_SERVICE, LIVENESS_SERVICE):
        await servicer.set(service, SERVING)
    return servicer


def add_health(server: grpc.aio.Server, servicer: health.aio.HealthServicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


async def start_health_port(listen: str, servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """A plaintext server with grpc.health.v1 only, sized for probes (small messages, few calls)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)], maximum_concurrent_rpcs=32)
    add_health(server, servicer)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on health address {listen}")
    await server.start()
    return server


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """One Health.Check against `address`: "SERVING", "NOT_SERVING", ... (raises grpc.RpcError)."""
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
