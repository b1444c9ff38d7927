"""Replicated commands and how they change storage: deterministic, and never raising.

A Raft entry carries a list of proposals `(request_tag, op)`. Each op is a plain tuple (cheap to
pickle, which pysyncobj does for every entry). The request tag names the client request (client
id, sequence, whether it is a retry: `request_tag`), or is b"" for a write not deduplicated.
Applying an entry at log index `i` gives every key it writes the revision `i`; the proposer never
puts two proposals touching the same key into one entry, so a revision names exactly one version
of a key.

An op storage cannot take (a key longer than LMDB's limit, a malformed op) is *refused*: its
payload is a `Refused(kind, message)`, identical on every replica, and nothing of it is written.
The `Shard` raises `Refused.error()` (the typed `kvstore.errors` exception) to the writer.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import lmdb

from kvstore import errors
from kvstore.storage.dedup import CAS_FAILED, DONE, FAILED, Outcome
from kvstore.storage.engine import Record, Storage

PUT = "put"
MULTI_PUT = "mput"
DELETE = "del"
CAS = "cas"
BARRIER = "noop"
# Slot moves (kvstore/replication/slot_moves.py applies them): a claim on a slot range, a batch of
# imported changes, a bounded drop of what moved away.
CLAIM = "claim"
IMPORT = "import"
DROP_MOVED = "dropmoved"
MOVE_OPS = (CLAIM, IMPORT, DROP_MOVED)

Op = tuple[Any, ...]
Proposal = tuple[bytes, Op]  # (request tag or b"", op)
Result = tuple[int, Any]  # (revision, payload: None, a count, a CAS answer, or a Refused)


class OpRefused(Exception):
    """An op storage will not apply, the same on every replica (raised before it writes anything)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The payload of an op refused while applying (nothing of it written), the same on every
    replica. Travels only in-process, from the tick thread to the loop; never replicated."""

    kind: str  # a `kvstore.errors` kind: InvalidArgument, SessionExpired, Moving, WrongShard, KvError
    message: str
    epoch: int = 0  # WrongShard: the map epoch from which another shard owns the key

    def error(self) -> errors.KvError:
        """The typed error the writer gets."""
        if self.kind == errors.SessionExpired.kind:
            return errors.SessionExpired(self.message)
        if self.kind == errors.Moving.kind:
            return errors.Moving(self.message)
        if self.kind == errors.WrongShard.kind:
            return errors.WrongShard(epoch=self.epoch)
        cls = errors.InvalidArgument if self.kind == errors.InvalidArgument.kind else errors.KvError
        return cls(f"write refused while applying: {self.message}")


def refused_by_storage(exc: BaseException) -> Refused:
    """The payload of an op that raised `exc` deterministically while being applied."""
    if isinstance(exc, OpRefused):
        return Refused(errors.InvalidArgument.kind, str(exc))
    if isinstance(exc, lmdb.BadValsizeError):
        return Refused(errors.InvalidArgument.kind, f"storage refused a key or value size: {exc}")
    if isinstance(exc, lmdb.Error):
        return Refused(errors.InvalidArgument.kind, f"storage refused the write: {exc}")
    return Refused(errors.KvError.kind, f"applying the write failed: {exc!r}")


def put(key: bytes, value: bytes) -> Op:
    return (PUT, key, value)


def multi_put(items: Iterable[tuple[bytes, bytes]]) -> Op:
    return (MULTI_PUT, tuple(items))


def delete(keys: Iterable[bytes]) -> Op:
    return (DELETE, tuple(keys))


def compare_and_set(key: bytes, value: bytes, expected_revision: int) -> Op:
    return (CAS, key, value, expected_revision)


def claim(move: int, ranges: Iterable[tuple[int, int]], side: str, phase: str, epoch: int = 0) -> Op:
    """`ranges`: the move's (first, last) slot ranges, sorted and apart."""
    return (CLAIM, move, tuple((int(a), int(b)) for a, b in ranges), side, phase, epoch)


def import_changes(move: int, changes: Iterable[tuple[bytes, bytes | None]], through: int) -> Op:
    """Changes (key, value; None: delete) of `move`, in the order they applied at the source,
    which has applied all of its changes through revision `through` once these are."""
    return (IMPORT, move, tuple(changes), through)


def drop_moved(move: int, limit: int) -> Op:
    return (DROP_MOVED, move, limit)


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


_first = operator.itemgetter(0)


def touched_keys(op: Op) -> Iterable[bytes]:
    """The keys an op writes (an iterator over a multi-put's pairs: nothing copied)."""
    kind = op[0]
    if kind in (PUT, CAS):
        return (op[1],)
    if kind == MULTI_PUT:
        return map(_first, op[1])
    if kind == DELETE:
        return op[1]
    if kind == IMPORT:
        return map(_first, op[2])
    return ()


def _check_keys(keys: Iterable[bytes], max_key: int) -> None:
    # Lengths in C (map, min, max: ~3 us for 100 keys, a third of a Python loop); LMDB would refuse
    # these too (BadValsizeError), but not with this message. Wrong types need no check: LMDB
    # raises TypeError for them, refused just the same.
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
        return sum(1 for key in op[1] if storage.delete(key, revision))
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
        return sum(map(len, itertools.chain.from_iterable(op[1])))  # in C: no per-pair frame
    if kind == DELETE:
        return sum(map(len, op[1]))
    if kind == IMPORT:
        return sum(len(k) + len(v or b"") for k, v in op[2])
    return 0


# ----- request ids and tags -------------------------------------------------------------------

CLIENT_ID_BYTES = 16
_SEQUENCE_BYTES = 8
PART_BYTES = 8  # optional: which part of a write split across shards
REQUEST_ID_BYTES = (CLIENT_ID_BYTES + _SEQUENCE_BYTES, CLIENT_ID_BYTES + _SEQUENCE_BYTES + PART_BYTES)


class Request(NamedTuple):
    key: bytes  # the outcome's key: client id + sequence (+ part)
    client: bytes
    sequence: int
    retry: bool  # an earlier attempt may have applied


def check_request_id(request_id: bytes) -> None:
    """Empty (no de-duplication) or client id (16 bytes) + sequence (8) [+ part (8)]."""
    if request_id and len(request_id) not in REQUEST_ID_BYTES:
        raise errors.InvalidArgument(
            f"request_id must be empty or a 16-byte client id and an 8-byte sequence number "
            f"(optionally + 8 bytes naming a part): got {len(request_id)} bytes"
        )


def request_tag(request_id: bytes, retry: bool) -> bytes:
    """What a proposal carries for a (checked) request id."""
    return request_id + (b"\x01" if retry else b"\x00") if request_id else b""


def is_request_tag(tag: Any) -> bool:
    return isinstance(tag, bytes) and len(tag) - 1 in REQUEST_ID_BYTES


def parse_tag(tag: bytes) -> Request:
    key = tag[:-1]
    sequence = int.from_bytes(key[CLIENT_ID_BYTES : CLIENT_ID_BYTES + _SEQUENCE_BYTES], "big")
    return Request(key, key[:CLIENT_ID_BYTES], sequence, tag[-1:] == b"\x01")


# ----- outcomes: what a retried write is answered with -------------------------------------------

# Error kinds a failed op's outcome can record, by their stored code (1-based).
_ERROR_KINDS = (errors.KvError.kind, errors.InvalidArgument.kind)


def outcome_of(revision: int, op: Op, payload: Any) -> Outcome:
    """The fixed-size outcome of an applied op: no value, no pickle."""
    if isinstance(payload, Refused):
        code = _ERROR_KINDS.index(payload.kind) + 1 if payload.kind in _ERROR_KINDS else 1
        return Outcome(revision, FAILED, error=code)
    kind = op[0]
    if kind == DELETE:
        return Outcome(revision, DONE, count=int(payload))
    if kind == CAS and not payload[0]:
        current = payload[1]
        return Outcome(revision, CAS_FAILED, current_revision=current.revision if current else 0)
    return Outcome(revision, DONE)


def payload_of(storage: Storage, op: Op, outcome: Outcome) -> Any:
    """The payload a retry is answered with, rebuilt from the outcome (inside the write batch)."""
    if outcome.kind == FAILED:
        kind = _ERROR_KINDS[outcome.error - 1] if 0 < outcome.error <= len(_ERROR_KINDS) else "internal"
        return Refused(kind, f"this request already failed when applied at revision {outcome.revision}")
    kind = op[0]
    if kind == DELETE:
        return outcome.count
    if kind == CAS:
        # The first answer held the key's record then; the record now is what a caller can act on.
        return (False, storage.get_for_update(op[1])) if outcome.kind == CAS_FAILED else (True, None)
    return None
