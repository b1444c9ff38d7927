"""Which storage failures are the op's fault and which the disk's, and what to do about the latter.

A *deterministic refusal* (LMDB will not take a key of that size, a malformed op) gives the same
answer on every replica: it becomes that op's error result and the log moves on. Anything else
(an I/O error, ENOSPC, a full map, out of memory) may pass: the apply batch is rolled back and
retried with exponential backoff, `problem()` says what is wrong (the node's health signal), and
once failures have lasted `give_up_after` seconds the node stops with one clear log line and a
non-zero exit, instead of spinning.

Used by the apply path and the Raft journal, both on pysyncobj's tick thread; `problem()` is
read from any thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import lmdb

log = logging.getLogger(__name__)

# LMDB errors that depend only on the op's content: identical on every replica.
DETERMINISTIC_LMDB_ERRORS: tuple[type[lmdb.Error], ...] = (
    lmdb.BadValsizeError,
    lmdb.KeyExistsError,
    lmdb.NotFoundError,
    lmdb.IncompatibleError,
)

EXIT_STORAGE_FAILED = 74  # EX_IOERR (sysexits.h)
_FIRST_BACKOFF = 0.05
_LOG_EVERY = 5.0


def is_transient(exc: BaseException) -> bool:
    """True for failures of the machine (retry the batch), False for refusals of the op itself."""
    if isinstance(exc, lmdb.Error):
        return not isinstance(exc, DETERMINISTIC_LMDB_ERRORS)
    return isinstance(exc, OSError | MemoryError)


def _exit_node(message: str) -> None:
    log.critical(message)
    logging.shutdown()
    os._exit(EXIT_STORAGE_FAILED)


class StorageHealth:
    """Consecutive transient storage failures per source ("apply", "journal"), with backoff."""

    def __init__(
        self,
        give_up_after: float,
        max_backoff: float,
        on_fatal: Callable[[str], None] = _exit_node,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.give_up_after = give_up_after
        self.max_backoff = max_backoff
        self._on_fatal = on_fatal
        self._clock = clock
        # source -> (first failure time, consecutive failures, last message)
        self._failing: dict[str, tuple[float, int, str]] = {}
        self._last_log = -1e9
        self.failures_total = 0

    def failed(self, source: str, doing: str, exc: BaseException) -> float:
        """Record one failure; returns how long to wait before the next attempt."""
        now = self._clock()
        since, count, _ = self._failing.get(source, (now, 0, ""))
        count += 1
        self.failures_total += 1
        message = f"storage failing {now - since:.1f}s ({count} attempts) {doing}: {exc!r}"
        self._failing[source] = (since, count, message)
        if now - since >= self.give_up_after:
            self._on_fatal(
                f"storage has failed for {now - since:.0f}s ({count} attempts; limit "
                f"storage.io_failure_limit_seconds = {self.give_up_after:.0f}s) {doing}: {exc!r}; "
                f"stopping this node (exit {EXIT_STORAGE_FAILED})"
            )
        if count == 1 or now - self._last_log >= _LOG_EVERY:  # a broken disk fails every attempt
            self._last_log = now
            log.error("%s; retrying with backoff", message)
        return min(self.max_backoff, _FIRST_BACKOFF * 2 ** (count - 1))

    def recovered(self, source: str) -> None:
        failing = self._failing.pop(source, None)
        if failing is not None:
            since, count, _ = failing
            elapsed = self._clock() - since
            log.warning("storage recovered (%s) after %.1fs and %d failed attempts", source, elapsed, count)

    def problem(self) -> str | None:
        """None while storage works; otherwise what is failing (the node's storage health)."""
        failing = list(self._failing.values())
        return failing[0][2] if failing else None

    def wait_for_disk(self, source: str, doing: str, attempt: Callable[[], None]) -> None:
        """Run `attempt` until it stops raising OSError, backing off in between (blocks the caller)."""
        while True:
            try:
                attempt()
            except OSError as exc:
                time.sleep(self.failed(source, doing, exc))
                continue
            self.recovered(source)
            return
