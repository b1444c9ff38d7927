"""A kvstore node: one replica of one shard, serving the KV and Admin gRPC services.

The servicers only translate: check the request, make sure this shard owns the keys, ask the
`Shard` for a write or a fresh-enough view, and build the response. Consistency, batching and
Raft live in `kvstore.replication`, reached only through `Shard` (`open_shard`, `write`,
`fresh_view`, `status`, `term`): nothing here touches pysyncobj or LMDB
(tests/unit/test_layering.py). Errors map to statuses in `kvstore.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import grpc

from kvstore import errors
from kvstore.config import NodeConfig
from kvstore.consistency import ConsistencyLevel
from kvstore.ports import ListenError, check_can_listen
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.replication import commands
from kvstore.replication.faults import FaultInjector
from kvstore.replication.shard import Shard, open_shard
from kvstore.replication.views import ReadView, Record, WriteResult
from kvstore.routing.cluster_map import META_SHARD, ClusterMap
from kvstore.routing.ring import slot_of
from kvstore.server import validation as check
from kvstore.server.admin import AdminServicer
from kvstore.server.batch import ResponseBudget, run_batch
from kvstore.server.health import NodeHealth, add_health, start_health_port
from kvstore.server.map_follower import MapFollower, newest_map
from kvstore.server.rpc import ConcurrencyGate, add_service, rpc_errors

log = logging.getLogger(__name__)

PORT_PATIENCE_SECONDS = 3.0  # how long a taken port may take to free up before the node gives up

# The wire's number -> the level: a dict lookup per read (ConsistencyLevel(n) costs ~0.5 us).
_LEVEL_OF = {int(level): level for level in ConsistencyLevel}


def _kv(record: Record) -> pb.KeyValue:
    return pb.KeyValue(key=record.key, value=record.value, revision=record.revision)


class NodeContext:
    """What both servicers share: this node's config, its shard, the cluster map and its health.

    `cluster_map` routes this node's keys; `data_map` is the cluster's map, which `Admin.ClusterMap`
    answers. They are one map on a data node; a metadata-group replica serves the group's keys by
    its one-shard map and answers the data map it follows. Both are replaced, never changed, when
    a newer epoch arrives (`adopt`)."""

    def __init__(
        self,
        config: NodeConfig,
        shard: Shard,
        cluster_map: ClusterMap,
        health: NodeHealth,
        data_map: ClusterMap | None = None,
    ) -> None:
        self.config = config
        self.shard = shard
        self.cluster_map = cluster_map
        self.data_map = data_map or cluster_map
        self.health = health
        self.follower: MapFollower | None = None

    def adopt(self, new: ClusterMap) -> bool:
        """Take `new` (a newer epoch of the cluster's map); False if this node cannot serve by it."""
        if new.cluster_id != self.config.cluster.id:
            raise errors.ClusterMismatch(f"it belongs to cluster {new.cluster_id!r}")
        is_data_node = self.data_map is self.cluster_map
        if is_data_node:
            try:
                new.replica(self.config.name)
            except KeyError:
                log.error(
                    "cluster map epoch %d does not list this node: keeping epoch %d",
                    new.epoch,
                    self.cluster_map.epoch,
                )
                return False
            self.cluster_map = new
        self.data_map = new
        return True

    def saw_epoch(self, epoch: int) -> None:
        if self.follower is not None:
            self.follower.saw_epoch(epoch)

    def header(self, revision: int) -> pb.ResponseHeader:
        return pb.ResponseHeader(
            shard=self.config.shard,
            revision=revision,
            term=self.shard.term,
            epoch=self.cluster_map.epoch,
            served_by=self.config.name,
            leader=self.shard.leader_client_address(),
        )

    def check_owned(self, keys: list[bytes], client_epoch: int) -> None:
        """Refuse keys this shard does not serve now: its own claims on moving slots decide
        (kvstore/replication/slot_claims.py), else the map. `client_epoch`: the map epoch the
        request was routed by (a newer one than ours wakes the follower)."""
        if client_epoch > self.cluster_map.epoch:
            self.saw_epoch(client_epoch)
        if self.shard.claims and self.check_claims(keys):
            return
        if not self.cluster_map.slots.all_on(self.config.shard, keys):
            raise errors.WrongShard(epoch=self.cluster_map.epoch)

    def check_claims(self, keys: list[bytes]) -> bool:
        """True if this shard's claims say it holds all of `keys`; raises if they say it must not
        serve them (moving: `Moving`; moved away: `WrongShard`); False if they do not say."""
        verdict = self.shard.claims.verdict(map(slot_of, keys))
        if verdict.state == "moving":
            raise errors.Moving("these keys' slots are moving between shards: try again shortly")
        if verdict.state == "gone":
            self.saw_epoch(verdict.epoch)
            raise errors.WrongShard(epoch=max(verdict.epoch, self.cluster_map.epoch))
        return verdict.state == "owned"


class KVServicer(pb_grpc.KVServicer):
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.limits = ctx.config.limits
        self.shard = ctx.shard

    async def _write(self, keys: list[bytes], op: commands.Op, request: Any) -> WriteResult:
        """`request`: the RPC's request, for its request_id and retry flag."""
        commands.check_request_id(request.request_id)  # its shape bounds its length too
        self.ctx.check_owned(keys, request.epoch)
        return await self.shard.write(op, commands.request_tag(request.request_id, request.retry))

    async def _fresh(self, read: pb.ReadOptions) -> ReadView:
        check.check_read(read.consistency, read.max_staleness_seconds)
        session_index = read.session.get(self.ctx.config.shard, 0)
        level = _LEVEL_OF[read.consistency]  # a known level: check_read refused any other
        return await self.shard.fresh_view(level, session_index, read.max_staleness_seconds)

    @rpc_errors
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext, budget: ResponseBudget | None = None
    ) -> pb.PutResponse:
        check.check_key(request.key, self.limits)
        check.check_value(request.value, self.limits)
        op = commands.put(request.key, request.value)
        revision, _ = await self._write([request.key], op, request)
        return pb.PutResponse(header=self.ctx.header(revision))

    @rpc_errors
    async def MultiPut(
        self,
        request: pb.MultiPutRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.MultiPutResponse:
        keys, values = check.check_pairs(request.keys, request.values, self.limits)
        check.check_unique(keys)
        op = commands.multi_put(zip(keys, values, strict=True))
        revision, _ = await self._write(keys, op, request)
        return pb.MultiPutResponse(header=self.ctx.header(revision))

    @rpc_errors
    async def Delete(
        self,
        request: pb.DeleteRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.DeleteResponse:
        keys = check.check_keys(request.keys, self.limits)
        check.check_unique(keys)
        revision, deleted = await self._write(keys, commands.delete(keys), request)
        return pb.DeleteResponse(header=self.ctx.header(revision), deleted=deleted)

    @rpc_errors
    async def CompareAndSet(
        self,
        request: pb.CompareAndSetRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.CompareAndSetResponse:
        check.check_key(request.key, self.limits)
        check.check_value(request.value, self.limits)
        op = commands.compare_and_set(request.key, request.value, request.expected_revision)
        revision, (succeeded, current) = await self._write([request.key], op, request)
        response = pb.CompareAndSetResponse(header=self.ctx.header(revision), succeeded=succeeded)
        if current is not None:
            if budget is not None:  # a failed CAS changed nothing: deferring it is safe
                budget.charge(len(current.key) + len(current.value))
            response.current.CopyFrom(_kv(current))
        return response

    @rpc_errors
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext, budget: ResponseBudget | None = None
    ) -> pb.GetResponse:
        check.check_key(request.key, self.limits)
        self.ctx.check_owned([request.key], request.epoch)
        view = await self._fresh(request.read)
        if self.shard.claims:  # claims may have changed while the replica caught up
            self.ctx.check_claims([request.key])
        if budget is not None:
            budget.admit()
        record, applied = view.get(request.key)
        response = pb.GetResponse(header=self.ctx.header(applied), found=record is not None)
        if record is not None:
            if budget is not None:
                budget.charge(len(record.key) + len(record.value))
            response.kv.CopyFrom(_kv(record))
        return response

    @rpc_errors
    async def MultiGet(
        self,
        request: pb.MultiGetRequest,
        context: grpc.aio.ServicerContext,
        budget: ResponseBudget | None = None,
    ) -> pb.MultiGetResponse:
        # A key named twice is read once: the answer lists each found key once anyway.
        keys = check.distinct(check.check_keys(request.keys, self.limits))
        self.ctx.check_owned(keys, request.epoch)
        view = await self._fresh(request.read)
        if self.shard.claims:  # claims may have changed while the replica caught up
            self.ctx.check_claims(keys)
        if budget is not None:
            budget.admit()
        found, values, revisions, applied = view.get_columns(keys, self.limits.max_response_bytes)
        if budget is not None:
            budget.charge(sum(map(len, found)) + sum(map(len, values)))
        return pb.MultiGetResponse(
            header=self.ctx.header(applied), keys=found, values=values, revisions=revisions
        )

    @rpc_errors
    async def Batch(self, request: pb.BatchRequest, context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        return await run_batch(self, request, self.limits)

    @rpc_errors
    async def Scan(self, request: pb.ScanRequest, context: grpc.aio.ServicerContext) -> pb.ScanResponse:
        limit = check.check_scan_limit(request.limit, self.limits)
        view = await self._fresh(request.read)
        # A page ends early at the answer limit (never before its first record): a smaller page
        # with a continuation, rather than a refusal.
        records, more, applied = view.scan(
            request.start,
            request.end,
            request.prefix,
            limit,
            after=request.continuation,
            budget_bytes=self.limits.max_response_bytes,
        )
        continuation = records[-1].key if more and records else b""
        claims = self.shard.claims
        if claims:  # keys moving in, or gone: listed by the shard that answers for them
            records = [r for r in records if claims.holds_for_scan(slot_of(r.key))]
        return pb.ScanResponse(
            header=self.ctx.header(applied), kvs=[_kv(r) for r in records], continuation=continuation
        )


def grpc_options(config: NodeConfig) -> list[tuple[str, int]]:
    """Message limits derived from the request and answer limits (`Limits.max_message_bytes`)."""
    return config.limits.grpc_options()


async def serve(config: NodeConfig) -> None:
    """Run the node until SIGTERM or SIGINT, then shut down gracefully."""
    data_map, cluster_map = starting_maps(config)
    # Every address is checked before the shard opens: a taken port stops the node with one line
    # naming it, before pysyncobj's tick thread starts (kvstore/ports.py). A port is given a
    # moment to free up: the node this one replaces may still be exiting.
    for setting, address in listen_addresses(config):
        check_can_listen(setting, address, patience=PORT_PATIENCE_SECONDS)
    shard = open_shard(config, cluster_map.client_address_of_raft)
    loop = asyncio.get_running_loop()
    try:
        ctx, server, health_server = await _start_servers(config, shard, cluster_map, data_map)
    except BaseException:
        await loop.run_in_executor(None, shard.close)
        raise
    if data_map.meta:
        is_meta = cluster_map is not data_map
        ctx.follower = MapFollower(
            data_map,
            ctx.adopt,
            seed=is_meta,
            cache_dir=None if is_meta else config.data_dir,
            admin_token=admin_secret(config) if is_meta else "",  # the group's own replicas seed it
        )
        ctx.follower.start()
    health = ctx.health
    log.info(
        "node %s (shard %d) serving on %s, raft %s, health %s",
        config.name,
        config.shard,
        config.listen,
        config.raft_advertise,
        config.health_listen or config.listen,
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    faults = shard.fault_injector() if config.server.fault_injection_signals else None
    if faults is not None:
        _install_fault_signals(loop, faults)
    await stop.wait()
    log.info("shutting down")
    if ctx.follower is not None:
        await ctx.follower.stop()
    if faults is not None:
        faults.stall_ticks(False)  # a blocked tick thread would never let shard.close() return
    await health.shutdown()
    if health_server is not None:
        await health_server.stop(grace=1.0)
    await server.stop(grace=2.0)
    await loop.run_in_executor(None, shard.close)  # closes its storage too


def starting_maps(config: NodeConfig) -> tuple[ClusterMap, ClusterMap]:
    """(the cluster's map, the map this node routes its keys by) at start.

    A data node starts from the newer of its map file and the map it last adopted; a replica of
    the metadata group (named in the map's `meta`) serves the group's one-shard map."""
    file_map = ClusterMap.load(config.cluster_map)
    file_map.slots  # noqa: B018 (a map from another key placement must stop the node here, not per request)
    if file_map.is_meta_replica(config.name):
        if config.shard != META_SHARD:
            raise errors.KvError(
                f"{config.name} is a metadata-group replica in {config.cluster_map}: its shard must be "
                f"{META_SHARD}, not {config.shard}"
            )
        return file_map, file_map.meta_map()
    data_map = newest_map(file_map, config.data_dir)
    return data_map, data_map


META_WRITES = frozenset({"Put", "Delete", "MultiPut", "CompareAndSet", "Batch"})
MOVE_STEPS = frozenset({"MoveClaim", "ExportKeys", "ExportChanges", "ImportChanges", "DropMoved"})


def admin_secret(config: NodeConfig) -> str:
    """The cluster's admin secret from `server.admin_secret_file` ("" when none is set)."""
    path = config.server.admin_secret_file
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise errors.KvError(f"server.admin_secret_file {path}: {exc.strerror}") from None


def listen_addresses(config: NodeConfig) -> list[tuple[str, str]]:
    """(setting, address) of every address this node listens on."""
    addresses = [("listen", config.listen), ("raft_bind", config.raft_bind)]
    return addresses + ([("health_listen", config.health_listen)] if config.health_listen else [])


async def _start_servers(
    config: NodeConfig, shard: Shard, cluster_map: ClusterMap, data_map: ClusterMap
) -> tuple[NodeContext, grpc.aio.Server, grpc.aio.Server | None]:
    health = NodeHealth(shard)
    await health.start()
    ctx = NodeContext(config, shard, cluster_map, health, data_map)
    try:
        server, health_server = await _bind_servers(config, ctx)
    except BaseException:
        await health.shutdown()
        raise
    return ctx, server, health_server


async def _bind_servers(
    config: NodeConfig, ctx: NodeContext
) -> tuple[grpc.aio.Server, grpc.aio.Server | None]:
    health = ctx.health
    # No SO_REUSEPORT (grpc sets it by default): a second node given the same port must fail to
    # bind, not share the port and answer for a shard it does not hold.
    server = grpc.aio.server(options=[*grpc_options(config), ("grpc.so_reuseport", 0)])
    gate = ConcurrencyGate(config.server.max_concurrent_rpcs, config.server.max_concurrent_ops)
    cluster_id = config.cluster.id
    secret = admin_secret(config)
    # The metadata group's keys are the cluster's placement: only an admin changes them.
    kv_admin = META_WRITES if ctx.data_map is not ctx.cluster_map else frozenset()
    add_service(
        server,
        KVServicer(ctx),
        "KV",
        gate,
        cluster_id=cluster_id,
        admin_methods=kv_admin,
        admin_secret=secret,
    )
    add_service(
        server,
        AdminServicer(ctx),
        "Admin",
        cluster_id=cluster_id,
        admin_methods=MOVE_STEPS,
        admin_secret=secret,
    )
    add_health(server, health.servicer)
    try:
        server.add_insecure_port(config.listen)
    except RuntimeError:  # taken since check_can_listen (grpc's message says only "Failed to bind")
        check_can_listen("listen", config.listen)
        raise ListenError("listen", config.listen, "grpc could not bind it") from None
    await server.start()
    health_server = None
    if config.health_listen:
        try:
            health_server = await start_health_port(config.health_listen, health.servicer)
        except (OSError, RuntimeError):
            await server.stop(grace=None)
            check_can_listen("health_listen", config.health_listen)
            raise ListenError("health_listen", config.health_listen, "grpc could not bind it") from None
    return server, health_server


def _install_fault_signals(loop: asyncio.AbstractEventLoop, faults: FaultInjector) -> None:
    """server.fault_injection_signals: SIGUSR1 toggles frozen applies, SIGUSR2 a stalled tick thread."""
    log.warning("FAULT INJECTION enabled (server.fault_injection_signals): never in a real deployment")
    loop.add_signal_handler(signal.SIGUSR1, lambda: faults.freeze_applies(not faults.applies_frozen))
    loop.add_signal_handler(signal.SIGUSR2, lambda: faults.stall_ticks(not faults.ticks_stalled))


# glibc's mallopt parameter: allocations at least this large get their own mmap, returned to the
# system when freed.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 << 10


def fix_malloc_threshold() -> bool:
    """Pin glibc's mmap threshold at its 128 KiB default; True if it was set (glibc only).

    glibc raises the threshold each time a large mmapped block is freed (up to 32 MiB), after which
    the Raft messages and batches of a few hundred KiB come from the heap, and freeing them leaves
    holes the heap never gives back. Measured on a follower under sustained puts (1x3, 120 s):
    anonymous memory grew 38 -> 51 MB over a 300 s write run and kept growing; with the threshold
    pinned it stayed flat (35 MB), at no measurable throughput cost. Python's own small objects
    (pymalloc) are not affected."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to pin
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def run(config: NodeConfig) -> None:
    import sys

    import uvloop

    fix_malloc_threshold()

    # The Raft tick thread shares the GIL with the gRPC loop; a short switch interval keeps a busy
    # loop from delaying ticks by the default 5 ms (measured: one busy thread beside a pysyncobj
    # leader cut it from ~2,200 to 28 writes/s; docs/architecture.md, "pysyncobj").
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(config))
