"""Freshness for bounded-staleness reads: how long ago this replica provably held every write
acknowledged at that moment (`staleness()`), part of `ShardStateMachine`.

Every time here is on this process's monotonic clock; between processes only ages travel (the
leader's `confirmed_age`). A wall-clock jump, or a stamp from a faster clock, cannot make a replica
look fresher than it is: a follower never dates its freshness after the moment it received the
message that proves it.

A mixin over pysyncobj's `SyncObj` (it reads the leader's state and hooks the message handler);
`ShardStateMachine` provides `visible_index` and `_settings.peers`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from kvstore.replication.peer_transport import SecurePeerTransport


class FreshnessStampingTransport(SecurePeerTransport):
    """Carries what bounded-staleness reads need (pysyncobj ignores unknown message keys):
    - on append-entries from the leader: `sent_at`, its send time on its own monotonic clock
      (only ever compared with that clock again, when echoed), and `confirmed_age`, how many
      seconds ago a majority last confirmed it leader (see `leader_confirmed_at`). An age, not a
      time: followers need not share the leader's clock, and a wall-clock jump changes nothing;
    - on the follower's acknowledgement: `echo`, the (sent_at, term) of the append it answers."""

    def send(self, node: Any, message: Any) -> bool:
        if isinstance(message, dict):
            kind = message.get("type")
            if kind == "append_entries":
                machine = self._syncObj
                now = time.monotonic()
                message["sent_at"] = now
                confirmed = machine.leader_confirmed_at()
                if confirmed is not None:
                    message["confirmed_age"] = max(0.0, now - confirmed)
            elif kind == "next_node_idx" and self._syncObj.answering is not None:
                message["echo"] = self._syncObj.answering
        return super().send(node, message)


class FreshnessTracking:
    """The freshness half of `ShardStateMachine` (call `_init_freshness()` before pysyncobj starts)."""

    # Uses, from the host: pysyncobj's `_isLeader()`, `raftCommitIndex`, `raftCurrentTerm`,
    # `_SyncObj__noopIDx` and message handler; ShardStateMachine's `visible_index`, `_settings`.
    # (Nothing is declared here: this class precedes SyncObj in the MRO, a stub would shadow it.)

    def _init_freshness(self) -> None:
        # (when the leader was confirmed, the leader's commit index then), on our monotonic clock
        self._freshness_pending: list[tuple[float, int]] = []
        self.fresh_as_of: float | None = None
        self.answering: tuple[float, int] | None = None  # (sent_at, term) of the append being handled
        # follower -> (term, latest echoed sent_at), on our monotonic clock
        self._acked_sent_at: dict[Any, tuple[int, float]] = {}

    def leader_confirmed_at(self) -> float | None:
        """The latest monotonic time T at which this node provably was the only leader: a
        majority acknowledged appends we sent at T or later in our current term (None: none yet).

        A follower that answers an append sent at T was still in our term after T, so no other
        leader could have been elected before T; every write acknowledged to a client before T was
        acknowledged by us, so it is within our commit index."""
        if not self._isLeader():
            return None
        noop_index = self._SyncObj__noopIDx
        if noop_index is None or self.raftCommitIndex < noop_index:
            return None  # until our term commits an entry, our commit index may lag the true one
        needed = (len(self._settings.peers) + 1) // 2  # acknowledgements needed besides our own
        if needed == 0:
            return time.monotonic()
        term = self.raftCurrentTerm
        stamps = sorted((t for term_of, t in self._acked_sent_at.values() if term_of == term), reverse=True)
        return stamps[needed - 1] if len(stamps) >= needed else None

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if not isinstance(message, dict):
            super()._SyncObj__onMessageReceived(node, message)
            return
        kind = message.get("type")
        if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            self._note_confirmation(message.get("confirmed_age"), message.get("commit_index"))
            if "sent_at" in message:
                self.answering = (message["sent_at"], message["term"])
        elif kind == "next_node_idx" and isinstance(message.get("echo"), tuple | list):
            self._note_echo(node, message["echo"])
        try:
            super()._SyncObj__onMessageReceived(node, message)
        finally:
            self.answering = None

    def _note_confirmation(self, age: Any, commit_index: Any) -> None:
        """Follower: the leader was confirmed `age` seconds before it sent this; once we have
        applied through its `commit_index`, we are as fresh as that moment, dated on our clock."""
        if not _is_number(age) or not _is_number(commit_index):
            return
        if age < 0:
            return  # "confirmed in the future": a forged or broken stamp proves nothing
        received = time.monotonic()
        self._freshness_pending.append((received - age, int(commit_index)))
        del self._freshness_pending[:-1000]  # bounded even while applying is stuck

    def _note_echo(self, node: Any, echo: tuple[Any, ...] | list[Any]) -> None:
        """Leader: a follower acknowledged the append we sent at `sent_at` in `term`."""
        if len(echo) != 2 or not _is_number(echo[0]) or not _is_number(echo[1]):
            return
        sent_at, term = float(echo[0]), int(echo[1])
        if sent_at > time.monotonic():
            return  # we never sent that: an echo "from the future" confirms nothing
        previous = self._acked_sent_at.get(node, (0, 0.0))
        if (term, sent_at) > previous:
            self._acked_sent_at[node] = (term, sent_at)

    def _track_freshness(self) -> None:
        if self._isLeader():
            confirmed = self.leader_confirmed_at()
            if confirmed is not None and self.visible_index >= self.raftCommitIndex:
                self._fresher(confirmed)
            return
        pending = self._freshness_pending
        visible = self.visible_index
        caught_up = [stamp for stamp, commit in pending if commit <= visible]
        if caught_up:
            self._fresher(max(caught_up))
            self._freshness_pending = [(s, c) for s, c in pending if c > visible]

    def _fresher(self, stamp: float) -> None:
        # Only forward: the replica's state never loses writes, so having held every write
        # acknowledged by T stays true. Safe because no stamp is ever later than the moment
        # this process received its proof (ages are >= 0, echoes not from the future).
        stamp = min(stamp, time.monotonic())
        if self.fresh_as_of is None or stamp > self.fresh_as_of:
            self.fresh_as_of = stamp

    def staleness(self) -> float:
        """Seconds since this replica provably held every write acknowledged at that moment."""
        if self.fresh_as_of is None:
            return float("inf")
        return max(0.0, time.monotonic() - self.fresh_as_of)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
