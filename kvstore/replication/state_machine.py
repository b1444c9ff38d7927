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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObjConf, replicated

from kvstore.config import RaftSettings, StorageSettings
from kvstore.replication import commands
from kvstore.replication.peer_transport import SecurePeerTransport, peer_password
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
    dedup_window: int = StorageSettings.dedup_window_ids  # request ids kept


class _FreshnessStampingTransport(SecurePeerTransport):
    """Carries what bounded-staleness reads need (pysyncobj ignores unknown message keys):
    - on append-entries from the leader: `sent_at`, its wall-clock send time, and `confirmed_at`,
      the latest send time a majority has acknowledged (see `leader_confirmed_at`);
    - on the follower's acknowledgement: `echo`, the (sent_at, term) of the append it answers."""

    def send(self, node: Any, message: Any) -> bool:
        if isinstance(message, dict):
            kind = message.get("type")
            if kind == "append_entries":
                message["sent_at"] = time.time()
                message["confirmed_at"] = self._syncObj.leader_confirmed_at()
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
        # Freshness for bounded-staleness reads: (wall time the leader was confirmed, its commit index).
        self._freshness_pending: list[tuple[float, int]] = []
        self.fresh_as_of = 0.0
        self.answering: tuple[float, int] | None = None  # (sent_at, term) of the append being handled
        self._acked_sent_at: dict[Any, tuple[int, float]] = {}  # follower -> (term, latest echoed sent_at)
        self._last_reported = 0
        self._last_storage_error = 0.0
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
            password=peer_password(raft, settings.bind, settings.peers),  # None only with --insecure
        )
        # The tick thread starts inside this call and may replay the journal at once: everything
        # apply_entry needs is set up above.
        super().__init__(settings.advertise, settings.peers, conf, transportClass=_FreshnessStampingTransport)
        self.addOnTickCallback(self._after_tick)

    # ----- the replicated method -----------------------------------------------------------

    @replicated
    def apply_entry(self, proposals: list[commands.Proposal]) -> list[commands.Result] | None:
        index = self.raftLastApplied + 1  # pysyncobj advances the counter after we return
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
        request_id, op = proposal
        if request_id:
            seen = self._storage.recall_request(request_id)
            if seen is not None:
                return seen  # a retried write: report the first outcome, apply nothing
        try:
            payload = commands.apply_op(self._storage, index, op)
        except lmdb.Error:
            raise
        except Exception as exc:  # a bug in one op must not wedge the replica
            log.exception("op failed at index %d", index)
            payload = ("error", str(exc))
        result = (index, payload)
        if request_id:
            self._storage.remember_request(request_id, index, payload, self._settings.dedup_window)
        return result

    # ----- called from other threads --------------------------------------------------------

    def propose(self, proposals: list[commands.Proposal], callback: Callable[[Any, int], None]) -> None:
        """Submit one Raft entry. `callback(results, error)` runs after the group commit."""

        def on_done(result: Any, error: int) -> None:
            self._completions.append((callback, result, error))

        self.apply_entry(proposals, callback=on_done)

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

    def leader_confirmed_at(self) -> float:
        """The latest wall-clock time T at which this node provably was the only leader: a
        majority acknowledged appends we sent at T or later in our current term (0: none yet).

        A follower that answers an append sent at T was still in our term after T, so no other
        leader could have been elected before T; every write acknowledged to a client before T was
        acknowledged by us, so it is within our commit index."""
        if not self._isLeader():
            return 0.0
        noop_index = self._SyncObj__noopIDx
        if noop_index is None or self.raftCommitIndex < noop_index:
            return 0.0  # until our term commits an entry, our commit index may lag the true one
        needed = (len(self._settings.peers) + 1) // 2  # acknowledgements needed besides our own
        if needed == 0:
            return time.time()
        term = self.raftCurrentTerm
        stamps = sorted((t for term_of, t in self._acked_sent_at.values() if term_of == term), reverse=True)
        return stamps[needed - 1] if len(stamps) >= needed else 0.0

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if not isinstance(message, dict):
            super()._SyncObj__onMessageReceived(node, message)
            return
        kind = message.get("type")
        if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            if message.get("confirmed_at"):
                self._freshness_pending.append((message["confirmed_at"], message["commit_index"]))
                del self._freshness_pending[:-1000]  # bounded even while applying is stuck
            if "sent_at" in message:
                self.answering = (message["sent_at"], message["term"])
        elif kind == "next_node_idx" and isinstance(message.get("echo"), tuple | list):
            sent_at, term = message["echo"]
            previous = self._acked_sent_at.get(node, (0, 0.0))
            if (term, sent_at) > previous:
                self._acked_sent_at[node] = (term, sent_at)
        try:
            super()._SyncObj__onMessageReceived(node, message)
        finally:
            self.answering = None

    def _track_freshness(self) -> None:
        if self._isLeader():
            confirmed = self.leader_confirmed_at()
            if self.visible_index >= self.raftCommitIndex:
                self.fresh_as_of = max(self.fresh_as_of, confirmed)
            return
        pending = self._freshness_pending
        visible = self.visible_index
        caught_up = [stamp for stamp, commit in pending if commit <= visible]
        if caught_up:
            self.fresh_as_of = max(self.fresh_as_of, max(caught_up))
            self._freshness_pending = [(s, c) for s, c in pending if c > visible]

    def staleness(self) -> float:
        """Seconds since this replica provably held every write acknowledged at that moment."""
        if self.fresh_as_of == 0.0:
            return float("inf")
        return max(0.0, time.time() - self.fresh_as_of)

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
