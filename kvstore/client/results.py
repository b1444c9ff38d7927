"""The SDK's result types, and the conversion of the core's protobuf answers into them (both front
doors use these)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from kvstore.proto import kvstore_pb2 as pb

#: What the multi-key writes take: a mapping, or (key, value) pairs with no key twice.
Items: TypeAlias = Mapping[bytes, bytes] | list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Item:
    """A key, its value, and its revision (the shard's Raft log index of the write that set it)."""

    key: bytes
    value: bytes
    revision: int


@dataclass(frozen=True)
class CasResult:
    """What `compare_and_set` did.

    succeeded: True if the value was written.
    revision:  on success, the write's revision; on failure None (never a number that is not one).
    current:   on failure, what the key holds now (its value and revision), None if it does not
               exist; on success None.
    `current_revision` is what to pass as `expected_revision` to try again (0: absent).
    """

    succeeded: bool
    revision: int | None
    current: Item | None

    @property
    def current_revision(self) -> int:
        """The key's revision now: the write's on success; on failure the key's (0: absent)."""
        if self.succeeded:
            assert self.revision is not None
            return self.revision
        return self.current.revision if self.current is not None else 0


@dataclass(frozen=True)
class ScanPage:
    """One page of a scan, in key order; `continuation` (b"" on the last page) asks for the next."""

    items: list[Item]
    continuation: bytes

    def __iter__(self) -> Iterator[Item]:
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
    if response.succeeded:
        return CasResult(True, response.header.revision, None)
    return CasResult(False, None, item(response.current) if response.current.revision else None)


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


__all__ = ["CasResult", "Item", "Items", "ScanPage"]
