"""A replica's online backup copy (replication/backup_copy.py) on a real LMDB store, no processes:
the streamed bytes are a copy of the store, a cancelled copy releases its pinned transaction (map
growth, which needs none pinned, works again), one copy at a time, and a pin the tick thread
never makes is given up without leaking a transaction."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import types
from pathlib import Path
from typing import Any

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
        # A caller that goes away while its pin waits for the tick thread: the same.
        waiting = asyncio.ensure_future(copies.start(_no_barrier, 30.0))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        tasks.run_pending()
        assert storage.grow()
        ticks = TickThread(tasks)  # and the slot is free for the next caller
        try:
            copies.release(await copies.start(_no_barrier, 5.0))
        finally:
            ticks.stop.set()
    finally:
        storage.close()


async def test_a_caller_that_stops_taking_messages_loses_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admin.Backup's stream (server/backup.py): a caller that takes no message for the stall
    bound no longer pins the store nor holds the replica's copy slot; its stream ends unavailable."""
    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.server import backup as server_backup

    monkeypatch.setattr(server_backup, "STALL_SECONDS", 0.3)
    storage = _store(tmp_path / "store")
    tasks = TickTasks()
    ticks = TickThread(tasks)
    copies = BackupCopies(storage, tasks, asyncio.get_running_loop())

    class Shard:  # what the servicer sees of a replica, backed by a real copy
        async def backup_copy(self) -> Any:
            return await copies.start(_no_barrier, 5.0)

        def release_backup_copy(self, copy: Any) -> None:
            copies.release(copy)

    ctx = types.SimpleNamespace(
        config=types.SimpleNamespace(shard=0, name="s0r0"),
        shard=Shard(),
        header=lambda revision: pb.ResponseHeader(shard=0, revision=revision),
    )
    try:
        stream = server_backup.backup_stream(ctx, pb.BackupRequest(shard=0))
        assert (await anext(stream)).header.revision == 7000
        assert not storage.grow()  # pinned while the caller holds it
        await asyncio.sleep(1.0)  # takes nothing
        assert storage.grow()  # released by the stall bound
        again = await copies.start(_no_barrier, 5.0)  # the slot is free
        copies.release(again)
        with pytest.raises(errors.Unavailable, match="stopped"):
            await anext(stream)
    finally:
        ticks.stop.set()
        storage.close()
