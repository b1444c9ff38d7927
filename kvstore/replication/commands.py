"""Replicated commands and how they change storage: deterministic, and never raising.

A Raft entry carries a list of proposals `(request_id, op)`. Each op is a plain tuple (cheap to
pickle, which pysyncobj does for every entry). Applying an entry at log index `i` gives every key it
writes the revision `i`; the proposer never puts two proposals touching the same key into one entry,
so a revision names exactly one version of a key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvstore.storage.engine import Record, Storage

PUT = "put"
MULTI_PUT = "mput"
DELETE = "del"
CAS = "cas"
BARRIER = "noop"

Op = tuple[Any, ...]
Proposal = tuple[bytes, Op]  # (request id or b"", op)
Result = tuple[int, Any]  # (revision, payload)


def put(key: bytes, value: bytes) -> Op:
    return (PUT, key, value)


def multi_put(items: Iterable[tuple[bytes, bytes]]) -> Op:
    return (MULTI_PUT, tuple(items))


def delete(keys: Iterable[bytes]) -> Op:
    return (DELETE, tuple(keys))


def compare_and_set(key: bytes, value: bytes, expected_revision: int) -> Op:
    return (CAS, key, value, expected_revision)


def barrier() -> Op:
    return (BARRIER,)


def touched_keys(op: Op) -> tuple[bytes, ...]:
    kind = op[0]
    if kind in (PUT, CAS):
        return (op[1],)
    if kind == MULTI_PUT:
        return tuple(k for k, _ in op[1])
    if kind == DELETE:
        return op[1]
    return ()


def apply_op(storage: Storage, revision: int, op: Op) -> Any:
    """Apply one op inside the open write batch; returns the payload for the proposer."""
    kind = op[0]
    if kind == PUT:
        storage.put(op[1], op[2], revision)
        return None
    if kind == MULTI_PUT:
        storage.put_many(op[1], revision)
        return None
    if kind == DELETE:
        return sum(1 for key in op[1] if storage.delete(key))
    if kind == CAS:
        return _compare_and_set(storage, revision, op[1], op[2], op[3])
    if kind == BARRIER:
        return None
    return ("error", f"unknown op {kind!r}")


def _compare_and_set(
    storage: Storage, revision: int, key: bytes, value: bytes, expected: int
) -> tuple[bool, Record | None]:
    current = storage.get_for_update(key)
    current_revision = current.revision if current else 0
    if current_revision != expected:
        return False, current
    storage.put(key, value, revision)
    return True, None


def payload_bytes(op: Op) -> int:
    """Bytes of keys and values an op carries (what it costs to keep in the Raft log)."""
    kind = op[0]
    if kind in (PUT, CAS):
        return len(op[1]) + len(op[2])
    if kind == MULTI_PUT:
        return sum(len(k) + len(v) for k, v in op[1])
    if kind == DELETE:
        return sum(len(k) for k in op[1])
    return 0
