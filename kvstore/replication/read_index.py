"""Strong reads at the leader without a log entry: Raft's ReadIndex (Ongaro's thesis, section 6.4;
etcd's `ReadIndex`). A mixin of `ShardStateMachine`, run on pysyncobj's tick thread.

A read that arrives at time R (this process's monotonic clock) may be served from the leader's
state once both hold:
1. a majority acknowledged append-entries the leader sent at R or later, in its current term, and
   its term has committed an entry (`FreshnessTracking.leader_confirmed_at() >= R`). Then no other
   leader was elected before R, so every write acknowledged to a client before R was acknowledged
   by this leader, after it applied: its index is within our commit index;
2. the replica has applied through the index handed back (the commit index when 1 was found, at
   least the one at R): the asyncio side waits for that (`Shard.read_index`).

This replaces the read barrier at the leader: a no-op entry appended, synced and applied on every
replica for each round of reads. The round here is one heartbeat, sent as soon as reads wait for
one, and any number of rounds may overlap (a barrier waited for the previous one).

Uses, from the host: pysyncobj's `_isLeader()`, `raftCommitIndex`, its pipe notifier and
`__sendAppendEntries`; FreshnessTracking's `leader_confirmed_at()`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# callback(index): read through `index`; callback(None): this replica is not the leader (now).
ReadCallback = Callable[[int | None], None]


class ReadIndex:
    def _init_read_index(self) -> None:
        # (arrived at, callback), appended by any thread (deque appends are atomic)
        self._read_requests: deque[tuple[float, ReadCallback]] = deque()
        self._reads_waiting: list[tuple[float, ReadCallback]] = []  # tick thread only
        self._read_heartbeat_at = -math.inf  # when the tick thread last sent heartbeats for reads

    def read_index(self, callback: ReadCallback) -> None:
        """(any thread) Ask for a read point: `callback` runs on the tick thread with the index a
        read that arrives now must see, or None if this replica is not the leader. Not called at
        all if leadership is never confirmed: the caller times out."""
        self._read_requests.append((time.monotonic(), callback))
        self._SyncObj__pipeNotifier.notify()  # type: ignore[attr-defined]  # wake the tick thread

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (pysyncobj's name; runs once per tick)
        super()._checkCommandsToApply()  # type: ignore[misc]
        self._serve_reads()

    def _serve_reads(self) -> None:
        requests = self._read_requests
        while requests:
            self._reads_waiting.append(requests.popleft())
        waiting = self._reads_waiting
        if not waiting:
            return
        host: Any = self
        if not host._isLeader():
            self._reads_waiting = []
            for _, callback in waiting:
                callback(None)
            return
        confirmed = host.leader_confirmed_at()
        if confirmed is not None:
            index = host.raftCommitIndex
            ready = [callback for arrived, callback in waiting if arrived <= confirmed]
            if ready:
                self._reads_waiting = waiting = [w for w in waiting if w[0] > confirmed]
                for callback in ready:
                    callback(index)
        if waiting and max(arrived for arrived, _ in waiting) > self._read_heartbeat_at:
            # Stamped before sending: every append in this round is sent later than this time, so
            # it confirms every read that arrived before it (the transport stamps `sent_at`).
            self._read_heartbeat_at = time.monotonic()
            host._SyncObj__sendAppendEntries()
