"""Online backup copies of one replica's store, for `Shard.backup_copy` (kvstore backup).

A copy is what a Raft snapshot is (`snapshots.py`): a compacted LMDB copy made from a pinned read
transaction by a background thread, never on the tick thread, never stopping writes. Here it goes
into a pipe instead of a file, and the event loop reads it in bounded chunks as the caller sends
them on, so memory stays at a pipe buffer plus one chunk whatever the store's size.

- The transaction is pinned on the tick thread (a tick callback, `TickTasks`): `Storage` begins
  snapshot transactions there only, between apply batches, and map growth checks for pinned ones
  there.
- Cancelling closes the pipe's read end: the copying thread's next write fails (EPIPE) and the
  transaction is released. That is how a caller that goes away, and a snapshot install that must
  close the environment (`cancel_all`), stop a copy.
- At most `max_running` copies per replica at once (each pins old pages and holds map growth off);
  one more is refused `Overloaded`, before any work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from kvstore import errors
from kvstore.storage.engine import Storage

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031  # Linux: a larger pipe lets one read take a whole chunk
_PIPE_BYTES = 1 << 20


class TickTasks:
    """Functions queued from any thread, run once each at the tick thread's next callback."""

    def __init__(self) -> None:
        self._queue: collections.deque[Callable[[], None]] = collections.deque()

    def submit(self, task: Callable[[], None]) -> None:
        self._queue.append(task)

    def run_pending(self) -> None:
        """The tick callback: cheap when nothing is queued (every tick calls it)."""
        while self._queue:
            task = self._queue.popleft()
            try:
                task()
            except Exception:
                log.exception("a tick task failed")


class ShardCopy:
    """One running copy: `applied_index` of the pinned state, chunks from `read_chunk`."""

    def __init__(self, storage: Storage, txn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.applied_index = storage.applied_index_in(txn)
        self._storage = storage
        self._loop = loop
        self._read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._read_fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        os.set_blocking(self._read_fd, False)
        self._sha = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._thread = threading.Thread(
            target=self._copy, args=(txn, write_fd), name="kvstore-backup-copy", daemon=True
        )
        self._thread.start()  # owns `txn` (ends it) and `write_fd` (closes it) from here on

    def _copy(self, txn: Any, write_fd: int) -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                self._storage.write_snapshot(txn, out)  # ends the transaction, whatever happens
        except BaseException as exc:  # noqa: BLE001 (reported to the reader by `finish`)
            self._error = exc

    async def read_chunk(self, size: int) -> bytes:
        """Up to `size` bytes of the copy (fewer only at its end); b"" once it is all read."""
        chunk = bytearray()
        while len(chunk) < size and not self._closed:
            try:
                data = os.read(self._read_fd, size - len(chunk))
            except BlockingIOError:
                await self._readable()
                continue
            if not data:
                break
            chunk += data
        if self._closed:
            raise errors.Unavailable(
                "the backup copy was stopped: this replica's store is being replaced (a snapshot "
                "install) or closed; back up again"
            )
        self._sha.update(chunk)
        self.size += len(chunk)
        return bytes(chunk)

    async def _readable(self) -> None:
        ready = self._waiter = self._loop.create_future()
        self._loop.add_reader(self._read_fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self._waiter = None
            if not self._closed:
                self._loop.remove_reader(self._read_fd)

    def finish(self, timeout: float = 30.0) -> str:
        """After the last chunk: the copy's SHA-256 (hex), or raise if copying failed. The
        thread ended the transaction before closing the pipe, so it is done or nearly."""
        self._thread.join(timeout)
        if self._thread.is_alive() or self._error is not None:
            raise errors.Unavailable(f"the backup copy failed: {self._error or 'copying did not end'}")
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the copy (if still running) and release the pipe; event-loop thread only."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)  # a copy still writing gets EPIPE and ends its transaction
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)  # a reader waiting for data sees the close

    def close_from_any_thread(self) -> None:
        """`close` once the event loop is gone (no reader registered, nothing reading)."""
        if not self._closed:
            self._closed = True
            os.close(self._read_fd)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class BackupCopies:
    """The copies running on one replica (see the module docstring)."""

    def __init__(
        self, storage: Storage, tick_tasks: TickTasks, loop: asyncio.AbstractEventLoop, max_running: int = 1
    ) -> None:
        self._storage = storage
        self._tick_tasks = tick_tasks
        self._loop = loop
        self._max_running = max_running
        self._running: set[ShardCopy] = set()
        self._running_lock = threading.Lock()  # `cancel_all` lists them from the tick thread
        self._starting = 0

    async def start(self, barrier: Callable[[], Awaitable[int]], pin_timeout: float) -> ShardCopy:
        """After `barrier()` (a read barrier: every acknowledged write is then applied here), pin
        the store's current state (on the tick thread) and start copying it."""
        if len(self._running) + self._starting >= self._max_running:
            raise errors.Overloaded(
                f"{len(self._running) + self._starting} backup copy already runs on this replica "
                f"(at most {self._max_running} at once): retry when it is done"
            )
        self._starting += 1
        try:
            await barrier()
            copy = await self._pin(pin_timeout)
        finally:
            self._starting -= 1
        with self._running_lock:
            self._running.add(copy)
        return copy

    def release(self, copy: ShardCopy) -> None:
        copy.close()
        with self._running_lock:
            self._running.discard(copy)

    async def _pin(self, timeout: float) -> ShardCopy:
        pinned: concurrent.futures.Future[ShardCopy] = concurrent.futures.Future()
        lock = threading.Lock()
        abandoned = False

        def on_tick() -> None:
            with lock:
                if abandoned or not pinned.set_running_or_notify_cancel():
                    return
                try:
                    txn = self._storage.begin_snapshot()
                except Exception as exc:
                    pinned.set_exception(exc)
                    return
                try:
                    pinned.set_result(ShardCopy(self._storage, txn, self._loop))
                except BaseException as exc:  # the copy never started: its transaction is ours
                    self._storage.end_snapshot(txn)
                    pinned.set_exception(exc)

        self._tick_tasks.submit(on_tick)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pinned)), timeout)
        except BaseException as exc:  # timed out, or the caller went away (cancelled)
            with lock:
                abandoned = True
                if pinned.done() and not pinned.cancelled() and pinned.exception() is None:
                    pinned.result().close()  # pinned just now: let it go
            if isinstance(exc, TimeoutError):
                raise errors.Unavailable(
                    f"the replica's tick thread did not pin a copy within {timeout:g}s"
                ) from None
            raise

    def cancel_all(self, timeout: float = 10.0) -> None:
        """Stop every running copy and wait for their transactions to end (any thread but the
        event loop's): the store's environment is about to be closed (a snapshot install, the
        replica shutting down)."""
        with self._running_lock:
            copies = list(self._running)
        if not copies:
            return
        log.warning("cancelling %d backup copy(ies): the store is about to be closed", len(copies))
        for copy in copies:
            try:
                self._loop.call_soon_threadsafe(self.release, copy)
            except RuntimeError:  # the loop is closed: nothing reads the pipe any more
                copy.close_from_any_thread()
        for copy in copies:
            if not copy.join(timeout):
                log.error("a backup copy did not stop within %gs", timeout)
