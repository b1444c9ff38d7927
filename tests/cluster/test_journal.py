"""The Raft journal on a full disk: space is reserved before the mmap grows, so no SIGBUS."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kvstore.replication.journal import ReservedFileJournal
from tests.tmpfs import fill, small_tmpfs

_GROW_ON_FULL_DISK = """
import sys
from pysyncobj.journal import FileJournal
j = FileJournal(sys.argv[1])
for i in range(1, 10_000):
    j.add(b"e" * 65536, i, 1)
print("no crash")
"""


def test_a_full_disk_kills_pysyncobjs_journal_but_ours_waits_for_space(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 8 << 20) as disk:
        filler = fill(disk / "filler", leave_bytes=2 << 20)
        # The journal pysyncobj ships: ftruncate + mmap, then a write into a page the disk cannot
        # back kills the process (the crash loop of issue 12).
        crashed = subprocess.run([sys.executable, "-c", _GROW_ON_FULL_DISK, str(disk / "theirs")], timeout=60)
        assert crashed.returncode == -signal.SIGBUS
        (disk / "theirs").unlink()

        waits: list[str] = []
        freed = threading.Event()

        def wait(source: str, doing: str, attempt: Callable[[], None]) -> None:
            while True:
                try:
                    attempt()
                    return
                except OSError as exc:
                    waits.append(f"{doing}: {exc}")
                    if len(waits) == 3:
                        filler.unlink()  # an operator frees space
                        freed.set()

        journal = ReservedFileJournal(str(disk / "ours"), wait)
        for i in range(1, 100):
            journal.add(b"e" * 65536, i, 1)  # 6.5 MB: more than the disk had free
        assert freed.is_set() and len(waits) == 3 and "No space left" in waits[0]
        assert len(journal) == 99 and journal[98] == (b"e" * 65536, 99, 1)
        journal._destroy()
        assert len(ReservedFileJournal(str(disk / "ours"))) == 99
