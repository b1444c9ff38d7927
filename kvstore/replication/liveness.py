"""Is this replica's Raft machinery moving? What the health service asks (kvstore.server.health).

Two ways a node can look alive (its gRPC port answers) while its shard is stuck:
- the tick thread is dead or blocked (a hung fsync, a deadlock, an exception that killed it): no
  elections, no replication, no applies;
- the thread ticks but applies do not move while the log holds committed entries to apply (an entry
  that fails to apply on every tick, issue 12 item 1).

A tick callback records, on the tick thread itself, when it last ran and when applies last made
progress; `problem()` only compares those stamps with the clock, so asking is cheap and has no side
effects. The stamps are monotonic-clock floats written by one thread and read by another (atomic
under the GIL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ReplicaLiveness:
    def __init__(
        self, machine: Any, stall_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._machine = machine
        self._stall = stall_seconds
        self._clock = clock
        self._started_at = clock()
        self.ticked_at: float | None = None  # None until the first tick completes
        # Highest applied index seen: "progress" means going past it. pysyncobj's counter can move
        # back (a storage error rolls the batch back and re-applies it), and a batch re-applied and
        # rolled back on every tick must not count as moving.
        self._applied_mark = 0
        self.progress_at = self._started_at
        machine.addOnTickCallback(self.on_tick)

    def on_tick(self) -> None:
        """Runs on the tick thread at the end of every tick."""
        now = self._clock()
        self.observe(self._machine.raftLastApplied, self._machine.raftCommitIndex, now)
        self.ticked_at = now

    def observe(self, applied: int, commit: int, now: float) -> None:
        if applied > self._applied_mark:
            self._applied_mark = applied
            self.progress_at = now
        elif applied >= commit:
            self.progress_at = now  # nothing to apply is not being stuck

    def problem(self, thread_alive: bool) -> str | None:
        """Why this replica is stuck, or None."""
        now = self._clock()
        if not thread_alive:
            return "raft tick thread is not running"
        if self.ticked_at is None:
            waited = now - self._started_at
            if waited > self._stall:
                return f"raft tick thread has not completed its first tick in {waited:.1f}s"
            return "starting: raft tick thread has not ticked yet"
        if now - self.ticked_at > self._stall:
            return f"raft tick thread stalled: no tick for {now - self.ticked_at:.1f}s"
        if now - self.progress_at > self._stall:
            applied, commit = self._machine.raftLastApplied, self._machine.raftCommitIndex
            return (
                f"applies stuck: applied index {applied} has not moved for "
                f"{now - self.progress_at:.1f}s while the commit index is {commit}"
            )
        return None
