"""The SDK's result types, and the conversion of the core's protobuf answers into them (both front
doors use these)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvstore.proto import kvstore_pb2 as pb


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


__all__ = ["CasResult", "Item", "ScanPage"]
