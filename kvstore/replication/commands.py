"""Replicated commands and how they change storage: deterministic, and never raising.

A Raft entry carries a list of proposals `(request_id, op)`. Each op is a plain tuple (cheap to
pickle, which pysyncobj does for every entry). Applying an entry at log index `i` gives every key it
writes the revision `i`; the proposer never puts two proposals touching the same key into one entry,
so a revision names exactly one version of a key.

An op storage cannot take (a key longer than LMDB's limit, a malformed op) is *refused*: its
payload is `("error", kind, message)`, identical on every replica, and nothing of it is written.
`refusal(payload)` turns that into the typed error (kind: a `kvstore.errors` kind).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lmdb

from kvstore import errors
from kvstore.storage.engine import Record, Storage

PUT = "put"
MULTI_PUT = "mput"
DELETE = "del"
CAS = "cas"
BARRIER = "noop"

Op = tuple[Any, ...]
Proposal = tuple[bytes, Op]  # (request id or b"", op)
Result = tuple[int, Any]  # (revision, payload)

ERROR = "error"


class OpRefused(Exception):
    """An op storage will not apply, the same on every replica (raised before it writes anything)."""


def refused(kind: str, message: str) -> tuple[str, str, str]:
    return (ERROR, kind, message)


def refused_by_storage(exc: BaseException) -> tuple[str, str, str]:
    """The error payload of an op that raised `exc` deterministically while being applied."""
    if isinstance(exc, OpRefused):
        return refused(errors.InvalidArgument.kind, str(exc))
    if isinstance(exc, lmdb.BadValsizeError):
        return refused(errors.InvalidArgument.kind, f"storage refused a key or value size: {exc}")
    if isinstance(exc, lmdb.Error):
        return refused(errors.InvalidArgument.kind, f"storage refused the write: {exc}")
    return refused(errors.KvError.kind, f"applying the write failed: {exc!r}")


def refusal(payload: Any) -> errors.KvError | None:
    """The typed error an op's payload carries, or None for a result."""
    if not (isinstance(payload, tuple) and payload[:1] == (ERROR,)):
        return None
    if len(payload) == 3:
        kind, message = payload[1], payload[2]
        cls = errors.InvalidArgument if kind == errors.InvalidArgument.kind else errors.KvError
        return cls(f"write refused while applying: {message}")
    # ("error", message): written by an older version (kept in the request-id table)
    return errors.KvError(f"write failed while applying: {payload[1] if len(payload) > 1 else ''}")


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


def is_barrier(proposal: Any) -> bool:
    try:
        return bool(proposal[1][0] == BARRIER)
    except (TypeError, IndexError, KeyError):
        return False


def check_proposal(proposal: Any, max_request_id: int) -> tuple[bytes, Op]:
    """(request id, op) of a well-formed proposal; raises OpRefused otherwise."""
    if not (isinstance(proposal, tuple | list) and len(proposal) == 2):
        raise OpRefused("malformed proposal")
    request_id, op = proposal
    if not isinstance(request_id, bytes) or not isinstance(op, tuple | list) or not op:
        raise OpRefused("malformed proposal")
    if len(request_id) > max_request_id:
        raise OpRefused(f"request id is {len(request_id)} bytes; storage accepts up to {max_request_id}")
    return request_id, tuple(op)


def touched_keys(op: Op) -> tuple[bytes, ...]:
    kind = op[0]
    if kind in (PUT, CAS):
        return (op[1],)
    if kind == MULTI_PUT:
        return tuple(k for k, _ in op[1])
    if kind == DELETE:
        return op[1]
    return ()


def _check_keys(keys: tuple[bytes, ...], max_key: int) -> None:
    # Lengths in C; LMDB would refuse these too (BadValsizeError), but not with this message.
    # Wrong types need no check: LMDB raises TypeError for them, refused just the same.
    lengths = list(map(len, keys))
    if lengths and (min(lengths) == 0 or max(lengths) > max_key):
        bad = next(n for n in lengths if not 0 < n <= max_key)
        raise OpRefused(f"key is {bad} bytes; storage accepts 1 to {max_key}")


_ARITY = {PUT: 3, CAS: 4, MULTI_PUT: 2, DELETE: 2, BARRIER: 1}


def apply_op(storage: Storage, revision: int, op: Op) -> Any:
    """Apply one op inside the open write batch; returns the payload for the proposer.

    Raises OpRefused (before writing anything) for an op storage cannot take. Any other
    deterministic failure makes the caller re-apply the batch with a savepoint per op, so nothing
    is ever half-applied."""
    kind = op[0]
    if _ARITY.get(kind) != len(op):
        raise OpRefused(f"malformed or unknown op {kind!r}")
    _check_keys(touched_keys(op), storage.max_key_size)
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
    raise OpRefused(f"unknown op {kind!r}")


def _compare_and_set(
    storage: Storage, revision: int, key: bytes, value: bytes, expected: int
) -> tuple[bool, Record | None]:
    current = storage.get_for_update(key)
    current_revision = current.revision if current else 0
    if current_revision != expected:
        return False, current
    storage.put(key, value, revision)
    return True, None


def proposal_bytes(proposal: Any) -> int:
    try:
        return payload_bytes(proposal[1])
    except Exception:
        return 0


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
