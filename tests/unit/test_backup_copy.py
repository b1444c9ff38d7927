"""A replica's online backup copy (replication/backup_copy.py) on a real LMDB store, no processes:
the streamed bytes are a copy of the store, a cancelled copy releases its pinned transaction (map
growth, which needs none pinned, works again), one copy at a time, and a pin the tick thread
never makes is given up without leaking a transaction."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest

from kvstore import errors
from kvstore.replication.backup_copy import BackupCopies, TickTasks
from kvstore.storage.copies import describe_copy
from kvstore.storage.engine import Storage


def _store(path: Path) -> Storage:
    storage = Storage(path, fsync=False)
    for i in range(6000):  # ~6 MB: more than the pipe holds, so a copy is still running when cancelled
        storage.put(b"k%06d" % i, b"%06d" % i * 170, revision=i + 2)
    storage.set_applied(7000)
    storage.commit()
    return storage


class TickThread:
    """Stands in for pysyncobj's tick thread: runs the queued tick tasks every 10 ms."""

    def __init__(self, tasks: TickTasks) -> None:
        self.tasks, self.stop = tasks, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            self.tasks.run_pending()


async def _no_barrier() -> int:
    return 0


async def test_a_copy_streams_the_store_and_is_released(tmp_path: Path) -> None:
    storage = _store(tmp_path / "store")
    tasks = TickTasks()
    ticks = TickThread(tasks)
    copies = BackupCopies(storage, tasks, asyncio.get_running_loop())
    try:
        copy = await copies.start(_no_barrier, 5.0)
        with pytest.raises(errors.Overloaded):  # one at a time per replica
            await copies.start(_no_barrier, 5.0)
        assert copy.applied_index == 7000
        data = bytearray()
        while chunk := await copy.read_chunk(64 << 10):
            assert len(chunk) <= 64 << 10
            data += chunk
        assert copy.finish() == hashlib.sha256(data).hexdigest()
        copies.release(copy)
        (tmp_path / "copy.mdb").write_bytes(bytes(data))
        contents = describe_copy(tmp_path / "copy.mdb")
        assert (contents.applied_index, contents.data_digest) == (7000, storage.checksum())
        assert storage.grow()  # no transaction left pinned
    finally:
        ticks.stop.set()
        storage.close()


async def test_cancel_all_stops_a_running_copy_and_ends_its_transaction(tmp_path: Path) -> None:
    storage = _store(tmp_path / "store")
    tasks = TickTasks()
    ticks = TickThread(tasks)
    copies = BackupCopies(storage, tasks, asyncio.get_running_loop())
    try:
        copy = await copies.start(_no_barrier, 5.0)
        assert await copy.read_chunk(64 << 10)
        assert not storage.grow()  # pinned: the map may not move under the copy
        # A snapshot install (tick thread) cancels it; the reader learns it at its next read.
        await asyncio.get_running_loop().run_in_executor(None, copies.cancel_all, 10.0)
        with pytest.raises(errors.Unavailable, match="stopped"):
            while await copy.read_chunk(64 << 10):
                pass
        assert copy.join(5.0)
        assert storage.grow()  # its transaction ended
        again = await copies.start(_no_barrier, 5.0)  # the slot is free again
        copies.release(again)
    finally:
        ticks.stop.set()
        storage.close()


async def test_a_pin_the_tick_thread_never_makes_is_given_up(tmp_path: Path) -> None:
    storage = _store(tmp_path / "store")
    tasks = TickTasks()  # no tick thread runs them
    copies = BackupCopies(storage, tasks, asyncio.get_running_loop())
    try:
        with pytest.raises(errors.Unavailable, match="did not pin"):
            await copies.start(_no_barrier, 0.2)
        tasks.run_pending()  # the tick thread comes back: the abandoned pin does nothing
        assert storage.grow()
    finally:
        storage.close()
