"""The replicated state machine of one shard replica: pysyncobj on top of LMDB storage.

Threads: pysyncobj's tick thread applies committed entries (`apply_entry`) in log order and runs
our `_after_tick` at the end of every tick. Everything else (the asyncio loop serving gRPC) talks
to this object only through `propose()` (thread-safe in pysyncobj) and through the `on_applied`
hook it gives us, which we call after every group commit.

Group commit: all entries applied in one tick write into one LMDB transaction; `_after_tick`
commits it and only then releases the proposers' results and the new applied index. A client is
never told "done" about a write that a read could not yet see.

Knows nothing of gRPC.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

from kvstore.config import RaftSettings, StorageSettings
from kvstore.replication import commands
from kvstore.replication.raft_fixes import PatchedSyncObj
from kvstore.replication.snapshots import SnapshotManager
from kvstore.storage.engine import Storage

log = logging.getLogger(__name__)

# pysyncobj pickles log entries and messages with protocol 2, which encodes every bytes object as
# a latin-1 str: ~2x the size and 6-8x the CPU of protocol 5 for binary keys and values (measured,
# docs/performance.md). Any protocol unpickles, so existing journals stay readable. A module
# global in pysyncobj.pickle (not name-mangled), read on every dumps call.
setattr(pysyncobj_pickle, "__protocol", 5)  # noqa: B010

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}  # pysyncobj's _RAFT_STATE values

# (proposer's callback, result or None, pysyncobj error code)
Completion = tuple[Callable[[Any, int], None], Any, int]


@dataclass
class ReplicaSettings:
    advertise: str  # this replica's Raft identity: the address peers dial
    bind: str  # the address pysyncobj listens on (differs from advertise behind a fault proxy)
    peers: list[str]
    data_dir: Path
    raft: RaftSettings
    # Client sessions (see kvstore.storage.dedup): every replica of a shard must use the same values.
    dedup_retention: float = StorageSettings.dedup_retention_seconds
    max_dedup_sessions: int = StorageSettings.max_dedup_sessions


class _FreshnessStampingTransport(TCPTransport):
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


class ShardStateMachine(PatchedSyncObj):
    def __init__(
        self,
        storage: Storage,
        settings: ReplicaSettings,
        on_applied: Callable[[list[Completion], int], None],
    ) -> None:
        self._storage = storage
        self._settings = settings
        self._on_applied = on_applied
        self._stored_applied = storage.applied_index()  # index of the last entry LMDB holds
        self._completions: list[Completion] = []
        self._apply_failed = False
        self._bytes_since_snapshot = 0
        self._map_full = False
        self._dirty = False
        # Freshness for bounded-staleness reads, on this process's monotonic clock:
        # (when the leader was confirmed, the leader's commit index then).
        self._freshness_pending: list[tuple[float, int]] = []
        self.fresh_as_of: float | None = None
        self.answering: tuple[float, int] | None = None  # (sent_at, term) of the append being handled
        # follower -> (term, latest echoed sent_at), on our monotonic clock
        self._acked_sent_at: dict[Any, tuple[int, float]] = {}
        self._last_reported = 0
        self._last_storage_error = 0.0
        self._entry_stamp = 0  # the stamp of the entry being applied (apply_entry)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        dump = settings.data_dir / "raft.dump"
        self.snapshots = SnapshotManager(storage, dump, self._on_snapshot_installed)
        raft = settings.raft
        conf = SyncObjConf(
            appendEntriesUseBatch=False,  # replicate at once: batching adds ~100 ms per write
            # One message per entry: larger entries would go out in 64 KiB "transmission" chunks,
            # each acknowledged separately (and bypassing the raft_fixes follower fix).
            appendEntriesBatchSizeBytes=16 << 20,
            sendBufferSize=1 << 21,  # socket buffers sized for batched entries (default 64 KiB)
            recvBufferSize=1 << 21,
            journalFile=str(settings.data_dir / "raft.journal"),
            fullDumpFile=str(dump),  # always with journalFile, or state is lost after compaction
            serializer=self.snapshots.serialize,
            deserializer=self.snapshots.deserialize,
            serializeChecker=self.snapshots.check,
            useFork=False,  # gRPC servers do not survive fork()
            bindAddress=settings.bind,
            raftMinTimeout=raft.min_timeout,
            raftMaxTimeout=raft.max_timeout,
            leaderFallbackTimeout=raft.leader_fallback_timeout,
            connectionRetryTime=raft.connection_retry,
            connectionTimeout=raft.connection_timeout,
            logCompactionMinEntries=raft.compaction_min_entries,
            logCompactionMinTime=raft.compaction_min_time,
            dynamicMembershipChange=False,
            dnsCacheTime=raft.dns_cache_time,
            dnsFailCacheTime=raft.dns_fail_cache_time,
            password=raft.password or None,
        )
        # The tick thread starts inside this call and may replay the journal at once: everything
        # apply_entry needs is set up above.
        super().__init__(settings.advertise, settings.peers, conf, transportClass=_FreshnessStampingTransport)
        self.addOnTickCallback(self._after_tick)

    # ----- the replicated method -----------------------------------------------------------

    @replicated
    def apply_entry(self, proposals: list[commands.Proposal], stamp: int = 0) -> list[commands.Result] | None:
        """`stamp`: the proposer's wall clock (µs), part of the entry so every replica expires
        client sessions alike (0 in entries from older versions: the clock stays where it was)."""
        index = self.raftLastApplied + 1  # pysyncobj advances the counter after we return
        self._entry_stamp = stamp
        if index <= self._stored_applied or self._apply_failed:
            return None  # replayed after a restart (LMDB already holds it), or see _after_tick
        if all(op[0] == commands.BARRIER for _, op in proposals):
            # Read barriers change nothing: no LMDB transaction, no fsync. LMDB's applied index
            # stays behind; replaying a barrier after a restart is harmless.
            return [(index, None)] * len(proposals)
        try:
            results = [self._apply_proposal(index, p) for p in proposals]
            self._storage.set_applied(index)
        except lmdb.Error as exc:
            # Never raise from apply (pysyncobj would retry this entry forever). Stop applying;
            # _after_tick rolls back this tick and has pysyncobj re-apply it from LMDB's index.
            self._storage_failed(exc, f"applying entry {index}")
            return None
        self._stored_applied = index
        self._dirty = True
        self._count_log_bytes(proposals)
        return results

    def _count_log_bytes(self, proposals: list[commands.Proposal]) -> None:
        self._bytes_since_snapshot += sum(commands.payload_bytes(op) for _, op in proposals)
        if self._bytes_since_snapshot > self._settings.raft.compaction_max_bytes:
            self._bytes_since_snapshot = 0
            self.forceLogCompaction()  # taken at pysyncobj's next compaction check

    def _apply_proposal(self, index: int, proposal: commands.Proposal) -> commands.Result:
        """Apply one client request at most once (Raft dissertation §6.3): a request whose outcome
        is recorded is answered from it; a retry whose outcome may have been forgotten is refused
        with "session expired" (nothing applied); anything else applies and is recorded."""
        tag, op = proposal
        if not commands.is_request_tag(tag):  # none, or an opaque id journaled by an older version
            return index, self._apply_op(index, op)
        request = commands.parse_tag(tag)
        storage = self._storage
        stamp = self._entry_stamp
        now = storage.advance_dedup_clock(stamp if isinstance(stamp, int) and 0 <= stamp < 1 << 63 else 0)
        seen = storage.recall_outcome(request.key)
        if seen is not None:
            return seen.revision, commands.payload_of(storage, op, seen)  # a retry: apply nothing
        if request.retry:
            refusal = self._forgotten(request, now)
            if refusal:
                return index, (commands.SESSION_EXPIRED, refusal)
        payload = self._apply_op(index, op)
        retention = int(self._settings.dedup_retention * 1e6)
        outcome = commands.outcome_of(index, op, payload)
        storage.remember_outcome(request.key, outcome, now, retention, self._settings.max_dedup_sessions)
        return index, payload

    def _forgotten(self, request: commands.Request, now: int) -> str:
        """Why a retry without a recorded outcome might have applied before ("" if it cannot have).

        Outcomes live `dedup_retention`, longer than a client retries one write, so a retry's
        earlier attempt, had it applied, would still be on record, unless its outcome or its
        whole session was dropped early (the session cap, a leader clock jumping ahead): those
        cases are refused, never applied twice."""
        session = self._storage.session(request.client)
        if session is None:
            # Unknown: a new client whose first attempt never applied (safe to apply), or a
            # dropped session. The two look alike for a retention after any session is dropped.
            dropped_at = self._storage.session_dropped_at()
            if dropped_at and dropped_at >= now - int(self._settings.dedup_retention * 1e6):
                return (
                    "the client's session is not held here (sessions were dropped recently: evicted "
                    "by the session cap, or idle); an earlier attempt may have applied"
                )
            return ""
        if request.sequence <= session.forgotten_through:
            return (
                f"request {request.sequence} is at or below the session's forgotten sequence "
                f"{session.forgotten_through}; an earlier attempt may have applied"
            )
        return ""

    def _apply_op(self, index: int, op: commands.Op) -> object:
        try:
            return commands.apply_op(self._storage, index, op)
        except lmdb.Error:
            raise
        except Exception as exc:  # a bug in one op must not wedge the replica
            log.exception("op failed at index %d", index)
            return ("error", str(exc))

    # ----- called from other threads --------------------------------------------------------

    def propose(self, proposals: list[commands.Proposal], callback: Callable[[Any, int], None]) -> None:
        """Submit one Raft entry. `callback(results, error)` runs after the group commit."""

        def on_done(result: Any, error: int) -> None:
            self._completions.append((callback, result, error))

        # The leader's wall clock, stamped here and carried in the entry: apply never reads a clock.
        self.apply_entry(proposals, int(time.time() * 1e6), callback=on_done)

    @property
    def visible_index(self) -> int:
        """Highest log index whose effects a local read sees (pysyncobj no-ops included)."""
        return max(self.raftLastApplied, self._stored_applied)

    # ----- tick thread ------------------------------------------------------------------------

    def _after_tick(self) -> None:
        if self._dirty and not self._apply_failed:
            try:
                self._storage.commit()
                self._dirty = False
            except lmdb.Error as exc:
                self._storage_failed(exc, "committing an apply batch")
        if self._apply_failed:
            self._recover_from_storage_error()
        self._track_freshness()
        if self._completions or self._index_moved():
            completions, self._completions = self._completions, []
            self._on_applied(completions, self.visible_index)

    def _index_moved(self) -> bool:
        index = self.visible_index
        moved = index != self._last_reported
        self._last_reported = index
        return moved

    def _storage_failed(self, exc: lmdb.Error, doing: str) -> None:
        self._apply_failed = True
        self._map_full = isinstance(exc, lmdb.MapFullError)
        if time.monotonic() - self._last_storage_error > 1.0:  # a broken disk fails every tick
            log.error("storage error %s: %r (rolling back the batch, re-applying from LMDB)", doing, exc)
            self._last_storage_error = time.monotonic()

    def _recover_from_storage_error(self) -> None:
        """Undo the failed batch everywhere: nothing in it was committed, nobody is told it was."""
        self._storage.abort()
        if self._map_full:
            self._storage.grow()
        self._stored_applied = self._storage.applied_index()
        # Entries after LMDB's index were rolled back with the transaction: re-apply them.
        self._SyncObj__raftLastApplied = self._stored_applied  # noqa: SLF001 (pysyncobj private)
        self._apply_failed = False
        self._dirty = False
        # Their proposers' callbacks already fired: they will time out as "unknown outcome".
        self._completions.clear()

    def _on_snapshot_installed(self, applied: int) -> None:
        self._stored_applied = applied
        self._dirty = False

    # ----- freshness (bounded staleness) -----------------------------------------------------
    # Every time here is on this process's monotonic clock; between processes only ages travel
    # (the leader's `confirmed_age`). A wall-clock jump, or a stamp from a faster clock, cannot
    # make a replica look fresher than it is: a follower never dates its freshness after the
    # moment it received the message that proves it.

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

    # ----- status ---------------------------------------------------------------------------

    def role(self) -> str:
        return _ROLES.get(self._SyncObj__raftState, "unknown")

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return leader.address if leader is not None else None

    def leader_commit_index(self) -> int:
        if self._isLeader():
            return self.raftCommitIndex
        return self._SyncObj__leaderCommitIndex or 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
