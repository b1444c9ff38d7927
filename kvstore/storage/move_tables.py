"""What a shard keeps for slot moves, in its LMDB environment (written in the same transaction as
the data, copied by snapshots and backups, kept across restarts):

- in `meta`, `slot_claims`: the shard's claims on slot ranges being moved in or out (an opaque blob
  here; `kvstore/replication/slot_claims.py` gives it meaning).
- `changes`: the change log of each move out of this shard: every write to the moving range
  applied since the move began, as its outcome (the value written, or a delete), keyed by
  move id (8 bytes) + revision (8) + position in the entry (4), so a reader replays them in the
  order they applied, and resumes after a revision (positions are this replica's own).
  Recording outcomes, not commands, makes replay plain puts and deletes.

Knows nothing of Raft; every method runs inside the caller's transaction.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import lmdb

_CHANGE_KEY = struct.Struct(">QQI")  # move, revision, position
_MOVE = struct.Struct(">Q")
_CLAIMS = b"slot_claims"
_PUT, _DELETE = b"p", b"d"
_KEY_LENGTH = struct.Struct(">H")


class Change(NamedTuple):
    revision: int
    position: int
    key: bytes
    value: bytes | None  # None: deleted


class MoveTables:
    NAME = b"changes"

    def __init__(self, env: lmdb.Environment, meta: lmdb._Database) -> None:
        self._meta = meta
        self._changes = env.open_db(self.NAME)

    def claims(self, txn: lmdb.Transaction) -> bytes:
        return txn.get(_CLAIMS, b"", db=self._meta)

    def set_claims(self, txn: lmdb.Transaction, blob: bytes) -> None:
        txn.put(_CLAIMS, blob, db=self._meta)

    def record(
        self, txn: lmdb.Transaction, move: int, revision: int, position: int, key: bytes, value: bytes | None
    ) -> None:
        if value is None:
            row = _DELETE + _KEY_LENGTH.pack(len(key)) + key
        else:
            row = _PUT + _KEY_LENGTH.pack(len(key)) + key + value
        txn.put(_CHANGE_KEY.pack(move, revision, position), row, db=self._changes)

    def read(
        self, txn: lmdb.Transaction, move: int, after: int, limit: int, budget_bytes: int
    ) -> list[Change]:
        """Changes of `move` from revisions after `after`, in order: whole revisions only (so a
        reader resumes by revision alone, whatever positions another replica gave them), up to
        `limit` changes and `budget_bytes` of keys and values, past which it stops at the next
        revision boundary (one entry's writes: bounded by the request limits)."""
        found: list[Change] = []
        cursor = txn.cursor(db=self._changes)
        positioned = cursor.set_range(_CHANGE_KEY.pack(move, after + 1, 0))
        used = 0
        while positioned:
            raw_key = cursor.key()
            if len(raw_key) != _CHANGE_KEY.size:
                break
            row_move, revision, position = _CHANGE_KEY.unpack(raw_key)
            if row_move != move:
                break
            if found and revision != found[-1].revision and (len(found) >= limit or used > budget_bytes):
                break  # a revision boundary past the limits: stop here
            row = cursor.value()
            (length,) = _KEY_LENGTH.unpack_from(row, 1)
            key = row[3 : 3 + length]
            value = row[3 + length :] if row[:1] == _PUT else None
            used += len(key) + len(value or b"")
            found.append(Change(revision, position, key, value))
            positioned = cursor.next()
        return found

    def drop(self, txn: lmdb.Transaction, move: int, limit: int) -> int:
        """Delete up to `limit` rows of `move`'s change log; how many were deleted."""
        cursor = txn.cursor(db=self._changes)
        dropped = 0
        if not cursor.set_range(_MOVE.pack(move)):
            return 0
        while (
            dropped < limit and cursor.key()[:8] == _MOVE.pack(move) and len(cursor.key()) == _CHANGE_KEY.size
        ):
            if not cursor.delete():
                break
            dropped += 1
        return dropped


def forget_moves(lmdb_dir: Path) -> None:
    """Drop every claim and change log from the store at `lmdb_dir` (not open elsewhere): a
    restored copy, whose cluster starts counting moves afresh."""
    env = lmdb.open(str(lmdb_dir), max_dbs=16, subdir=True, sync=True)
    try:
        with env.begin(write=True) as txn:
            txn.delete(_CLAIMS, db=env.open_db(b"meta", txn=txn))
            txn.drop(env.open_db(MoveTables.NAME, txn=txn), delete=False)
    finally:
        env.close()
