"""pysyncobj's Raft journal, made safe on a full disk.

pysyncobj's `FileJournal` writes through an mmap that it grows with ftruncate: the new pages are
holes, and when the disk has no block for one, the write through the mapping kills the process
with SIGBUS (it then restarts into the same crash). This journal keeps pysyncobj's file format
(existing journals stay readable) but reserves every byte with `posix_fallocate` *before* the
mapping covers it: a full disk becomes an ENOSPC that we can wait out (backoff, a health signal,
see `StorageHealth.wait_for_disk`), never a signal. The same holds for the small `.meta` file.

Growth is doubling but at most `_MAX_GROWTH_STEP` at a time, so the free-space watermark
(storage.min_free_bytes) always covers the next step; if even that step does not fit, exactly the
bytes needed are reserved.

Installed through pysyncobj's module-level `createJournal` (called in `SyncObj.__init__`): the
durability work that replaces this journal must keep the property (reserve, then map).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as pysyncobj_syncobj
from pysyncobj.journal import (
    APP_NAME,
    APP_VERSION,
    FIRST_RECORD_OFFSET,
    JOURNAL_FORMAT_VERSION,
    LAST_RECORD_OFFSET_OFFSET,
    NAME_SIZE,
    VERSION_SIZE,
    Journal,
    createJournal,
)
from pysyncobj.pickle import dumps, loads, to_bytes

# (source, doing, attempt): runs `attempt` until it succeeds, waiting out OSErrors.
DiskWaiter = Callable[[str, str, Callable[[], None]], None]

_INITIAL_SIZE = 1 << 20
_MAX_GROWTH_STEP = 4 << 20
_PAGE = mmap.PAGESIZE


def _fail_fast(source: str, doing: str, attempt: Callable[[], None]) -> None:
    attempt()


class _ReservedFile:
    """A file mapped into memory whose every mapped byte is allocated on disk first."""

    def __init__(self, path: str, header: bytes, wait: DiskWaiter) -> None:
        self._wait = wait
        if not os.path.exists(path):
            wait("journal", "creating the raft journal", lambda: _create(path, header))
        self._f = open(path, "r+b")  # noqa: SIM115 (kept open for the mapping's lifetime)
        size = max(os.fstat(self._f.fileno()).st_size, _INITIAL_SIZE)
        # Also fills holes left in a journal written by pysyncobj's own FileJournal.
        self._reserve(0, size)
        self._mm = mmap.mmap(self._f.fileno(), size)

    def _reserve(self, offset: int, length: int) -> None:
        fd = self._f.fileno()
        self._wait("journal", "reserving raft journal space", lambda: os.posix_fallocate(fd, offset, length))

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > self._mm.size():
            self._grow(end)
        self._mm[offset:end] = data

    def _grow(self, needed: int) -> None:
        size = self._mm.size()
        target = max(needed, size + min(size, _MAX_GROWTH_STEP))
        try:
            os.posix_fallocate(self._f.fileno(), size, target - size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            target = -(-needed // _PAGE) * _PAGE  # the full step does not fit: just what is needed
            self._reserve(size, target - size)
        self._mm.resize(target)  # the file already has that size: no hole is mapped

    def read(self, offset: int, size: int) -> bytes:
        return self._mm[offset : offset + size]

    def flush(self) -> None:
        self._mm.flush()

    def close(self) -> None:
        self._mm.flush()
        self._mm.close()
        self._f.close()


def _create(path: str, header: bytes) -> None:
    with open(path, "wb") as f:
        f.write(header)


def _header() -> bytes:
    name = APP_NAME + b"\0" * (NAME_SIZE - len(APP_NAME))
    version = APP_VERSION + b"\0" * (VERSION_SIZE - len(APP_VERSION))
    return name + version + struct.pack("<II", JOURNAL_FORMAT_VERSION, FIRST_RECORD_OFFSET)


class ReservedFileJournal(Journal):
    """pysyncobj's FileJournal (same format and behaviour) on a `_ReservedFile`."""

    def __init__(self, path: str, wait: DiskWaiter = _fail_fast) -> None:
        self._wait = wait
        self._file = _ReservedFile(path, _header(), wait)
        self._meta_path = path + ".meta"
        self._meta: dict[str, Any] = self._load_meta()
        self._meta_saved = True
        self._entries: list[tuple[bytes, int, int]] = []
        offset = FIRST_RECORD_OFFSET
        last = self._last_record_offset()
        while offset < last:
            size = struct.unpack("<I", self._file.read(offset, 4))[0]
            data = self._file.read(offset + 4, size)
            idx, term = struct.unpack("<QQ", data[:16])
            self._entries.append((data[16:], idx, term))
            offset += size + 8
        self._offset = offset

    # --- records ---

    def _last_record_offset(self) -> int:
        return int(struct.unpack("<I", self._file.read(LAST_RECORD_OFFSET_OFFSET, 4))[0])

    def _set_last_record_offset(self, offset: int) -> None:
        self._file.write(LAST_RECORD_OFFSET_OFFSET, struct.pack("<I", offset))

    def add(self, command: Any, idx: int, term: int) -> None:
        data = struct.pack("<QQ", idx, term) + to_bytes(command)
        length = struct.pack("<I", len(data))
        record = length + data + length
        # On disk first (this may wait for space): the in-memory log never runs ahead of the file.
        self._file.write(self._offset, record)
        self._entries.append((command, idx, term))
        self._offset += len(record)
        self._set_last_record_offset(self._offset)

    def clear(self) -> None:
        self._entries = []
        self._set_last_record_offset(FIRST_RECORD_OFFSET)
        self._offset = FIRST_RECORD_OFFSET

    def __getitem__(self, idx: Any) -> Any:
        return self._entries[idx]

    def __len__(self) -> int:
        return len(self._entries)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803 (pysyncobj's API)
        removed = len(self._entries) - entryFrom
        del self._entries[entryFrom:]
        offset = self._offset
        for _ in range(removed):
            offset -= struct.unpack("<I", self._file.read(offset - 4, 4))[0] + 8
        self._offset = offset
        self._set_last_record_offset(offset)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802, N803
        kept = self._entries[entryTo:]
        self.clear()
        for entry in kept:  # rewrites from the start: within space already reserved
            self.add(*entry)

    def _destroy(self) -> None:
        self._file.close()

    def flush(self) -> None:
        self._file.flush()

    # --- meta: commit index, term and vote ---

    def _load_meta(self) -> dict[str, Any]:
        try:
            with open(self._meta_path, "rb") as f:
                meta = loads(f.read())
            return meta if isinstance(meta, dict) else {}
        except Exception:
            return {}

    def _store_meta(self) -> None:
        blob = dumps(self._meta)
        tmp = self._meta_path + ".tmp"

        def attempt() -> None:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
            shutil.move(tmp, self._meta_path)

        self._wait("journal", "writing the raft journal meta file", attempt)
        self._meta_saved = True

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        self._meta["raftCommitIndex"] = raftCommitIndex
        self._meta_saved = False

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return int(self._meta.get("raftCommitIndex", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802, N803
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = votedForNodeId
        # Raft: term and vote are stored before any message reflecting them is sent.
        self._store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return int(self._meta.get("currentTerm", 0))

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self._meta.get("votedForNodeId", None)

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if not self._meta_saved:
            self._store_meta()


# journal path -> how that journal waits for the disk (registered by the state machine before
# SyncObj.__init__ creates the journal).
_waiters: dict[str, DiskWaiter] = {}
_waiters_lock = threading.Lock()


def use_for(path: str, wait: DiskWaiter) -> None:
    """Make pysyncobj create the journal at `path` as a ReservedFileJournal waiting with `wait`."""
    with _waiters_lock:
        _waiters[os.path.abspath(path)] = wait


def _create_journal(journalFile: str | None = None) -> Journal:  # noqa: N803 (pysyncobj's name)
    if journalFile is None:
        return createJournal(None)
    with _waiters_lock:
        wait = _waiters.get(os.path.abspath(journalFile), _fail_fast)
    return ReservedFileJournal(journalFile, wait)


pysyncobj_syncobj.createJournal = _create_journal
