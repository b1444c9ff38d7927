"""LMDB storage for one shard replica: values with revisions, the applied index, client sessions.

Knows nothing of Raft. The replication layer calls it in two ways:
- reads, from any thread, each in its own short read transaction;
- writes, from the single apply thread only, through `batch()`: every write of one apply batch
  goes into one LMDB write transaction, committed by `commit()` (group commit). The applied index
  is written in that same transaction, so the data and the index that produced it never disagree
  after a crash.

Layout (named databases in one environment):
- `data`:     key -> revision (8 bytes, big-endian) + value
- `slots`:    slot (2 bytes, big-endian) -> each key of that slot (LMDB duplicates, sorted): the keys
              of a slot range are listed without reading the rest (moving slots, issue 16). Kept in
              the write transaction of the data it indexes; built once when a store of the previous
              release is opened (`meta` b"slot_index" marks it built). Duplicates, not slot + key
              as a key: a key may be as long as LMDB allows (511 bytes), a duplicate may too.
- `meta`:     b"applied" -> applied position: index (8 bytes) + term (8 bytes); stores of the
              previous release hold the index alone (their term reads as 0: unknown)
- `sessions`, `sessions_by_time`, `outcomes`, `outcomes_by_time`: client sessions and the fixed-size
  outcomes of their writes, for applying each request at most once (see `kvstore.storage.dedup`)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import shutil
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import lmdb

from kvstore.routing.ring import SLOT_COUNT, slot_of, slots_of
from kvstore.storage.copies import data_digest
from kvstore.storage.dedup import DedupTables, Outcome, Session
from kvstore.storage.disk import DiskSpace, fsync_directory
from kvstore.storage.move_tables import Change, MoveTables

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_POSITION = struct.Struct(">QQ")
_APPLIED = b"applied"
_SLOT = struct.Struct(">H")
_SLOT_INDEX_BUILT = b"slot_index"
_INDEX_BUILD_CHUNK = 50_000  # keys indexed per putmulti while building the index of an old store
# Grow the map when a write transaction could find it more than half full.
_GROW_AT_FRACTION = 0.5
# Commit early inside a large apply batch so one batch can never outgrow the map.
_MAX_TXN_BYTES = 64 << 20
# Writes are refused (see `write_refusal`) once the map is this full and may not grow further.
_REFUSE_AT_MAP_FRACTION = 0.9


class OverBudget(Exception):
    """A read's answer would exceed the byte budget its caller gave (`get_columns`)."""


class Record(NamedTuple):
    # A NamedTuple, not a frozen dataclass: built once per key read, and ~3x cheaper to create.
    key: bytes
    value: bytes
    revision: int


def _pack(revision: int, value: bytes) -> bytes:
    return _U64.pack(revision) + value


def _unpack(key: bytes, raw: bytes) -> Record:
    return Record(key, bytes(raw[8:]), _U64.unpack_from(raw)[0])


class Storage:
    """One LMDB environment under `path/lmdb`."""

    def __init__(
        self,
        path: str | Path,
        map_size: int = 256 << 20,
        fsync: bool = True,
        metasync: bool | None = None,
        max_map_size: int = 16 << 30,
        disk: DiskSpace | None = None,
        rebuild_slot_index: bool = False,
    ) -> None:
        """`rebuild_slot_index`: index every key again, whatever the store says (its data dir was
        of an older format: a release that does not keep the index may have written it since)."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._map_size = min(map_size, max_map_size)
        self._max_map_size = max_map_size
        self._fsync = fsync
        # LMDB's second sync per commit (its meta page). Without it a crash can undo the last
        # committed transaction, never corrupt the store: fine when a durable log replays it.
        self._metasync = fsync if metasync is None else metasync
        self.disk = disk
        # Held by readers for the length of one read, and by the apply thread while it resizes
        # or swaps the environment: LMDB forbids both while any transaction is open.
        self._env_lock = threading.Lock()
        self._txn: lmdb.Transaction | None = None
        self._txn_bytes = 0
        # Slot ranges whose writes are logged for a move out (move, sorted (first, last) ranges),
        # set by the caller from its claims (`set_exporting`); the (revision, position) of the last change.
        self._exporting: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
        self._last_change = (0, 0)
        self._snapshots_running = 0
        live, old = self.path / "lmdb", self.path / "lmdb.old"
        if not live.exists() and old.exists():
            os.replace(old, live)  # crashed between the two renames of install_snapshot
        self._open(live, rebuild_slot_index)

    # ----- lifecycle -----

    def _open(self, env_path: Path, rebuild_slot_index: bool = False) -> None:
        """Open the environment at `env_path`. Called by `__init__`, and by `install_snapshot`
        holding `_env_lock` (so nothing here may take it)."""
        self._env = lmdb.open(
            str(env_path),
            map_size=max(self._map_size, _existing_size(env_path)),
            max_dbs=16,
            sync=self._fsync,
            metasync=self._metasync,
            writemap=False,
            max_readers=256,
        )
        self._max_key_size = int(self._env.max_key_size())
        self._page_size = int(self._env.stat()["psize"])  # fixed per environment; stat() is dear
        self._data = self._env.open_db(b"data")
        self._meta = self._env.open_db(b"meta")
        self._slots = self._env.open_db(b"slots", dupsort=True)
        self._build_slot_index(rebuild_slot_index)
        self._dedup = DedupTables(self._env, self._meta)
        self._moves = MoveTables(self._env, self._meta)
        _drop_pickled_requests(self._env)

    @property
    def max_key_size(self) -> int:
        """The longest key LMDB accepts (511 bytes unless LMDB was built otherwise)."""
        return self._max_key_size

    def check_key_limit(self, max_key_bytes: int) -> None:
        """Refuse a configured key limit the engine cannot honour (checked once, at node start)."""
        if not 0 < max_key_bytes <= self.max_key_size:
            raise ValueError(
                f"limits.max_key_bytes = {max_key_bytes}, but LMDB accepts keys of 1 to "
                f"{self.max_key_size} bytes: set it to at most {self.max_key_size}"
            )

    def close(self) -> None:
        with self._env_lock:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._env.close()

    def _build_slot_index(self, rebuild: bool) -> None:
        """Index every key by slot: once, in a store written before the index existed; again when
        asked (`rebuild`), or when the index does not hold as many keys as the data (a release
        without the index wrote to this store: it may have come in a snapshot or a backup).
        In one write transaction with its mark: a crash part-way leaves no half-built index."""
        with self._env.begin() as txn:
            built = txn.get(_SLOT_INDEX_BUILT, db=self._meta) is not None
            stored, indexed = txn.stat(self._data)["entries"], txn.stat(self._slots)["entries"]
        if built and not rebuild and stored == indexed:
            return
        if built and stored != indexed:
            log.warning(
                "the slot index of %s holds %d keys, the data %d: rebuilding it", self.path, indexed, stored
            )
        used, map_size = self._used_bytes()
        if used >= map_size * _GROW_AT_FRACTION:  # the index adds about the keys' size again
            self.grow(lock_held=True)
        with self._env.begin(write=True) as txn:
            txn.drop(self._slots, delete=False)
            count = 0
            cursor, index = txn.cursor(db=self._data), txn.cursor(db=self._slots)
            keys: list[bytes] = []
            for key in cursor.iternext(keys=True, values=False):
                keys.append(key)
                if len(keys) == _INDEX_BUILD_CHUNK:
                    index.putmulti(_index_rows(keys))
                    count, keys = count + len(keys), []
            index.putmulti(_index_rows(keys))
            txn.put(_SLOT_INDEX_BUILT, b"1", db=self._meta)
        if count := count + len(keys):
            log.info("indexed the %d keys of %s by slot", count, self.path)

    # ----- reads (any thread) -----

    def applied_index(self) -> int:
        return self.applied_position()[0]

    def applied_position(self) -> tuple[int, int]:
        """(index, term) of the last applied entry as committed; term 0 when not known (nothing
        applied yet, or written by a version that stored the index alone)."""
        with self._env_lock, self._env.begin(db=self._meta) as txn:
            raw = txn.get(_APPLIED)
        return _position(raw)

    def get(self, key: bytes) -> Record | None:
        with self._env_lock, self._env.begin(db=self._data) as txn:
            raw = txn.get(key)
            return _unpack(key, raw) if raw is not None else None

    def get_columns(
        self, keys: list[bytes], budget_bytes: int = sys.maxsize
    ) -> tuple[list[bytes], list[bytes], list[int], int]:
        """The found keys, their values and revisions as parallel lists (request order), and the
        applied index of that same snapshot. Lists, not a Record per key: the batched read path.

        Raises `OverBudget` as soon as the found keys and values add up to more than
        `budget_bytes`: an oversized answer is refused having copied at most that much."""
        found: list[bytes] = []
        values: list[bytes] = []
        revisions: list[int] = []
        revision_of = _U64.unpack_from
        size = 0
        with self._env_lock, self._env.begin() as txn:
            applied = txn.get(_APPLIED, db=self._meta)
            get, data = txn.get, self._data
            for key in keys:
                raw = get(key, db=data)
                if raw is not None:
                    size += len(key) + len(raw)
                    if size > budget_bytes:
                        raise OverBudget(f"the values of {len(keys)} keys exceed {budget_bytes} bytes")
                    found.append(key)
                    values.append(raw[8:])
                    revisions.append(revision_of(raw)[0])
        return found, values, revisions, _position(applied)[0]

    def read(self, key: bytes) -> tuple[Record | None, int]:
        """The key's record (None if absent) and the applied index of that same snapshot."""
        found, values, revisions, applied = self.get_columns([key])
        return (Record(key, values[0], revisions[0]) if found else None), applied

    def scan(
        self,
        start: bytes,
        end: bytes,
        prefix: bytes,
        limit: int,
        after: bytes = b"",
        budget_bytes: int = sys.maxsize,
    ) -> tuple[list[Record], bool, int]:
        """Keys in [start, end) with `prefix`, strictly after `after`, at most `limit`, and no more
        keys and values than `budget_bytes` (but always the first record: a page makes progress).

        Returns (records, more, applied index of the snapshot read).
        """
        lower = max(start, prefix, after)
        out: list[Record] = []
        more = False
        size = 0
        with self._env_lock, self._env.begin() as txn:
            applied_raw = txn.get(_APPLIED, db=self._meta)
            cursor = txn.cursor(db=self._data)
            positioned = cursor.set_range(lower) if lower else cursor.first()
            for key, raw in _iterate(cursor, positioned):
                if key == after:
                    continue  # the continuation key itself was returned by the previous page
                # lower >= prefix, so the first key without the prefix is past every prefixed key.
                if (prefix and not key.startswith(prefix)) or (end and key >= end):
                    break
                size += len(key) + len(raw)
                if len(out) == limit or (out and size > budget_bytes):
                    more = True
                    break
                out.append(_unpack(key, raw))
        return out, more, _position(applied_raw)[0]

    def slot_keys(
        self,
        first: int,
        last: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
        budget_bytes: int = 1 << 62,
    ) -> tuple[list[Record], tuple[int, bytes] | None, int]:
        """Records of the keys in slots first..last (inclusive), in (slot, key) order, strictly
        after the position `after`, at most `limit` of them and `budget_bytes` of keys and values
        (at least one). Returns (records, the position to continue from, or None when the range
        is done, applied index of the snapshot read). Reads the index and those keys only: cost
        in proportion to what is listed."""
        if not 0 <= first <= last < SLOT_COUNT or limit < 1:
            raise ValueError(f"slots {first}-{last} (limit {limit}) are not within 0-{SLOT_COUNT - 1}")
        if after is not None and not first <= after[0] <= last:
            raise ValueError(f"continuation slot {after[0]} is not within slots {first}-{last}")
        out: list[Record] = []
        with self._env_lock, self._env.begin() as txn:
            applied = _position(txn.get(_APPLIED, db=self._meta))[0]
            cursor = txn.cursor(db=self._slots)
            if after is None:
                positioned = cursor.set_range(_SLOT.pack(first))
            else:
                slot, key = after
                positioned = cursor.set_range_dup(_SLOT.pack(slot), key)
                if positioned and cursor.value() == key:
                    positioned = cursor.next()
                elif not positioned:  # no key of that slot at or after it: the next slot's
                    positioned = slot + 1 < SLOT_COUNT and cursor.set_range(_SLOT.pack(slot + 1))
            get = txn.get
            last_slot = first
            used = 0
            while positioned:
                slot = _SLOT.unpack(cursor.key())[0]
                if slot > last:
                    break
                if len(out) == limit or (out and used >= budget_bytes):
                    return out, (last_slot, out[-1].key), applied
                key = cursor.value()
                raw = get(key, db=self._data)
                if raw is not None:  # always, while the index is kept with the data
                    out.append(_unpack(key, raw))
                    used += len(key) + len(raw)
                    last_slot = slot
                positioned = cursor.next()
        return out, None, applied

    def slot_key_count(self, first: int, last: int) -> int:
        """How many keys slots first..last hold, counted in the index (a move's progress and ETA)."""
        count = 0
        with self._env_lock, self._env.begin() as txn:
            cursor = txn.cursor(db=self._slots)
            positioned = cursor.set_range(_SLOT.pack(first))
            while positioned and _SLOT.unpack(cursor.key())[0] <= last:
                count += cursor.count()
                positioned = cursor.next_nodup()
        return count

    def key_count(self) -> int:
        with self._env_lock, self._env.begin(db=self._data) as txn:
            return txn.stat(self._data)["entries"]

    def checksum(self) -> str:
        """A digest of every key, value and revision: equal on converged replicas (and on a backup
        of this store and its restore: `kvstore.storage.copies`)."""
        with self._env_lock, self._env.begin(db=self._data) as txn:
            return data_digest(txn.cursor())

    # ----- writes (apply thread only) -----

    def _write_txn(self) -> lmdb.Transaction:
        if self._txn is None:
            self._grow_if_needed()
            self._txn = self._env.begin(write=True)
            self._txn_bytes = 0
        return self._txn

    def put(self, key: bytes, value: bytes, revision: int) -> None:
        txn = self._write_txn()
        if txn.replace(key, _pack(revision, value), db=self._data) is None:  # a new key: index it
            txn.put(_SLOT.pack(slot_of(key)), key, db=self._slots)
        self._txn_bytes += 2 * len(key) + len(value) + 64
        if self._exporting:
            self._log_change(key, value, revision)

    def put_many(self, items: tuple[tuple[bytes, bytes], ...], revision: int) -> None:
        """Every (key, value) at one revision. Only new keys are indexed: an index insert costs as
        much as the data's (~2 us a key, a second B-tree), and most writes overwrite (`replace`
        says which: on 200k preloaded keys, 100 overwrites took 428-441 us with `putmulti` and no
        index, 710 us indexing every key, 450-472 us with a cursor's `replace` indexing the new)."""
        prefix = _U64.pack(revision)
        txn = self._write_txn()
        replace = txn.cursor(db=self._data).replace  # a cursor's: ~10% cheaper than txn.replace
        new = [k for k, v in items if replace(k, prefix + v) is None]
        if new:
            txn.cursor(db=self._slots).putmulti(_index_rows(new))
        self._txn_bytes += sum(map(len, itertools.chain.from_iterable(items))) + 80 * len(items)
        if self._exporting:
            for key, value in items:
                self._log_change(key, value, revision)

    def delete(self, key: bytes, revision: int = 0) -> bool:
        """`revision`: the deleting entry's (the change log of a move out records it)."""
        txn = self._write_txn()
        if not txn.delete(key, db=self._data):
            return False
        txn.delete(_SLOT.pack(slot_of(key)), key, db=self._slots)
        if self._exporting:
            self._log_change(key, None, revision)
        return True

    # ----- slot moves (kvstore/storage/move_tables.py) -----

    def set_exporting(self, moves: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]) -> None:
        """From now on, log every write to these moves' (move, sorted (first, last) slot ranges)."""
        self._exporting = moves

    def _log_change(self, key: bytes, value: bytes | None, revision: int) -> None:
        slot = slot_of(key)
        for move, ranges in self._exporting:
            i = bisect.bisect_right(ranges, (slot, SLOT_COUNT)) - 1
            if i >= 0 and ranges[i][0] <= slot <= ranges[i][1]:
                last_revision, position = self._last_change
                position = position + 1 if last_revision == revision else 0
                self._last_change = (revision, position)
                self._moves.record(self._write_txn(), move, revision, position, key, value)
                self._txn_bytes += 2 * len(key) + len(value or b"") + 64
                return

    def claims_blob(self, in_batch: bool = False) -> bytes:
        """The shard's slot claims as stored (b"": none); `in_batch`: as the open batch has them."""
        if in_batch:
            return self._moves.claims(self._write_txn())
        with self._env_lock, self._env.begin() as txn:
            return self._moves.claims(txn)

    def set_claims_blob(self, blob: bytes) -> None:
        self._moves.set_claims(self._write_txn(), blob)

    def changes(self, move: int, after: int, limit: int, budget_bytes: int) -> tuple[list[Change], int]:
        """(logged changes of `move` from revisions after `after`, whole revisions, in order (see
        `MoveTables.read`), the applied index of the snapshot read)."""
        with self._env_lock, self._env.begin() as txn:
            applied = _position(txn.get(_APPLIED, db=self._meta))[0]
            return self._moves.read(txn, move, after, limit, budget_bytes), applied

    def drop_changes(self, move: int, limit: int) -> int:
        return self._moves.drop(self._write_txn(), move, limit)

    def drop_slot_range(self, first: int, last: int, limit: int) -> int:
        """Delete up to `limit` keys of slots first..last (never logged); how many were deleted."""
        txn = self._write_txn()
        cursor = txn.cursor(db=self._slots)
        positioned = cursor.set_range(_SLOT.pack(first))
        dropped = 0
        while positioned and dropped < limit:
            row = cursor.key()
            if len(row) != _SLOT.size or _SLOT.unpack(row)[0] > last:  # past the end, or the range
                break
            txn.delete(cursor.value(), db=self._data)
            positioned = cursor.delete()  # moves to the next row
            dropped += 1
        self._txn_bytes += 128 * dropped
        return dropped

    def get_for_update(self, key: bytes) -> Record | None:
        """Read inside the open write transaction: sees this batch's own earlier writes."""
        raw = self._write_txn().get(key, db=self._data)
        return _unpack(key, raw) if raw is not None else None

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Writes inside either all join the open batch or, if the block raises, leave no trace.

        An LMDB child transaction (~5 us with the dedup rows, measured): one op refused half-way
        must not leave the keys before it written."""
        parent = self._write_txn()
        child = self._env.begin(write=True, parent=parent)
        self._txn = child
        try:
            yield
        except BaseException:
            self._txn = parent
            child.abort()
            raise
        self._txn = parent
        child.commit()

    def set_applied(self, index: int, term: int = 0) -> None:
        """The position of the last applied entry, in the batch's transaction: the data and the
        position that produced it commit together. The term is opaque here (the caller's log's)."""
        self._write_txn().put(_APPLIED, _POSITION.pack(index, term), db=self._meta)
        if self._txn_bytes > _MAX_TXN_BYTES:
            self.commit()

    # ----- client sessions (apply thread only; see kvstore.storage.dedup) -----

    def advance_dedup_clock(self, stamp: int) -> int:
        """The dedup clock (µs) once an entry stamped `stamp` applies: the newest stamp seen."""
        return self._dedup.advance_clock(self._write_txn(), stamp)

    def recall_outcome(self, key: bytes) -> Outcome | None:
        return self._dedup.outcome(self._write_txn(), key)

    def session(self, client: bytes) -> Session | None:
        return self._dedup.session(self._write_txn(), client)

    def session_dropped_at(self) -> int:
        """The dedup clock (µs) when a session was last dropped (idle, or evicted by the cap)."""
        return self._dedup.session_dropped_at(self._write_txn())

    def remember_outcome(
        self, key: bytes, outcome: Outcome, now: int, retention: int, max_sessions: int
    ) -> None:
        """Record a write's outcome under its request key; drop a few rows past `retention` (µs) or
        beyond `max_sessions` (bounded work per write)."""
        txn = self._write_txn()
        self._dedup.record(txn, key, outcome, now)
        self._dedup.expire(txn, now, retention, max_sessions)
        self._txn_bytes += len(key) + 128

    def dedup_counts(self) -> tuple[int, int]:
        """(sessions, outcomes) as committed."""
        with self._env_lock, self._env.begin() as txn:
            return self._dedup.counts(txn)

    def sync(self) -> None:
        """Every committed transaction on disk, its meta page included (see `metasync`)."""
        self._env.sync(True)

    def commit(self) -> bool:
        """Commit the open write transaction, if any. Returns whether there was one."""
        if self._txn is None:
            return False
        txn, self._txn = self._txn, None
        txn.commit()
        return True

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def _used_bytes(self) -> tuple[int, int]:
        """(bytes of the map in use, map size)."""
        info = self._env.info()  # asked before every write batch and every write: keep it to one call
        return (info["last_pgno"] + 1) * self._page_size, info["map_size"]

    def _grow_if_needed(self) -> None:
        used, map_size = self._used_bytes()
        if used >= map_size * _GROW_AT_FRACTION:
            self.grow()

    def grow(self, lock_held: bool = False) -> bool:
        """Double the map, within `max_map_size` and the disk's free bytes. Returns whether it grew.
        `lock_held`: the caller holds `_env_lock` (or no other thread has the store yet).

        Not while a snapshot holds a transaction (set_mapsize needs every transaction closed): the
        batch is re-applied later and the map grows once the snapshot is done."""
        if self._snapshots_running:
            return False
        used, map_size = self._used_bytes()
        new_size = min(map_size * 2, self._max_map_size)
        if self.disk is not None:
            # The map is only address space (no writemap), but a map larger than the disk can
            # hold promises room that is not there. Bounded by the free bytes, not by the
            # watermark: entries already committed must still apply (only new writes are refused).
            new_size = min(new_size, max(map_size, used + self.disk.sample()[0]))
        if new_size <= map_size:
            return False
        log.info("growing LMDB map from %d to %d bytes", map_size, new_size)
        if lock_held:
            self._env.set_mapsize(new_size)
        else:
            with self._env_lock:
                self._env.set_mapsize(new_size)
        return True

    def write_refusal(self) -> str | None:
        """Why new writes must be refused now (disk below its watermark, map at its cap), or None."""
        if self.disk is not None and (shortfall := self.disk.shortfall()) is not None:
            return shortfall
        with self._env_lock:  # called from the serving thread: the environment may be swapping
            used, _ = self._used_bytes()
        if used >= self._max_map_size * _REFUSE_AT_MAP_FRACTION:
            return (
                f"insufficient storage: the LMDB map holds {used} bytes of its "
                f"{self._max_map_size}-byte cap (storage.max_map_size_bytes)"
            )
        return None

    # ----- snapshots -----

    def begin_snapshot(self) -> lmdb.Transaction:
        """A read transaction pinning the current state, for `write_snapshot` in another thread."""
        self.commit()
        with self._env_lock:  # the count also changes off this thread (`end_snapshot`)
            self._snapshots_running += 1
            return self._env.begin()

    def applied_index_in(self, txn: lmdb.Transaction) -> int:
        return _position(txn.get(_APPLIED, db=self._meta))[0]

    def end_snapshot(self, txn: lmdb.Transaction) -> None:
        """Release a `begin_snapshot` transaction; map growth waits until every one is released."""
        txn.abort()
        with self._env_lock:  # called from copying threads (a snapshot, an online backup)
            self._snapshots_running -= 1

    def write_snapshot(self, txn: lmdb.Transaction, out: BinaryIO) -> None:
        """Copy the state `txn` sees into `out` (a compacted LMDB file), then end `txn`."""
        try:
            out.flush()
            self._env.copyfd(out.fileno(), compact=True, txn=txn)
        finally:
            self.end_snapshot(txn)

    def snapshot_size_estimate(self) -> int:
        """Upper bound of a compacted copy's size: the bytes of the map in use."""
        return self._used_bytes()[0]

    def install_snapshot(self, source: BinaryIO, length: int) -> None:
        """Replace the whole environment by the LMDB file read from `source` (apply thread)."""
        self.abort()
        staging = self.path / "lmdb.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            with open(staging / "data.mdb", "wb") as f:
                _copy_exact(source, f, length)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. ENOSPC: give the space back
            raise
        live, old = self.path / "lmdb", self.path / "lmdb.old"
        shutil.rmtree(old, ignore_errors=True)
        with self._env_lock:  # readers wait only for two renames, not for copying or deleting
            self._env.close()
            os.replace(live, old)
            os.replace(staging, live)
            fsync_directory(self.path)  # a crash now leaves either the old store or the new one
            self._open(live)
        shutil.rmtree(old, ignore_errors=True)


def _position(raw: bytes | None) -> tuple[int, int]:
    if not raw:
        return 0, 0
    if len(raw) == _U64.size:  # the previous release's layout: the index alone
        return _U64.unpack(raw)[0], 0
    index, term = _POSITION.unpack(raw)
    return index, term


def _drop_pickled_requests(env: lmdb.Environment) -> None:
    """Delete the request tables of older versions (pickled results; never read again)."""
    with env.begin(write=True) as txn:
        for name in (b"requests", b"req_by_index"):
            if txn.get(name) is not None:  # named databases are keys of the main database
                txn.drop(env.open_db(name, txn=txn, create=False), delete=True)


def _iterate(cursor: lmdb.Cursor, positioned: bool) -> Iterator[tuple[bytes, bytes]]:
    if not positioned:
        return
    while True:
        yield cursor.key(), cursor.value()
        if not cursor.next():
            return


def _index_rows(keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(map(_SLOT.pack, slots_of(keys)), keys, strict=True))


def _existing_size(env_path: Path) -> int:
    data_file = env_path / "data.mdb"
    return data_file.stat().st_size if data_file.exists() else 0


def _copy_exact(source: BinaryIO, dest: BinaryIO, length: int) -> None:
    remaining = length
    while remaining > 0:
        chunk = source.read(min(remaining, 1 << 20))
        if not chunk:
            raise ValueError(f"snapshot truncated: {remaining} bytes missing")
        dest.write(chunk)
        remaining -= len(chunk)
