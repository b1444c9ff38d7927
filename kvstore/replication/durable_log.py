"""A durable Raft log (issue 15, item 1): an entry is on disk on a replica before that replica counts
toward its commit. A mixin of `ShardStateMachine` that replaces three of pysyncobj's steps
(docs/architecture.md, "Durability"):

- the tick (`_onTick`) starts with one sync of everything appended since the last one (group
  commit), then sends the acknowledgements held for it;
- a follower's success acknowledgement (`_SyncObj__sendNextNodeIdx`) is held until that sync;
- the leader (`_checkCommandsToApply`) sends a tick's new entries in one message per follower and
  syncs its own copy while they write theirs.

It reads pysyncobj's log and state, `_deferred_acks` (set by the state machine before pysyncobj's
tick thread starts) and FreshnessTracking's `answering`.
"""

from __future__ import annotations

from typing import Any

from kvstore.replication import journal


def _send_later() -> None:
    """Stands in for pysyncobj's per-proposal send while a tick's proposals are appended."""


class DurableLog:
    _deferred_acks: list[tuple[Any, int, int, tuple[float, int] | None]]
    answering: tuple[float, int] | None

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 (pysyncobj's names)
        # One sync for everything appended since the last tick (group commit): the leader's new
        # entries (it counts its own copy toward the commits it computes next) and a follower's
        # appends from every message of the last poll, whose acknowledgements wait here for it.
        self._sync_log()
        self._send_deferred_acks()
        super()._onTick(timeToWait)

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (pysyncobj's name)
        """The leader appends the proposals queued since the last tick, sends them to its followers
        in one message each (pysyncobj, replicating at once, sends one per proposal: as many
        messages and acknowledgements as entries), then syncs its own copy while they append
        theirs (synced at the next tick, the sync came after their acknowledgements: ~0.3 ms per
        write at 1 in flight, docs/performance.md "The 1-in-flight latency path")."""
        before = self._SyncObj__getCurrentLogIndex()
        self._SyncObj__sendAppendEntries = _send_later  # shadows the method in super()'s loop only
        try:
            super()._checkCommandsToApply()
        finally:
            del self._SyncObj__sendAppendEntries
        if self._isLeader() and self._SyncObj__getCurrentLogIndex() > before:
            self._SyncObj__sendAppendEntries()
        self._sync_log()

    def _SyncObj__sendNextNodeIdx(  # noqa: N802 (replaces pysyncobj's follower acknowledgement)
        self,
        node: Any,
        reset: bool = False,
        nextNodeIdx: int | None = None,
        success: bool = False,  # noqa: N803
    ) -> None:
        """A follower acknowledges only entries on its disk. A success waits for the next tick's
        sync (one for all the appends of a poll: per-message syncs cost a third of multi-put
        throughput); anything else goes at once, after the acknowledgements before it."""
        if success:
            if nextNodeIdx is None:
                nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
            # `answering`: the append this acknowledges, echoed to the leader (freshness.py).
            self._deferred_acks.append((node, nextNodeIdx, self.raftCurrentTerm, self.answering))
            return
        self._sync_log()
        self._send_deferred_acks()
        super()._SyncObj__sendNextNodeIdx(node, reset=reset, nextNodeIdx=nextNodeIdx, success=success)

    def _send_deferred_acks(self) -> None:
        """Send the held acknowledgements (their entries are synced now) that are still true: same
        term, and the log still reaches the index (a later message in the same poll may have cut
        it; the leader then learns from the next acknowledgement)."""
        acks, self._deferred_acks = self._deferred_acks, []
        answering = self.answering
        try:
            for node, next_index, term, echo in acks:
                if term == self.raftCurrentTerm and next_index <= self._SyncObj__getCurrentLogIndex() + 1:
                    self.answering = echo  # the transport stamps it on the acknowledgement
                    super()._SyncObj__sendNextNodeIdx(node, nextNodeIdx=next_index, success=True)
        finally:
            self.answering = answering

    def _sync_log(self) -> None:
        raft_log = getattr(self, "_SyncObj__raftLog", None)  # None until SyncObj.__init__ made it
        if isinstance(raft_log, journal.ReservedFileJournal):
            raft_log.sync()
