"""What the two front doors share besides the core: result types and protobuf -> Python conversion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.client.core import ClientCore, ClientSettings, Consistency, ReadConsistency, ReadPolicy
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.cluster_map import ClusterMap


@dataclass(frozen=True)
class Item:
    key: bytes
    value: bytes
    revision: int


@dataclass(frozen=True)
class CasResult:
    succeeded: bool
    revision: int  # the write's revision if it succeeded
    current: Item | None  # on failure: what the key holds now (None: absent)


@dataclass(frozen=True)
class ScanPage:
    items: list[Item]
    continuation: bytes  # b"" when there is nothing more

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def make_core(
    endpoints: list[str] | str | None,
    router: str | None,
    cluster_map: ClusterMap | None,
    consistency: ReadConsistency,
    read_policy: ReadPolicy,
    session: str | None,
    timeout: float,
    zone: str,
) -> ClientCore:
    seeds = [endpoints] if isinstance(endpoints, str) else list(endpoints or [])
    return ClientCore(
        seeds=seeds,
        cluster_map=cluster_map,
        router=router,
        consistency=consistency,
        read_policy=read_policy,
        session=session,
        # An attempt that gets no answer moves on to another replica well before the deadline
        # (a cut-off old leader accepts writes it can never commit).
        settings=ClientSettings(timeout=timeout, rpc_timeout=min(5.0, max(0.5, timeout / 3)), zone=zone),
    )


def core_from_cluster(directory: str | Path, options: dict[str, Any]) -> ClientCore:
    """The core of `Client.from_cluster` / `AsyncClient.from_cluster`: the map read from disk.
    Pops the core's options from `options`, leaving the front door's own."""
    return make_core(
        None,
        None,
        load_cluster_map(directory),
        options.pop("consistency", Consistency.STRONG),
        options.pop("read_policy", ReadPolicy.LEADER),
        options.pop("session", None),
        options.pop("timeout", 10.0),
        options.pop("zone", ""),
    )


def load_cluster_map(directory: str | Path) -> ClusterMap:
    path = Path(directory) / "cluster.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no cluster map at {path}: start one with `kvstore cluster up --dir {directory}`"
        )
    return ClusterMap.load(path)


def item(kv: pb.KeyValue) -> Item:
    return Item(kv.key, kv.value, kv.revision)


def get_result(response: pb.GetResponse) -> bytes | None:
    return response.kv.value if response.found else None


def get_item_result(response: pb.GetResponse) -> Item | None:
    return item(response.kv) if response.found else None


def cas_result(response: pb.CompareAndSetResponse) -> CasResult:
    current = item(response.current) if response.current.revision else None
    return CasResult(response.succeeded, response.header.revision if response.succeeded else 0, current)


def multi_get_result(keys: list[bytes], responses: list[pb.MultiGetResponse]) -> dict[bytes, bytes]:
    """The found keys, in request order (one shard's node answers in request order already)."""
    if len(responses) == 1:
        return dict(zip(responses[0].keys, responses[0].values, strict=True))
    found: dict[bytes, bytes] = {}
    for response in responses:
        found.update(zip(response.keys, response.values, strict=True))
    return {k: found[k] for k in keys if k in found}


def scan_result(response: pb.ScanResponse) -> ScanPage:
    return ScanPage([item(kv) for kv in response.kvs], response.continuation)


def revisions(response: Any) -> dict[int, int]:
    header = response.header
    return dict(header.revisions) or {header.shard: header.revision}


def as_items(items: Mapping[bytes, bytes] | list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return list(items.items()) if isinstance(items, Mapping) else list(items)


__all__ = ["CasResult", "Consistency", "Item", "ReadPolicy", "ScanPage"]
