"""Convergence after a chaos run: every replica of a shard at the same applied index with the same
data (a digest of eventual scans, so no Raft round trip and no leader needed)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import grpc

from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc


def wait_converged(cluster: LocalCluster, timeout: float = 60.0) -> dict[str, Any]:
    """Every replica of a shard at the same applied index with the same data digest."""
    deadline = time.monotonic() + timeout
    while True:
        per_shard = {}
        for shard in cluster.cluster_map().shards:
            states = {r.name: replica_state(r.address) for r in shard.replicas}
            per_shard[str(shard.id)] = states
        converged = all(
            len({json.dumps(v, sort_keys=True) for v in s.values()}) == 1 for s in per_shard.values()
        )
        if converged or time.monotonic() > deadline:
            return {"converged": converged, "replicas": per_shard}
        time.sleep(0.5)


def replica_state(address: str) -> dict[str, Any]:
    """Applied index and a digest of everything the replica holds (eventual scans: no Raft)."""
    try:
        with grpc.insecure_channel(address) as channel:
            applied = pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=3).applied_index
            digest = hashlib.blake2b(digest_size=12)
            continuation = b""
            stub = pb_grpc.KVStub(channel)
            for _ in range(10_000):
                request = pb.ScanRequest(
                    limit=1000, continuation=continuation, read=pb.ReadOptions(consistency=pb.EVENTUAL)
                )
                page = stub.Scan(request, timeout=5)
                for kv in page.kvs:
                    digest.update(kv.key + b"\0" + kv.value + b"\0" + str(kv.revision).encode())
                if not page.continuation:
                    break
                continuation = page.continuation
        return {"applied_index": applied, "digest": digest.hexdigest()}
    except grpc.RpcError as exc:
        return {"error": exc.code().name}
