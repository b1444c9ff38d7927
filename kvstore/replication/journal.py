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

Durable (`durable=True`, storage.durability = "fsync"): `sync()` puts every record added so far on
stable storage (one `fdatasync` of the file: Linux writes back the pages dirtied through the
mapping), and the term and vote are written to their meta file with fsync + rename + directory
fsync before `setCurrentTerm` returns. The state machine calls `sync()` where Raft needs it: before
a follower acknowledges entries and before the leader counts its own copy toward a commit
(kvstore/replication/state_machine.py). Several records added in one tick share one sync.

Records (format 2) carry a CRC-32 of their bytes. A power cut can leave the header's end offset
ahead of records that never reached the disk (pages are written back in any order): at open, the
first record whose size or checksum does not hold ends the log, and everything from it on is
dropped with a warning (a torn tail: nothing there was ever acknowledged, since an acknowledgement
waits for the sync). Journals of format 1 (pysyncobj's own, and kvstore's before checksums) are
read and rewritten as format 2 at open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as pysyncobj_syncobj
from pysyncobj.journal import (
    APP_NAME,
    APP_VERSION,
    FIRST_RECORD_OFFSET,
    LAST_RECORD_OFFSET_OFFSET,
    NAME_SIZE,
    VERSION_SIZE,
    Journal,
    createJournal,
)
from pysyncobj.pickle import dumps, loads, to_bytes

from kvstore.storage.disk import fsync_directory

# (source, doing, attempt): runs `attempt` until it succeeds, waiting out OSErrors.
DiskWaiter = Callable[[str, str, Callable[[], None]], None]

log = logging.getLogger(__name__)

FORMAT_PLAIN = 1  # pysyncobj's record: size, idx + term + command, size
FORMAT_CHECKSUMMED = 2  # size, CRC-32, idx + term + command, size
_FORMAT_OFFSET = NAME_SIZE + VERSION_SIZE
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

    @property
    def size(self) -> int:
        return self._mm.size()

    def sync(self) -> None:
        """Every byte written so far on stable storage: fdatasync writes back the pages dirtied
        through the mapping too, and releases the GIL while it waits (msync would hold it)."""
        fd = self._f.fileno()
        self._wait("journal", "syncing the raft journal", lambda: os.fdatasync(fd))

    def flush(self) -> None:
        self._mm.flush()

    def close(self) -> None:
        self._mm.flush()
        self._mm.close()
        self._f.close()


def _create(path: str, header: bytes) -> None:
    with open(path, "wb") as f:
        f.write(header)


def _header(format_version: int = FORMAT_CHECKSUMMED) -> bytes:
    name = APP_NAME + b"\0" * (NAME_SIZE - len(APP_NAME))
    version = APP_VERSION + b"\0" * (VERSION_SIZE - len(APP_VERSION))
    return name + version + struct.pack("<II", format_version, FIRST_RECORD_OFFSET)


_SIZE_CRC = struct.Struct("<II")
_SIZE = struct.Struct("<I")
_IDX_TERM = struct.Struct("<QQ")


def _record(command: bytes, idx: int, term: int) -> bytes:
    data = _IDX_TERM.pack(idx, term) + command
    return _SIZE_CRC.pack(len(data), zlib.crc32(data)) + data + _SIZE.pack(len(data))


class JournalFormatError(RuntimeError):
    """A journal this version cannot read (a newer format, or not a journal at all)."""


class ReservedFileJournal(Journal):
    """pysyncobj's journal interface on a `_ReservedFile`: checksummed records, and (`durable`)
    `sync()` and a synced term and vote (see the module docstring)."""

    def __init__(self, path: str, wait: DiskWaiter = _fail_fast, durable: bool = False) -> None:
        self._wait = wait
        self._durable = durable
        self._path = path
        self._meta_path = path + ".meta"
        self._meta: dict[str, Any] = self._load_meta()
        self._meta_saved = True
        self._file = _ReservedFile(path, _header(), wait)
        self._entries: list[tuple[bytes, int, int]] = []
        self._unsynced = False  # records added (or removed) since the last sync()
        fmt = self._format()
        if fmt == FORMAT_PLAIN:
            self._upgrade_plain()
            fmt = self._format()
        if fmt != FORMAT_CHECKSUMMED:
            raise JournalFormatError(
                f"{path}: raft journal format {fmt}; this version reads formats {FORMAT_PLAIN} and "
                f"{FORMAT_CHECKSUMMED} (written by a newer kvstore, or not a journal)"
            )
        self._offset = self._load_checksummed()

    # --- records ---

    def _format(self) -> int:
        return int(_SIZE.unpack(self._file.read(_FORMAT_OFFSET, 4))[0])

    def _last_record_offset(self) -> int:
        return int(_SIZE.unpack(self._file.read(LAST_RECORD_OFFSET_OFFSET, 4))[0])

    def _set_last_record_offset(self, offset: int) -> None:
        self._file.write(LAST_RECORD_OFFSET_OFFSET, _SIZE.pack(offset))

    def _load_checksummed(self) -> int:
        """Read every intact record; the first torn one ends the log (dropped, with a warning)."""
        offset, last = FIRST_RECORD_OFFSET, min(self._last_record_offset(), self._file.size)
        while offset < last:
            entry = self._read_record(offset, last)
            if entry is None:
                log.warning(
                    "raft journal %s: the record at offset %d is torn (size or checksum wrong): "
                    "dropping it and the %d bytes after it, never acknowledged (a crash before they "
                    "were synced)",
                    self._path,
                    offset,
                    last - offset,
                )
                self._set_last_record_offset(offset)
                self._unsynced = True
                self.sync()
                break
            command, idx, term, size = entry
            self._entries.append((command, idx, term))
            offset += size
        return offset

    def _read_record(self, offset: int, end: int) -> tuple[bytes, int, int, int] | None:
        """(command, idx, term, bytes taken) of the record at `offset`, or None if it is torn."""
        if offset + _SIZE_CRC.size > end:
            return None
        length, crc = _SIZE_CRC.unpack(self._file.read(offset, _SIZE_CRC.size))
        size = _SIZE_CRC.size + length + _SIZE.size
        if length < _IDX_TERM.size or offset + size > end:
            return None
        data = self._file.read(offset + _SIZE_CRC.size, length)
        (trailer,) = _SIZE.unpack(self._file.read(offset + _SIZE_CRC.size + length, _SIZE.size))
        if trailer != length or zlib.crc32(data) != crc:
            return None
        idx, term = _IDX_TERM.unpack_from(data)
        return data[_IDX_TERM.size :], idx, term, size

    def _upgrade_plain(self) -> None:
        """Rewrite a format-1 journal (no checksums) as format 2: a new file, synced, renamed over
        the old one (a crash leaves one or the other, whole)."""
        entries, offset, last = [], FIRST_RECORD_OFFSET, self._last_record_offset()
        while offset < last:
            (length,) = _SIZE.unpack(self._file.read(offset, 4))
            data = self._file.read(offset + 4, length)
            idx, term = _IDX_TERM.unpack_from(data)
            entries.append((data[_IDX_TERM.size :], idx, term))
            offset += length + 8
        self._file.close()
        tmp = self._path + ".upgrade"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        upgraded = ReservedFileJournal(tmp, self._wait, durable=True)
        for entry in entries:
            upgraded.add(*entry)
        upgraded.sync()
        upgraded._destroy()
        os.replace(tmp, self._path)
        fsync_directory(os.path.dirname(os.path.abspath(self._path)))
        self._file = _ReservedFile(self._path, _header(), self._wait)
        log.info(
            "raft journal %s: rewritten with checksums (format 1 -> 2, %d entries)", self._path, len(entries)
        )

    def add(self, command: Any, idx: int, term: int) -> None:
        record = _record(to_bytes(command), idx, term)
        # On disk first (this may wait for space): the in-memory log never runs ahead of the file.
        self._file.write(self._offset, record)
        self._entries.append((command, idx, term))
        self._offset += len(record)
        self._set_last_record_offset(self._offset)
        self._unsynced = True

    def sync(self) -> None:
        """Every record added so far on stable storage (durable journals; else nothing to do)."""
        if self._unsynced and self._durable:  # not durable: the records stay unsynced, as they are
            self._file.sync()
            self._unsynced = False

    def clear(self) -> None:
        self._entries = []
        self._set_last_record_offset(FIRST_RECORD_OFFSET)
        self._offset = FIRST_RECORD_OFFSET
        self._unsynced = True

    def __getitem__(self, idx: Any) -> Any:
        return self._entries[idx]

    def __len__(self) -> int:
        return len(self._entries)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803 (pysyncobj's API)
        removed = len(self._entries) - entryFrom
        del self._entries[entryFrom:]
        offset = self._offset
        for _ in range(removed):
            (length,) = _SIZE.unpack(self._file.read(offset - _SIZE.size, _SIZE.size))
            offset -= _SIZE_CRC.size + length + _SIZE.size
        self._offset = offset
        self._set_last_record_offset(offset)
        self._unsynced = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802, N803
        kept = self._entries[entryTo:]
        self.clear()
        for entry in kept:  # rewrites from the start: within space already reserved
            self.add(*entry)
        self.sync()  # a compaction must not leave the log half-rewritten on disk

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
                if self._durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self._meta_path)
            if self._durable:  # the rename itself, or a crash could bring back the old term and vote
                fsync_directory(os.path.dirname(os.path.abspath(self._meta_path)))

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
_waiters: dict[str, tuple[DiskWaiter, bool]] = {}
_waiters_lock = threading.Lock()


def use_for(path: str, wait: DiskWaiter, durable: bool = True) -> None:
    """Make pysyncobj create the journal at `path` as a ReservedFileJournal waiting with `wait`
    (and syncing, if `durable`)."""
    with _waiters_lock:
        _waiters[os.path.abspath(path)] = (wait, durable)


def _create_journal(journalFile: str | None = None) -> Journal:  # noqa: N803 (pysyncobj's name)
    if journalFile is None:
        return createJournal(None)
    with _waiters_lock:
        wait, durable = _waiters.get(os.path.abspath(journalFile), (_fail_fast, False))
    return ReservedFileJournal(journalFile, wait, durable)


pysyncobj_syncobj.createJournal = _create_journal
