"""Free space on the disk that holds a replica's data: the watermark below which writes are refused.

Knows nothing of Raft. `os.statvfs` is cheap but not free, and the leader asks before every write:
a sample is reused for `interval` seconds (100 ms), so space freed by an operator is seen at once
while a busy leader calls statvfs at most ten times a second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


class DiskSpace:
    def __init__(
        self,
        path: str | Path,
        min_free_bytes: int,
        min_free_fraction: float,
        interval: float = 0.1,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.path = str(path)
        self.min_free_bytes = min_free_bytes
        self.min_free_fraction = min_free_fraction
        self._interval = interval
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._sampled_at = -1e9
        self._free = 0
        self._total = 0

    def sample(self) -> tuple[int, int]:
        """(free bytes available to us, total bytes) of the filesystem, at most `interval` old."""
        now = time.monotonic()
        with self._lock:
            if now - self._sampled_at >= self._interval:
                st = self._statvfs(self.path)
                self._free, self._total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
                self._sampled_at = now
            return self._free, self._total

    def floor(self) -> int:
        """Free bytes kept in reserve: what the Raft journal, barriers and followers still need."""
        return max(self.min_free_bytes, int(self.sample()[1] * self.min_free_fraction))

    def shortfall(self) -> str | None:
        """Why writes must be refused now (free space below the watermark), or None."""
        free, _ = self.sample()
        floor = self.floor()
        if free >= floor:
            return None
        return (
            f"insufficient storage: {free} bytes free on {self.path}, writes are refused below "
            f"{floor} (storage.min_free_bytes / min_free_fraction); they resume once space is freed"
        )

    def spare(self) -> int:
        """Bytes that may still be used before the watermark (0 when below it)."""
        free, _ = self.sample()
        return max(0, free - self.floor())


def fsync_directory(path: str | Path) -> None:
    """Make a directory's entries durable: a rename or a new file in it survives a crash only
    after this (the file's own fsync covers its data, not its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
