"""Raft snapshots as LMDB copies, written in a background thread (pysyncobj's fork is off).

pysyncobj compacts its log by calling our `serialize(tmp_path, raft_meta)` on its tick thread and
then renaming `tmp_path` over the dump file. Copying a large LMDB there would stall the tick thread
into elections, so we:
1. pin the state with an LMDB read transaction (cheap, on the tick thread),
2. hard-link the current dump to `tmp_path` so pysyncobj's rename changes nothing yet,
3. copy the pinned state to a side file in a background thread, then rename it over the dump,
4. report SUCCESS through `check()` (pysyncobj's serializeChecker): only then does it drop the log
   entries the snapshot covers.
The very first snapshot (no dump yet to link) is written synchronously: the store is small then.

Snapshot file: MAGIC, storage applied index, raft meta (JSON), then the compacted LMDB file. Files
and transfers of the first format (KVSNAP01, a pickled meta) are still read, with a restricted unpickler.
The same file is streamed to lagging followers, whose `deserialize` installs it. `deserialize` also
runs on every restart (pysyncobj loads the dump first): it replaces the local LMDB only when the
snapshot is ahead of it, so a restart never rolls the store back.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode

from kvstore.replication import safe_pickle
from kvstore.storage.engine import Storage

log = logging.getLogger(__name__)

MAGIC = b"KVSNAP02"  # raft meta as JSON
_PICKLED_META_MAGIC = b"KVSNAP01"  # raft meta as a pickle (read only)
_HEADER = struct.Struct(">8sQQ")  # magic, storage applied index, meta length


class SnapshotManager:
    def __init__(self, storage: Storage, dump_path: Path, on_installed: Callable[[int], None]) -> None:
        self._storage = storage
        self._dump_path = dump_path
        self._on_installed = on_installed
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.snapshots_written = 0
        self.snapshots_installed = 0
        self._last_no_room_log = -1e9
        # Called (tick thread) before an install closes the store: stops online backup copies,
        # whose pinned transactions would not survive it (replication/backup_copy.py).
        self.before_install: Callable[[], None] = lambda: None

    # pysyncobj hooks ------------------------------------------------------------------------

    def serialize(self, tmp_path: str, raft_meta: Any) -> None:
        if not self._room_for_snapshot():
            return  # state stays NOT_SERIALIZING: pysyncobj asks again later, the log is kept
        self._storage.sync()  # the log will be compacted past what this copy holds
        txn = self._storage.begin_snapshot()
        handed_over = False  # once the thread owns `txn`, it ends it
        try:
            applied = self._storage.applied_index_in(txn)
            side_path = Path(str(self._dump_path) + ".writing")
            if not self._dump_path.exists():
                handed_over = True  # _write ends the transaction, whatever happens
                self._write(txn, applied, raft_meta, Path(tmp_path))
                self._set_state(SERIALIZER_STATE.SUCCESS)
                return
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            os.link(self._dump_path, tmp_path)  # pysyncobj's rename of tmp over the dump is a no-op
            self._set_state(SERIALIZER_STATE.SERIALIZING)
            self._thread = threading.Thread(
                target=self._write_in_background,
                args=(txn, applied, raft_meta, side_path),
                name="kvstore-snapshot",
                daemon=True,
            )
            self._thread.start()
            handed_over = True
        except BaseException:
            # A start that fails (os.link, a thread that cannot start) must release the pinned
            # state: a leaked read transaction would hold old pages and block map growth forever.
            if not handed_over:
                self._storage.end_snapshot(txn)
            self._set_state(SERIALIZER_STATE.NOT_SERIALIZING)
            raise

    def _room_for_snapshot(self) -> bool:
        """A snapshot copies the store: not when that copy would eat the disk's reserve."""
        disk = self._storage.disk
        if disk is None:
            return True
        needed = self._storage.snapshot_size_estimate()
        if disk.spare() >= needed:
            return True
        now = time.monotonic()
        if now - self._last_no_room_log > 30.0:
            self._last_no_room_log = now
            log.warning(
                "snapshot postponed: it needs up to %d bytes and only %d are spare above the "
                "free-space watermark on %s",
                needed,
                disk.spare(),
                disk.path,
            )
        return False

    def check(self) -> int:
        """pysyncobj polls this every tick; SUCCESS/FAILED are reported exactly once."""
        with self._lock:
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
            return state

    def deserialize(self, path: str) -> Any:
        with open(path, "rb") as f:
            magic, applied, meta_len = _HEADER.unpack(f.read(_HEADER.size))
            if magic not in (MAGIC, _PICKLED_META_MAGIC):
                raise ValueError(f"{path} is not a kvstore snapshot")
            raft_meta = decode_meta(magic, f.read(meta_len))
            lmdb_len = struct.unpack(">Q", f.read(8))[0]
            if applied > self._storage.applied_index():
                # LMDB may not be closed under a transaction: let our own snapshot copy finish,
                # and stop any backup copy.
                self.wait_idle(300.0)
                self.before_install()
                log.info("installing snapshot at applied index %d from %s", applied, path)
                self._storage.install_snapshot(f, lmdb_len)
                self.snapshots_installed += 1
                self._on_installed(applied)
        return raft_meta

    # internals -------------------------------------------------------------------------------

    def _write_in_background(self, txn: Any, applied: int, raft_meta: Any, side_path: Path) -> None:
        try:
            self._write(txn, applied, raft_meta, side_path)
            os.replace(side_path, self._dump_path)
            self._set_state(SERIALIZER_STATE.SUCCESS)
        except Exception:
            log.exception("snapshot failed")
            self._set_state(SERIALIZER_STATE.FAILED)

    def _write(self, txn: Any, applied: int, raft_meta: Any, path: Path) -> None:
        """Write the snapshot file; ends `txn` in every case, and leaves no partial file."""
        try:
            meta = encode_meta(raft_meta)
            with open(path, "wb") as f:
                f.write(_HEADER.pack(MAGIC, applied, len(meta)))
                f.write(meta)
                length_at = f.tell()
                f.write(b"\0" * 8)
                start = f.tell()
                written, txn = txn, None
                self._storage.write_snapshot(written, f)  # ends the transaction
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(length_at)
                f.write(struct.pack(">Q", end - start))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if txn is not None:
                self._storage.end_snapshot(txn)
            with contextlib.suppress(OSError):
                path.unlink()  # e.g. ENOSPC half-way: give the space back
            raise
        self.snapshots_written += 1

    def _set_state(self, state: int) -> None:
        with self._lock:
            self._state = state

    def wait_idle(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


# Raft meta: what pysyncobj hands its serializer (the last two applied log entries as
# (command bytes, index, term), and the cluster as a set of TCPNode) and expects back on load.


def encode_meta(raft_meta: Any) -> bytes:
    last, before_last, cluster = raft_meta
    entries = [[base64.b64encode(cmd).decode(), idx, term] for cmd, idx, term in (last, before_last)]
    return json.dumps({"entries": entries, "cluster": sorted(node.address for node in cluster)}).encode()


def decode_meta(magic: bytes, blob: bytes) -> Any:
    if magic == _PICKLED_META_MAGIC:
        return _PickledMetaUnpickler(io.BytesIO(blob)).load()
    meta = json.loads(blob)
    last, before_last = (
        (base64.b64decode(cmd, validate=True), int(idx), int(term)) for cmd, idx, term in meta["entries"]
    )
    return last, before_last, {TCPNode(str(address)) for address in meta["cluster"]}


class _PickledMetaUnpickler(safe_pickle.RestrictedUnpickler):
    """KVSNAP01 metas hold pysyncobj TCPNode objects: that class and nothing else besides the defaults."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("pysyncobj.node", "TCPNode"):
            return TCPNode
        return super().find_class(module, name)


# A restore (kvstore restore) seeds every replica of a NEW Raft group with a backup's store. Its
# LMDB applied index N must not face an empty log: pysyncobj would hand the new leader's entries
# 2..N to apply_entry, which skips indexes LMDB already holds, and the replicas would diverge.
# So each replica also gets a snapshot file (the dump pysyncobj loads at its first tick) whose
# log ends at N: the new group's log continues after N. Its entries are no-ops of term 0, the
# term of pysyncobj's own first entry in a new log, so every term the new group elects is above
# them (a higher term here would let a replica missing the new entries win an election).
_NO_OP_COMMAND = b"\x01"  # pysyncobj's _COMMAND_TYPE.NO_OP: nothing for apply_entry


def write_seed_snapshot(path: Path, store_copy: Path, applied: int, members: list[str]) -> None:
    """Write a snapshot file at `path` holding the compacted LMDB file `store_copy` (at applied
    index `applied` >= 2) for a new group of `members` (Raft addresses); synced, then renamed."""
    if applied < 2:
        raise ValueError(f"a seed snapshot needs an applied index of at least 2, not {applied}")
    meta = encode_meta(
        ((_NO_OP_COMMAND, applied, 0), (_NO_OP_COMMAND, applied - 1, 0), {TCPNode(a) for a in members})
    )
    tmp = Path(str(path) + ".seeding")
    size = store_copy.stat().st_size
    with open(tmp, "wb") as out, open(store_copy, "rb") as source:
        out.write(_HEADER.pack(MAGIC, applied, len(meta)))
        out.write(meta)
        out.write(struct.pack(">Q", size))
        copied = 0
        while chunk := source.read(1 << 20):
            out.write(chunk)
            copied += len(chunk)
        if copied != size:
            raise ValueError(f"{store_copy} changed while it was copied ({copied} of {size} bytes)")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
