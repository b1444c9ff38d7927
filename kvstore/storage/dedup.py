"""Client sessions and write outcomes, for applying each client request at most once.

The tables of the Raft dissertation §6.3, in the shard's LMDB environment (so they are written in
the same transaction as the data they describe, copied by snapshots, and kept across restarts):

- `sessions`:          client id (16 bytes) -> last active (µs) + forgotten-through sequence
- `sessions_by_time`:  last active (µs) + client id -> b""          (oldest first, for expiry)
- `outcomes`:          client id + sequence (+ part tag) -> `Outcome` (a fixed 30-byte struct)
- `outcomes_by_time`:  applied at (µs) + outcome key -> b""         (oldest first, for expiry)
- in `meta`: the dedup clock (the newest leader stamp applied) and when a session was last dropped
  (idle past the retention, or evicted by the session cap), by that clock.

An outcome holds no value and no pickle: a retried write is answered from the revision, the flags
and the counts alone. Every time here is the leader's stamp carried in the Raft entry, never this
replica's clock, so every replica expires the same rows at the same log index.

Knows nothing of Raft: the caller passes the clock and the limits.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import lmdb

_U64 = struct.Struct(">Q")
_SESSION = struct.Struct(">QQ")  # last active (µs), forgotten through (sequence)
_OUTCOME = struct.Struct(">QQBBIQ")  # revision, applied at (µs), kind, error, count, current revision
_CLIENT_BYTES = 16
_CLOCK = b"dedup_clock"
_DROPPED = b"dedup_session_dropped"
# Rows dropped per recorded outcome: more than one, so the tables shrink back after a burst or a
# lowered limit; few, so no single apply does unbounded work.
_EXPIRE_PER_CALL = 4

# Outcome kinds (what the write answered).
DONE = 0  # put, multi-put, delete, or a compare-and-set that succeeded
CAS_FAILED = 1  # compare-and-set refused: `current_revision` is what the key had
FAILED = 2  # the op failed while applying: `error` is its kind


class Outcome(NamedTuple):
    revision: int  # log index that applied (or refused) the write
    kind: int
    count: int = 0  # delete: how many keys existed
    current_revision: int = 0
    error: int = 0
    applied_at: int = 0  # µs, the dedup clock when it applied


class Session(NamedTuple):
    last_active: int  # µs
    forgotten_through: int  # highest sequence whose outcome was dropped (0: none)


class DedupTables:
    """The four tables above; every method runs inside the caller's write transaction."""

    NAMES = (b"sessions", b"sessions_by_time", b"outcomes", b"outcomes_by_time")

    def __init__(self, env: lmdb.Environment, meta: lmdb._Database) -> None:
        self._meta = meta
        self._sessions, self._sessions_by_time, self._outcomes, self._outcomes_by_time = (
            env.open_db(name) for name in self.NAMES
        )

    # ----- the clock -----

    def advance_clock(self, txn: lmdb.Transaction, stamp: int) -> int:
        """The dedup clock after an entry stamped `stamp` (µs): never moves backwards, so a new
        leader whose clock is behind the old one's cannot revive rows already expired."""
        raw = txn.get(_CLOCK, db=self._meta)
        clock = _U64.unpack(raw)[0] if raw else 0
        if stamp > clock:
            txn.put(_CLOCK, _U64.pack(stamp), db=self._meta)
            return stamp
        return clock

    def session_dropped_at(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_DROPPED, db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    # ----- lookups -----

    def outcome(self, txn: lmdb.Transaction, key: bytes) -> Outcome | None:
        raw = txn.get(key, db=self._outcomes)
        if raw is None:
            return None
        revision, applied_at, kind, error, count, current = _OUTCOME.unpack(raw)
        return Outcome(revision, kind, count, current, error, applied_at)

    def session(self, txn: lmdb.Transaction, client: bytes) -> Session | None:
        raw = txn.get(client, db=self._sessions)
        return Session(*_SESSION.unpack(raw)) if raw is not None else None

    # ----- recording and expiry -----

    def record(self, txn: lmdb.Transaction, key: bytes, outcome: Outcome, now: int) -> None:
        """Store `outcome` under `key` (client id + sequence [+ part]) and mark its session active."""
        txn.put(
            key,
            _OUTCOME.pack(
                outcome.revision, now, outcome.kind, outcome.error, outcome.count, outcome.current_revision
            ),
            db=self._outcomes,
        )
        txn.put(_U64.pack(now) + key, b"", db=self._outcomes_by_time)
        client = key[:_CLIENT_BYTES]
        session = self.session(txn, client)
        if session is None:
            self._put_session(txn, client, Session(now, 0))
        elif session.last_active != now:
            txn.delete(_U64.pack(session.last_active) + client, db=self._sessions_by_time)
            self._put_session(txn, client, Session(now, session.forgotten_through))

    def expire(self, txn: lmdb.Transaction, now: int, retention: int, max_sessions: int) -> None:
        """Drop a few of the oldest rows: outcomes and idle sessions older than `retention` (µs),
        then the least recently active sessions beyond `max_sessions`."""
        horizon = now - retention
        cursor = txn.cursor(db=self._outcomes_by_time)
        for _ in range(_EXPIRE_PER_CALL):
            if not cursor.first() or _U64.unpack_from(cursor.key())[0] >= horizon:
                break
            key = cursor.key()[8:]
            txn.delete(key, db=self._outcomes)
            cursor.delete()
            self._forget_through(txn, key)
        sessions = txn.stat(self._sessions)["entries"]
        cursor = txn.cursor(db=self._sessions_by_time)
        dropped = False
        for _ in range(_EXPIRE_PER_CALL):
            if not cursor.first():
                break
            if _U64.unpack_from(cursor.key())[0] >= horizon and sessions <= max_sessions:
                break
            txn.delete(cursor.key()[8:], db=self._sessions)
            cursor.delete()
            sessions -= 1
            dropped = True
        if dropped:
            # For a retention from now, a retry from an unknown session cannot be told from one
            # of the sessions just dropped: it is refused (SessionExpired), never applied again.
            txn.put(_DROPPED, _U64.pack(now), db=self._meta)
        # The outcomes of a dropped session stay until their own expiry: a retry that finds its
        # outcome is still answered from it, and they go within `retention` anyway.

    def counts(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """(sessions, outcomes) held."""
        return txn.stat(self._sessions)["entries"], txn.stat(self._outcomes)["entries"]

    def _forget_through(self, txn: lmdb.Transaction, key: bytes) -> None:
        client, sequence = key[:_CLIENT_BYTES], _U64.unpack_from(key, _CLIENT_BYTES)[0]
        session = self.session(txn, client)
        if session is not None and sequence > session.forgotten_through:
            txn.put(client, _SESSION.pack(session.last_active, sequence), db=self._sessions)

    def _put_session(self, txn: lmdb.Transaction, client: bytes, session: Session) -> None:
        txn.put(client, _SESSION.pack(*session), db=self._sessions)
        txn.put(_U64.pack(session.last_active) + client, b"", db=self._sessions_by_time)
