"""The typed values a `Shard` hands to the server: write results, fresh read views, status.

The server sees a shard replica only through `Shard` and these; it never holds the state machine,
pysyncobj or the LMDB environment. A `ReadView` exists only once `Shard.fresh_view` has made the
replica fresh enough for the read's consistency level, so no read can skip that check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from kvstore import errors
from kvstore.storage.engine import OverBudget, Record, Storage
from kvstore.storage.move_tables import Change

__all__ = ["ReadView", "Record", "ShardStatus", "WriteResult"]


class WriteResult(NamedTuple):
    """A write applied and committed on this replica."""

    revision: int  # the log index that applied it (every key it wrote has this revision)
    # What the op answers: None (put, multi-put), the number of keys that existed (delete), or
    # (succeeded, the key's current record when it did not) for a compare-and-set.
    payload: Any


class ReadView:
    """Read access to this replica's data, as fresh as the read asked (see `Shard.fresh_view`).

    Each call reads one consistent snapshot and returns the applied index it reflects."""

    __slots__ = ("_storage",)

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def get(self, key: bytes) -> tuple[Record | None, int]:
        """The key's record (None if absent) and the applied index of that snapshot."""
        return self._storage.read(key)

    def get_columns(
        self, keys: list[bytes], budget_bytes: int
    ) -> tuple[list[bytes], list[bytes], list[int], int]:
        """Found keys, their values and revisions (parallel lists, request order), applied index.

        Raises ResourceExhausted (having copied at most `budget_bytes`) when the answer would not fit."""
        try:
            return self._storage.get_columns(keys, budget_bytes=budget_bytes)
        except OverBudget:
            raise errors.ResourceExhausted(
                f"the values of these {len(keys)} keys exceed the {budget_bytes}-byte answer limit "
                "(limits.max_response_bytes): ask for fewer keys at a time"
            ) from None

    def scan(
        self, start: bytes, end: bytes, prefix: bytes, limit: int, after: bytes, budget_bytes: int
    ) -> tuple[list[Record], bool, int]:
        """Records in key order, whether more follow, and the applied index (a page ends early at
        `budget_bytes`, never before its first record)."""
        return self._storage.scan(start, end, prefix, limit, after=after, budget_bytes=budget_bytes)

    def slot_keys(
        self, first: int, last: int, after: tuple[int, bytes] | None, limit: int, budget_bytes: int
    ) -> tuple[list[Record], tuple[int, bytes] | None, int]:
        """Records of slots first..last in (slot, key) order after `after` (see Storage.slot_keys)."""
        return self._storage.slot_keys(first, last, after, limit, budget_bytes)

    def changes(self, move: int, after: int, limit: int, budget_bytes: int) -> tuple[list[Change], int]:
        """A move's change log from revisions after `after` (see Storage.changes)."""
        return self._storage.changes(move, after, limit, budget_bytes)


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """This replica's view of its shard (the Admin Status RPC)."""

    role: str  # "leader" | "follower" | "candidate" | "unknown"
    term: int
    leader_raft_address: str  # "" while no leader is known
    leader_address: str  # the leader's client (gRPC) address, "" while unknown
    commit_index: int
    applied_index: int  # as LMDB holds it
    leader_commit_index: int
    staleness_seconds: float  # -1.0 while never proven fresh
    key_count: int
    raft_log_size: int
