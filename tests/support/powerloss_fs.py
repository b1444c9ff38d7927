"""A FUSE filesystem for power-loss tests: every byte written since a file's last fsync can be lost.

Like LazyFS (which etcd's robustness tests use), but small and in Python (mfusepy, ctypes over
libfuse3). It passes every operation through to a backing directory and, before a file's bytes
are first overwritten since its last fsync/fdatasync, keeps their previous content (4 KiB
pre-images) and the file's last synced size. A *cut* (the `cut` command, see below) puts every
such file back: its synced bytes and synced size, as a disk would hold them after power loss.

What the model covers (and what it does not):

- File data and size (write, truncate, fallocate) are volatile until fsync or fdatasync of that
  file. msync(MS_SYNC) of a shared mapping reaches us as the dirty pages' writes followed by an
  fsync, so it counts as a sync too. Writes through a shared mmap (pysyncobj's journal) reach us
  only at kernel writeback, or never before the cut: either way they are lost unless synced,
  because the cut discards every write that arrives after it (the dead process's dirty pages,
  flushed by the unmount), and the mount is then replaced, so no stale page cache survives.
- A file created since the mount and neither fsynced nor followed by an fsync of its directory is
  removed at the cut (under whatever name it has then).
- A rename or an unlink of a file is undone by the cut unless the directory of the new name (of
  the unlinked file) was fsynced since: the file it replaced or removed comes back (kept aside as a
  hard link in `.powerloss-graveyard` of the backing directory). So tmp-file-then-rename without a
  directory fsync is lost, as POSIX allows; a renamed file whose data was not fsynced comes back
  with its synced data only (the zero-length file of a real crash, when the rename survives).
- Directories (mkdir, rmdir, a renamed directory), links, symlinks, chmod and utimes are durable
  at once (not modelled).
- A plain cut drops all of a file's unsynced blocks; a torn cut keeps each one (4 KiB, whole) and
  each file's unsynced size with probability 1/2, and a new file's name too, and a random prefix of
  the pending renames and unlinks (metadata is journaled in order). Writes are not torn inside a
  block.

Control: the daemon serves one extra file, `/.powerloss-control`, not in the backing directory.
Writing `cut` to it reverts every unsynced change and from then on discards writes; `cut torn SEED`
keeps a random part of the unsynced blocks (a disk cache written back in part, in any order, as
real disks do; SEED makes it repeatable). The report (JSON: files reverted, bytes dropped, blocks
kept, files removed, renames and unlinks undone) is written to `--report`. The harness side is
tests/support/powerloss_mount.py.

Run: python -m tests.support.powerloss_fs BACKING MOUNTPOINT --report FILE (foreground).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import random
import shutil
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import mfusepy

CONTROL = "/.powerloss-control"
GRAVEYARD = ".powerloss-graveyard"  # in the backing directory, hidden from the mount
_CONTROL_FH = 1 << 40  # never a real descriptor
_BLOCK = 4096


@dataclass
class _Unsynced:
    """One file's changes since its last sync: the content to go back to."""

    fd: int  # our own descriptor of the file: reverting works whatever its name is now
    synced_size: int
    preimages: dict[int, bytes] = field(default_factory=dict)  # block number -> bytes before


@dataclass
class _Pending:
    """A rename (`old` -> `new`) or an unlink (`old` only) that a cut undoes."""

    old: str
    new: str | None
    directory: str  # whose fsync makes it durable: the directory of the new name (or the unlinked)
    grave: str | None  # the file it replaced or removed, kept aside


def _parent(path: str) -> str:
    return os.path.dirname(path.rstrip("/")) or "/"


class PowerLossFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: str, report: str) -> None:
        self.root = os.path.realpath(backing)
        self.report = report
        self._mutex = threading.Lock()
        self.unsynced: dict[int, _Unsynced] = {}  # inode -> changes
        self.created: dict[str, int] = {}  # relative path -> inode, never synced since creation
        # Renames and unlinks not yet made durable by an fsync of their directory, oldest first;
        # what they replaced or removed waits in the graveyard (same filesystem: links, no copies).
        self.pending: list[_Pending] = []
        self.graveyard = os.path.join(self.root, GRAVEYARD)
        shutil.rmtree(self.graveyard, ignore_errors=True)  # a previous mount's: already cut
        os.makedirs(self.graveyard)
        self._graves = itertools.count()
        self.cut_done = False

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # ----- the volatile layer -----

    def _record(self, fd: int, start: int, end: int) -> None:
        """Keep the pre-images of blocks [start, end) of `fd`'s file before they change."""
        ino = os.fstat(fd).st_ino
        state = self.unsynced.get(ino)
        if state is None:
            state = _Unsynced(fd=os.dup(fd), synced_size=os.fstat(fd).st_size)
            self.unsynced[ino] = state
        size = os.fstat(fd).st_size
        # Blocks past the end of file too (their "before" is empty): a torn cut may keep or drop them.
        for block in range(start // _BLOCK, -(-end // _BLOCK)):
            if block not in state.preimages:
                start_of_block = block * _BLOCK
                inside = start_of_block < max(size, state.synced_size)
                state.preimages[block] = os.pread(fd, _BLOCK, start_of_block) if inside else b""

    def _synced(self, fd: int) -> None:
        ino = os.fstat(fd).st_ino
        state = self.unsynced.pop(ino, None)
        if state is not None:
            os.close(state.fd)
        for path, created_ino in list(self.created.items()):
            if created_ino == ino:
                del self.created[path]

    def cut(self, torn: random.Random | None = None) -> dict[str, Any]:
        """Power loss: every file back to its synced content and size; writes discarded from now.
        `torn`: a disk that wrote back part of its cache, in any order: each unsynced block (and
        each file's unsynced size) reached the disk or not, at random."""
        self.cut_done = True
        reverted = dropped = kept = 0
        for state in self.unsynced.values():
            size = os.fstat(state.fd).st_size
            final = size if torn is not None and torn.random() < 0.5 else state.synced_size
            for block, before in sorted(state.preimages.items()):
                if torn is not None and torn.random() < 0.5:
                    kept += 1  # this block reached the disk
                    continue
                # Past the old end of file the "before" is short: what was never written reads as zeros.
                length = min(_BLOCK, max(0, final - block * _BLOCK))
                os.pwrite(state.fd, before.ljust(length, b"\0"), block * _BLOCK)
                dropped += _BLOCK
            os.ftruncate(state.fd, final)
            reverted += 1
            os.close(state.fd)
        self.unsynced.clear()
        removed = []
        for path, ino in self.created.items():
            if torn is not None and torn.random() < 0.5:
                continue  # its directory entry reached the disk (its data as above)
            full = self._full(path)
            try:
                if os.lstat(full).st_ino == ino:
                    os.unlink(full)
                    removed.append(path)
            except FileNotFoundError:
                pass
        self.created.clear()
        # Metadata reaches the disk in order (a journal): a torn cut keeps a prefix of it.
        keep = torn.randint(0, len(self.pending)) if torn is not None else 0
        for op in reversed(self.pending[keep:]):
            self._undo(op)
        for op in self.pending[:keep]:
            self._commit(op)
        undone = len(self.pending) - keep
        self.pending.clear()
        return {
            "names_undone": undone,
            "files_reverted": reverted,
            "bytes_dropped": dropped,
            "blocks_kept": kept,
            "files_removed": sorted(removed),
        }

    def _bury(self, path: str) -> str | None:
        """Keep the file at `path` aside (a hard link), for a cut to bring back."""
        full = self._full(path)
        if not os.path.lexists(full) or os.path.isdir(full):
            return None
        grave = os.path.join(self.graveyard, str(next(self._graves)))
        os.link(full, grave, follow_symlinks=False)
        return grave

    def _undo(self, op: _Pending) -> None:
        if op.new is not None and os.path.lexists(self._full(op.new)):
            os.rename(self._full(op.new), self._full(op.old))
        if op.grave is not None:
            os.rename(op.grave, self._full(op.new if op.new is not None else op.old))

    def _commit(self, op: _Pending) -> None:
        if op.grave is not None:
            os.unlink(op.grave)

    # ----- the control file -----

    def _control_write(self, data: bytes) -> int:
        command = data.decode().split()
        if command == ["cut"]:
            result = self.cut()
        elif len(command) == 3 and command[:2] == ["cut", "torn"] and command[2].isdigit():
            result = self.cut(torn=random.Random(int(command[2])))
        else:
            raise OSError(errno.EINVAL, f"unknown command {command!r}")
        with open(self.report, "w") as f:
            json.dump(result, f)
        return len(data)

    # ----- pass-through, recording what changes -----

    def access(self, path: str, amode: int) -> int:
        if path != CONTROL and not os.access(self._full(path), amode):
            raise OSError(errno.EACCES, "")
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == CONTROL:
            return {"st_mode": 0o100200, "st_nlink": 1, "st_size": 0}
        st = os.lstat(self._full(path))
        keys = ("st_atime_ns", "st_ctime_ns", "st_gid", "st_mode", "st_mtime_ns", "st_nlink", "st_size")
        attrs = {k.removesuffix("_ns"): getattr(st, k) for k in keys}
        attrs.update(st_uid=st.st_uid, st_ino=st.st_ino, st_blocks=st.st_blocks)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        names = os.listdir(self._full(path))
        return [".", "..", *(n for n in names if not (path == "/" and n == GRAVEYARD))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag")
        return {k: getattr(st, k) for k in (*keys, "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            # A file whose creation is not durable needs nothing kept: a cut removes it anyway.
            grave = None if self.created.pop(path, None) is not None else self._bury(path)
            os.unlink(self._full(path))
            if grave is not None:
                self.pending.append(_Pending(path, None, _parent(path), grave))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._full(target))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._full(source), self._full(target))
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            if os.path.isdir(self._full(old)):  # directories: durable at once (not modelled)
                os.rename(self._full(old), self._full(new))
                return 0
            # Replacing a file whose creation is not durable: nothing to bring back at a cut.
            grave = None if self.created.pop(new, None) is not None else self._bury(new)
            os.rename(self._full(old), self._full(new))
            if old in self.created:  # a new file keeps being new under its new name
                self.created[new] = self.created.pop(old)
            self.pending.append(_Pending(old, new, _parent(new), grave))
        return 0

    def open(self, path: str, flags: int) -> int:
        if path == CONTROL:
            return _CONTROL_FH
        with self._mutex:
            # Writable means read-write here (pre-images are read through the same descriptor),
            # and no O_APPEND: the kernel sends every write with its offset already.
            flags &= ~(os.O_CREAT | os.O_TRUNC | os.O_APPEND)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            fd = os.open(self._full(path), flags)
            if flags & os.O_TRUNC and not self.cut_done:
                self._record(fd, 0, os.fstat(fd).st_size)
                os.ftruncate(fd, 0)
        return fd

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            full = self._full(path)
            existed = os.path.exists(full)
            fd = os.open(full, os.O_RDWR | os.O_CREAT, mode)
            if not existed:
                self.created[path] = os.fstat(fd).st_ino
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh == _CONTROL_FH:
            return b""
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if fh == _CONTROL_FH:
            return self._control_write(data)
        with self._mutex:
            if self.cut_done:
                return len(data)  # after the power cut: the dead process's late writeback is lost
            self._record(fh, offset, offset + len(data))
            return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if path == CONTROL:
            return 0
        with self._mutex:
            if self.cut_done:
                return 0
            fd = fh if fh is not None else os.open(self._full(path), os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                self._record(fd, min(length, size), max(length, size))
                os.ftruncate(fd, length)
            finally:
                if fd != fh:
                    os.close(fd)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        if mode != 0:
            raise OSError(errno.EOPNOTSUPP, "only plain allocation is modelled")
        with self._mutex:
            if self.cut_done:
                return 0
            self._record(fh, offset, offset)  # only the size can change: remember the synced one
            os.posix_fallocate(fh, offset, size)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close(2) is no sync

    def release(self, path: str, fh: int) -> int:
        if fh != _CONTROL_FH:
            os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if fh == _CONTROL_FH:
            return 0
        with self._mutex:
            if self.cut_done:
                return 0
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
            self._synced(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            if self.cut_done:
                return 0
            directory = path.rstrip("/") or "/"
            for created in [p for p in self.created if _parent(p) == directory]:
                del self.created[created]  # its directory entry is durable now
            for op in [op for op in self.pending if op.directory == directory]:
                self._commit(op)
                self.pending.remove(op)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--report", required=True, help="where a cut's JSON report is written")
    args = parser.parse_args(argv)
    fs = PowerLossFS(args.backing, args.report)
    # Foreground, one thread (the volatile layer is simple under one lock anyway); no attribute
    # or entry caching, so the kernel always asks us and a test sees reverted sizes at once.
    mfusepy.FUSE(
        fs,
        args.mountpoint,
        foreground=True,
        nothreads=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
