"""The replicated state machine of one shard replica: pysyncobj on top of LMDB storage.

Threads: pysyncobj's tick thread applies committed entries (`apply_entry`) in log order and runs
our `_after_tick` at the end of every tick. Everything else (the asyncio loop serving gRPC) talks
to this object only through `propose()` (thread-safe in pysyncobj) and through the `on_applied`
hook it gives us, which we call after every group commit.

Group commit: all entries applied in one tick write into one LMDB transaction, committed right
after pysyncobj's apply loop (`_SyncObj__applyLogEntries`); `_after_tick` then releases the
proposers' results and the new applied index. A client is never told "done" about a write that a
read could not yet see.

Storage failures (see storage_health): an op that storage refuses deterministically gets an error
result, identically on every replica, and the log moves on. A transient failure (I/O, ENOSPC, a
full map) rolls the whole batch back before anything else in the tick (a log compaction) can see
it, and pysyncobj re-applies it after a backoff; the proposers still get their results if the
retry succeeds in time. `storage_problem()` is the health signal.

Knows nothing of gRPC.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObjConf, SyncObjException, replicated
from pysyncobj.config import FAIL_REASON

from kvstore import errors
from kvstore.config import RaftSettings, StorageSettings
from kvstore.ports import ListenError, check_can_listen
from kvstore.replication import commands, journal
from kvstore.replication.applied_position import AppliedPositionCheck, stop_diverged
from kvstore.replication.durable_log import DurableLog
from kvstore.replication.freshness import FreshnessStampingTransport, FreshnessTracking
from kvstore.replication.peer_transport import PeerIdentity, peer_password
from kvstore.replication.raft_fixes import PatchedSyncObj
from kvstore.replication.read_index import ReadIndex
from kvstore.replication.slot_moves import SlotMoves
from kvstore.replication.snapshots import SnapshotManager
from kvstore.replication.storage_health import StorageHealth, is_transient
from kvstore.storage.engine import Storage

log = logging.getLogger(__name__)

# pysyncobj pickles log entries and messages with protocol 2, which encodes every bytes object as
# a latin-1 str: ~2x the size and 6-8x the CPU of protocol 5 for binary keys and values (measured,
# docs/performance.md). Any protocol unpickles, so existing journals stay readable. A module
# global in pysyncobj.pickle (not name-mangled), read on every dumps call.
setattr(pysyncobj_pickle, "__protocol", 5)  # noqa: B010

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}  # pysyncobj's _RAFT_STATE values

# (proposer's callback, result or None, pysyncobj error code: see `proposal_fate`)
Completion = tuple[Callable[[Any, int], None], Any, int]


class ProposalFate(enum.Enum):
    """What a proposer can conclude from the error code its completion carries."""

    APPLIED = "applied"
    NOT_APPLIED = "not applied"  # known not to have applied: safe to report as a clean failure
    UNKNOWN = "unknown"  # may still apply (or have applied)


# pysyncobj failures after which the entry is known NOT to have been applied.
_CLEAN_FAILURES = frozenset(
    {
        FAIL_REASON.QUEUE_FULL,
        FAIL_REASON.MISSING_LEADER,
        FAIL_REASON.DISCARDED,
        FAIL_REASON.NOT_LEADER,
        FAIL_REASON.REQUEST_DENIED,
    }
)


def proposal_fate(error: int) -> ProposalFate:
    if error == FAIL_REASON.SUCCESS:
        return ProposalFate.APPLIED
    return ProposalFate.NOT_APPLIED if error in _CLEAN_FAILURES else ProposalFate.UNKNOWN


@dataclass
class ReplicaSettings:
    advertise: str  # this replica's Raft identity: the address peers dial
    bind: str  # the address pysyncobj listens on (differs from advertise behind a fault proxy)
    peers: list[str]
    data_dir: Path
    raft: RaftSettings
    # Backoff and give-up bounds, client-session retention (every replica of a shard must use the
    # same dedup settings, or they could disagree on a retry).
    storage: StorageSettings = field(default_factory=StorageSettings)
    # Sent and checked in every Raft handshake (peer_transport); None only in tests of bare groups.
    identity: PeerIdentity | None = None


class _ReapplyCarefully(Exception):
    """An op failed deterministically after writing: redo the batch with a savepoint per op."""


class ShardStateMachine(
    AppliedPositionCheck, ReadIndex, SlotMoves, DurableLog, FreshnessTracking, PatchedSyncObj
):
    def __init__(
        self,
        storage: Storage,
        settings: ReplicaSettings,
        on_applied: Callable[[list[Completion], int], None],
        on_fatal: Callable[[str], None] | None = None,
        on_diverged: Callable[[str], None] = stop_diverged,
    ) -> None:
        self._storage = storage
        self._settings = settings
        self._on_applied = on_applied
        self._on_diverged = on_diverged
        # Index and term of the last entry LMDB holds (term 0: unknown, a store of the previous
        # release or nothing applied yet). `_stored_term` is only for the divergence check.
        self._stored_applied, self._stored_term = storage.applied_position()
        self._position_checked = False  # the journal loaded at start checked against it (_onTick)
        self._completions: list[Completion] = []
        self._completion_indexes: list[int] = []  # log index of each completion, in step
        self._applying = 0  # index of the entry pysyncobj is applying (its callbacks follow)
        # Proposers of entries rolled back by a storage failure: answered when re-applied.
        self._awaiting_reapply: dict[int, list[Callable[[Any, int], None]]] = {}
        self._apply_failed = False
        self._bytes_since_snapshot = 0
        self._map_full = False
        self._dirty = False
        self._retry_at = 0.0  # monotonic time before which committed entries are not applied
        limits = settings.storage
        health_args = (limits.io_failure_limit_seconds, limits.io_retry_max_backoff)
        self.health = StorageHealth(*health_args, on_fatal) if on_fatal else StorageHealth(*health_args)
        self.refused_ops = 0  # ops storage refused deterministically (answered with an error)
        self._careful_through = 0  # entries up to this index are applied with a savepoint per op
        # The dedup tables key rows by request id (+ 8 bytes): longer ids LMDB would refuse.
        self._max_request_id = storage.max_key_size - 8
        # Followers' success acknowledgements held until their entries are synced: (node, next
        # index, term). Set before SyncObj.__init__ starts the tick thread.
        self._deferred_acks: list[tuple[Any, int, int, tuple[float, int] | None]] = []
        self._init_freshness()
        self._init_read_index()
        self._init_slot_moves()
        self._last_reported = 0
        self._last_refusal_log = -1e9
        self._entry_stamp = 0  # the stamp of the entry being applied (apply_entry)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The journal reserves disk space before it grows: a full disk is waited out, not a SIGBUS.
        journal.use_for(
            str(settings.data_dir / "raft.journal"),
            self.health.wait_for_disk,
            durable=settings.storage.durability == "fsync",
        )
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
            # pysyncobj retries a failed bind every second, forever, and says nothing: the node
            # would run outside its Raft group. One attempt, then waitBinded() below fails.
            maxBindRetries=1,
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
            password=peer_password(raft, settings.bind, settings.peers),  # None only with --insecure
        )
        self.peer_identity = settings.identity  # read by the transport pysyncobj creates next
        # The tick thread starts inside this call and may replay the journal at once: everything
        # apply_entry needs is set up above.
        super().__init__(settings.advertise, settings.peers, conf, transportClass=FreshnessStampingTransport)
        self._check_bound(settings.bind)
        self.addOnTickCallback(self._after_tick)

    def _check_bound(self, bind: str) -> None:
        """Raise `ListenError` if the Raft port could not be bound (its tick thread has then stopped).

        The node checked the port before opening the shard (kvstore/ports.py); this catches the
        port taken in between, where pysyncobj only logs "failed to perform initialization"."""
        try:
            self.waitBinded()  # returns at once: the first bind attempt ends inside __init__
        except SyncObjException:
            check_can_listen("raft_bind", bind)  # raises with the reason if the port is still taken
            raise ListenError("raft_bind", bind, "pysyncobj could not bind it") from None

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 (pysyncobj's names)
        if not self._position_checked:
            self._position_checked = True
            self._check_journal_at_start()
        super()._onTick(timeToWait)  # DurableLog's: the log synced, held acknowledgements sent

    # ----- the replicated method -----------------------------------------------------------

    @replicated
    def apply_entry(self, proposals: list[commands.Proposal], stamp: int = 0) -> list[commands.Result] | None:
        """`stamp`: the proposer's wall clock (µs), part of the entry so every replica expires
        client sessions alike (0 in entries from older versions: the clock stays where it was)."""
        index = self._applying = self.raftLastApplied + 1  # pysyncobj advances it after we return
        self._entry_stamp = stamp
        if self._apply_failed:
            return None  # being rolled back
        if index <= self._stored_applied:
            # Replayed after a restart, or re-received after a power cut took the log's tail:
            # LMDB already holds it, if it is the same entry (checked at LMDB's own position).
            if index == self._stored_applied:
                self._check_position(index, self._entry_term(index), "the Raft log's")
            return None
        if not isinstance(proposals, list | tuple):
            proposals = []  # not an entry we make: nothing to apply, but the log moves on
        if proposals and all(commands.is_barrier(p) for p in proposals):
            # Read barriers change nothing: no LMDB transaction, no fsync. LMDB's applied index
            # stays behind; replaying a barrier after a restart is harmless.
            return self._answered(index, [(index, None)] * len(proposals))
        try:
            results = [self._apply_proposal(index, p) for p in proposals]
            term = self._entry_term(index)
            self._storage.set_applied(index, term)
        except Exception as exc:  # transient: never raise (pysyncobj would retry at once, forever)
            # Stop applying; the batch is rolled back at the end of pysyncobj's apply loop and
            # re-applied from LMDB's index (after a backoff, unless only a savepoint was missing).
            self._storage_failed(exc, f"applying entry {index}")
            return None
        self._stored_applied, self._stored_term = index, term
        self._dirty = True
        self._count_log_bytes(proposals)
        return self._answered(index, results)

    def _answered(self, index: int, results: list[commands.Result]) -> list[commands.Result]:
        for callback in self._awaiting_reapply.pop(index, ()):
            self._completions.append((callback, results, FAIL_REASON.SUCCESS))
            self._completion_indexes.append(index)
        return results

    def _count_log_bytes(self, proposals: list[commands.Proposal]) -> None:
        self._bytes_since_snapshot += sum(commands.proposal_bytes(p) for p in proposals)
        if self._bytes_since_snapshot > self._settings.raft.compaction_max_bytes:
            self._bytes_since_snapshot = 0
            self.forceLogCompaction()  # taken at pysyncobj's next compaction check

    def _apply_proposal(self, index: int, proposal: commands.Proposal) -> commands.Result:
        """One proposal, all or nothing: what storage refuses of it leaves no trace.

        Fast path: straight into the batch. An op refused before it writes (`OpRefused`: every
        check LMDB would fail is made first) just gets its error. A deterministic failure after
        a write (not expected) rolls the batch back and re-applies it with a savepoint (LMDB
        child transaction) per proposal: ~5 us each, too dear for every write."""
        careful = index <= self._careful_through
        try:
            if careful:
                with self._storage.savepoint():
                    return self._apply_checked(index, proposal)
            return self._apply_checked(index, proposal)
        except Exception as exc:
            if is_transient(exc):
                raise  # the disk's fault, not the op's: the whole batch is retried
            if not careful and not isinstance(exc, commands.OpRefused):
                self._careful_through = index
                raise _ReapplyCarefully(exc) from exc
            return self._refused(index, exc)

    def _refused(self, index: int, exc: Exception) -> commands.Result:
        self.refused_ops += 1
        refusal = commands.refused_by_storage(exc)
        now = time.monotonic()
        if now - self._last_refusal_log > 5.0:  # a client can send many: rate-limited
            self._last_refusal_log = now
            log.warning("op at index %d refused (same on every replica): %s", index, refusal.message)
        return index, refusal

    def _apply_checked(self, index: int, proposal: commands.Proposal) -> commands.Result:
        """Apply one client request at most once (Raft dissertation §6.3): a request whose outcome
        is recorded is answered from it; a retry whose outcome may have been forgotten is refused
        with "session expired" (nothing applied); anything else applies and is recorded."""
        tag, op = commands.check_proposal(proposal, self._max_request_id)
        storage = self._storage
        if op[0] in commands.MOVE_OPS:  # proposed by a node for a move's coordinator: no request id
            return index, self.apply_move_op(index, op)
        if not commands.is_request_tag(tag):  # none, or an opaque id journaled by an older version
            return index, self.claims_refusal(op) or commands.apply_op(storage, index, op)
        request = commands.parse_tag(tag)
        stamp = self._entry_stamp
        now = storage.advance_dedup_clock(stamp if isinstance(stamp, int) and 0 <= stamp < 1 << 63 else 0)
        seen = storage.recall_outcome(request.key)
        if seen is not None:
            return seen.revision, commands.payload_of(storage, op, seen)  # a retry: apply nothing
        # A slot moving or moved away: refused, and no outcome kept (nothing applied; the retry
        # that reaches the slot's owner must apply).
        moving = self.claims_refusal(op)
        if moving is not None:
            return index, moving
        if request.retry:
            refusal = self._forgotten(request, now)
            if refusal:
                return index, commands.Refused(errors.SessionExpired.kind, refusal)
        payload = commands.apply_op(storage, index, op)
        retention = int(self._settings.storage.dedup_retention_seconds * 1e6)
        outcome = commands.outcome_of(index, op, payload)
        max_sessions = self._settings.storage.max_dedup_sessions
        storage.remember_outcome(request.key, outcome, now, retention, max_sessions)
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
            if dropped_at and dropped_at >= now - int(self._settings.storage.dedup_retention_seconds * 1e6):
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

    # ----- called from other threads --------------------------------------------------------

    def propose(self, proposals: list[commands.Proposal], callback: Callable[[Any, int], None]) -> None:
        """Submit one Raft entry. `callback(results, error)` runs after the group commit."""

        def on_done(result: Any, error: int) -> None:
            self._completions.append((callback, result, error))
            self._completion_indexes.append(self._applying)

        # The leader's wall clock, stamped here and carried in the entry: apply never reads a clock.
        self.apply_entry(proposals, int(time.time() * 1e6), callback=on_done)

    @property
    def visible_index(self) -> int:
        """Highest log index whose effects a local read sees (pysyncobj no-ops included)."""
        return max(self.raftLastApplied, self._stored_applied)

    def check_disk_for_writes(self) -> None:
        """On the leader, refuse new writes while the disk (or the LMDB map) is nearly full, or
        while its storage is failing (they could only time out as unknown outcomes).

        Raises errors.DiskFull or errors.Unavailable; nothing is proposed. Reads, barriers and
        entries already in the log are not affected: the watermark keeps room for them. Cheap:
        the free space is sampled at most every 100 ms."""
        if self._isLeader():
            refusal = self._storage.write_refusal()
            if refusal is not None:
                raise errors.DiskFull(refusal)
            problem = self.health.problem()
            if problem is not None:
                raise errors.Unavailable(f"the leader's storage is failing, writes are refused: {problem}")

    def storage_problem(self) -> str | None:
        """None while storage works; else what is failing (applying, committing, the journal).

        The node's storage health: a disk below the free-space watermark is not a problem here
        (the node serves reads and refuses writes cleanly, see `disk_refusal`)."""
        return self.health.problem()

    def disk_refusal(self) -> str | None:
        """Why this node would refuse writes for lack of space now (any role), or None."""
        return self._storage.write_refusal()

    # ----- tick thread ------------------------------------------------------------------------

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802 (replaces pysyncobj's apply loop)
        """pysyncobj's apply loop, then the group commit; a failed batch is rolled back here,
        before the log compaction later in this tick could snapshot past what LMDB holds."""
        if time.monotonic() < self._retry_at:
            return False  # backing off after a storage failure: the entries wait in the log
        applied_before = self._stored_applied
        need_send: bool = super()._SyncObj__applyLogEntries()
        if self._dirty and not self._apply_failed:
            try:
                self._storage.commit()
                self._dirty = False
                self._publish_claims()
            except Exception as exc:
                self._storage_failed(exc, "committing an apply batch")
        if self._apply_failed:
            self._roll_back_batch()
        elif self._stored_applied > applied_before:
            self.health.recovered("apply")
        # Answer the batch's writers now: the rest of the tick (sending the new commit index to
        # the followers, compaction checks) took ~0.9 ms of a 1-in-flight put's latency when
        # they were answered at its end (docs/performance.md, "The 1-in-flight latency path").
        self._report_applied()
        return need_send

    def _after_tick(self) -> None:
        self._track_freshness()
        self._report_applied()  # failures pysyncobj reported outside the apply loop, moved indexes

    def _report_applied(self) -> None:
        if self._completions or self._index_moved():
            completions, self._completions = self._completions, []
            self._completion_indexes = []
            self._on_applied(completions, self.visible_index)

    def _index_moved(self) -> bool:
        index = self.visible_index
        moved = index != self._last_reported
        self._last_reported = index
        return moved

    def _storage_failed(self, exc: BaseException, doing: str) -> None:
        self._apply_failed = True
        self._map_full = isinstance(exc, lmdb.MapFullError)
        self._failure = (doing, exc)

    def _roll_back_batch(self) -> None:
        """Undo the failed batch: nothing in it was committed, nobody is told it was."""
        doing, exc = self._failure
        try:
            self._storage.abort()
            grew = self._map_full and self._storage.grow()
            self._stored_applied, self._stored_term = self._storage.applied_position()
            self._reload_claims()
        except Exception as abort_exc:  # even the rollback failed: keep backing off
            grew, exc = False, abort_exc
        # Entries after LMDB's index were rolled back with the transaction: re-apply them.
        self._SyncObj__raftLastApplied = self._stored_applied  # noqa: SLF001 (pysyncobj private)
        self._apply_failed = False
        self._dirty = False
        # Their proposers' callbacks already fired (with no result): keep them for the re-apply.
        kept = list(zip(self._completion_indexes, self._completions, strict=True))
        self._completions, self._completion_indexes = [], []
        for index, completion in kept:
            callback, _, error = completion
            if error == FAIL_REASON.SUCCESS and index > self._stored_applied:  # rolled back
                self._awaiting_reapply.setdefault(index, []).append(callback)
            else:  # committed before the failure, or not ours (discarded): as pysyncobj said
                self._completions.append(completion)
                self._completion_indexes.append(index)
        retry_now = grew or isinstance(exc, _ReapplyCarefully)  # nothing is wrong with the disk
        delay = 0.0 if retry_now else self.health.failed("apply", doing, exc)
        self._retry_at = time.monotonic() + delay

    def _on_snapshot_installed(self, applied: int) -> None:
        self._stored_applied, self._stored_term = self._storage.applied_position()
        self._reload_claims()
        self._dirty = False
        # Entries the snapshot covers are never applied here: their proposers time out.
        for index in [i for i in self._awaiting_reapply if i <= applied]:
            del self._awaiting_reapply[index]

    # ----- status ---------------------------------------------------------------------------

    def role(self) -> str:
        return _ROLES.get(self._SyncObj__raftState, "unknown")

    def is_leader(self) -> bool:
        """This node believes it leads (not proof: a cut-off leader believes it for a while)."""
        return bool(self._isLeader())

    def current_term(self) -> int:
        return int(self.raftCurrentTerm)

    def commit_index(self) -> int:
        return int(self.raftCommitIndex)

    def log_size(self) -> int:
        """Entries in the Raft log (in memory until compaction)."""
        return int(self._getRaftLogSize())

    def tick_thread_alive(self) -> bool:
        thread = self._SyncObj__thread  # noqa: SLF001 (pysyncobj private: its tick thread)
        return thread is not None and thread.is_alive()

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return leader.address if leader is not None else None

    def leader_commit_index(self) -> int:
        if self._isLeader():
            return self.raftCommitIndex
        return self._SyncObj__leaderCommitIndex or 0
