"""One shard replica as the asyncio side sees it: propose writes, make reads as fresh as asked.

Owns the `ShardStateMachine` (tick thread) and bridges its results back onto the event loop.
- Writes: proposals made in the same loop iteration are coalesced into one Raft entry (group
  proposals), never two proposals touching one key in the same entry (revisions stay unique).
- Strong reads at the leader: a read index (read_index.py). The read waits until a majority has
  acknowledged a heartbeat sent after it arrived (so this replica was still the only leader then)
  and this replica has applied through the commit index of that moment. A partitioned old leader
  gets no majority, so it answers "unavailable", never stale data.
- Strong reads at a follower: a coalesced barrier. The read waits for a no-op entry proposed
  *after* it arrived (forwarded to the leader) to be applied locally.
- Session reads: served once the locally committed index reaches the client's token.
- Bounded reads: served while the replica's proven staleness is within the bound.

This is the whole of what the server sees of replication (after etcd raft's `Node`): `open_shard`,
then `write`, `fresh_view` (the only way to read: it makes the replica fresh enough first),
`status`, `term`, `is_leader`, `leader_client_address`, `health`. Results are typed
(`views.WriteResult`, `views.ReadView`, `views.ShardStatus`); a refused write raises its
`kvstore.errors` exception here. Knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.config import NodeConfig, ServerSettings
from kvstore.consistency import ConsistencyLevel
from kvstore.replication import commands
from kvstore.replication.backup_copy import BackupCopies, ShardCopy, TickTasks
from kvstore.replication.faults import FaultInjector
from kvstore.replication.liveness import ReplicaLiveness
from kvstore.replication.peer_transport import PeerIdentity
from kvstore.replication.slot_claims import SlotClaims
from kvstore.replication.state_machine import (
    Completion,
    ProposalFate,
    ReplicaSettings,
    ShardStateMachine,
    proposal_fate,
)
from kvstore.replication.views import ReadView, ShardStatus, WriteResult
from kvstore.storage.disk import DiskSpace
from kvstore.storage.engine import Storage
from kvstore.storage.identity import FORMAT, PeerIncarnations, open_identity, upgrade_identity

log = logging.getLogger(__name__)

_NO_QUORUM = "no quorum confirmed a strong read in time (read index or barrier)"


def open_shard(config: NodeConfig, client_address_of: Callable[[str], str]) -> Shard:
    """Open this node's replica: its LMDB storage, its Raft state machine, and the `Shard` over them.

    `client_address_of`: Raft address -> gRPC address (for redirecting writers to the leader).
    Must run on the event loop that will use the shard; `Shard.close()` closes it all."""
    data_dir = Path(config.data_dir)
    # Before anything else touches the directory: another cluster's data, or a format this version
    # cannot read, stops the node here with one line (DataDirError); a new or previous-release
    # directory gets its identity file.
    identity = open_identity(data_dir, config.cluster.id)
    peer_identity = PeerIdentity(
        config.name, config.cluster.id, identity.incarnation, PeerIncarnations(data_dir)
    )
    durable = config.storage.durability == "fsync"
    if not durable:
        log.warning(
            'UNSAFE: storage.durability = "none": nothing is synced to disk; a power cut can lose '
            "acknowledged writes and make replicas diverge (test clusters only)"
        )
    storage = Storage(
        data_dir,
        map_size=config.storage.map_size_bytes,
        fsync=durable,
        # One sync per apply batch, not two: a crash may undo the last batch (LMDB's meta page not
        # yet synced), and the durable Raft log replays it from LMDB's applied index. Snapshots
        # sync the store first (the log is compacted past what they hold).
        metasync=False,
        max_map_size=config.storage.max_map_size_bytes,
        disk=DiskSpace(data_dir, config.storage.min_free_bytes, config.storage.min_free_fraction),
        # An older format's release does not keep the slot index: whatever it wrote is indexed again.
        rebuild_slot_index=identity.format < FORMAT,
    )
    try:
        upgrade_identity(data_dir, identity)
        storage.check_key_limit(config.limits.max_key_bytes)
        replica = ReplicaSettings(
            advertise=config.raft_advertise,
            bind=config.raft_bind,
            peers=config.peers,
            data_dir=data_dir,
            raft=config.raft,
            storage=config.storage,
            identity=peer_identity,
        )
        return Shard(
            config.shard,
            storage,
            replica,
            config.server,
            client_address_of,
            max_value_bytes=config.limits.max_value_bytes,
            owns_storage=True,
        )
    except BaseException:
        storage.close()
        raise


@dataclass
class _Pending:
    request_id: bytes
    op: commands.Op
    future: asyncio.Future[WriteResult]
    size: int  # bytes of keys and values (`commands.payload_bytes`)
    held: int  # what it may hold until settled: its size, and a CAS its answer (the current value)


class AppliedIndexWatcher:
    """Futures waiting for the locally committed index to reach a value (no polling)."""

    def __init__(self) -> None:
        self.index = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def advance(self, index: int) -> None:
        self.index = max(self.index, index)
        while self._waiters and self._waiters[0][0] <= self.index:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def wait_for(self, index: int, timeout: float) -> bool:
        if self.index >= index:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (index, next(self._seq), fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            self._drop_cancelled()
            return False

    def _drop_cancelled(self) -> None:
        # Waiters for an index never reached would otherwise stay in the heap forever.
        if sum(1 for _, _, f in self._waiters if f.done()) > len(self._waiters) // 2:
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)


class Shard:
    def __init__(
        self,
        shard_id: int,
        storage: Storage,
        replica: ReplicaSettings,
        server: ServerSettings,
        client_address_of: Callable[[str], str],
        max_value_bytes: int = 0,
        owns_storage: bool = False,
    ) -> None:
        self.shard_id = shard_id
        self._storage = storage
        self._owns_storage = owns_storage  # opened by `open_shard`: closed by `close`
        self._server = server
        self._client_address_of = client_address_of  # Raft address -> gRPC address
        self._loop = asyncio.get_running_loop()
        self.applied = AppliedIndexWatcher()
        self._queue: list[_Pending] = []
        self._flush_scheduled = False
        # Writes proposed and not yet settled (applied, failed or timed out), for back-pressure.
        self._pending_count = 0
        self._pending_bytes = 0
        # A failed compare-and-set answers with the key's current value, copied when it applies:
        # counted at the largest value, so a burst of them cannot hold more than the bound.
        self._cas_answer_bytes = max_value_bytes
        self._barrier_in_flight: asyncio.Future[int] | None = None
        # The in-flight barrier while its proposal still waits in the queue: a reader arriving now
        # still precedes the proposal, so it may share that barrier instead of the next one.
        self._barrier_open: asyncio.Future[int] | None = None
        self._barrier_next: asyncio.Future[int] | None = None
        # Readers arriving in this loop iteration share one read-index request (`read_index`).
        self._read_open: asyncio.Future[int | None] | None = None
        self._view = ReadView(storage)
        self._machine = ShardStateMachine(storage, replica, self._on_applied_threadsafe)
        self._liveness = ReplicaLiveness(self._machine, server.health_stall_seconds)
        self._tick_tasks = TickTasks()
        self._machine.addOnTickCallback(self._tick_tasks.run_pending)
        self._backups = BackupCopies(storage, self._tick_tasks, self._loop)
        self._machine.snapshots.before_install = self._backups.cancel_all

    def close(self) -> None:
        """Stop the tick thread (blocking), let a running snapshot finish, close storage if ours."""
        self._machine.destroy_synchronous()
        self._machine.snapshots.wait_idle(5.0)
        self._backups.cancel_all(5.0)  # a copy's transaction must end before the store closes
        if self._owns_storage:
            self._storage.close()

    def fault_injector(self) -> FaultInjector:
        """FAULT INJECTION hooks on this replica's Raft side (server.fault_injection_signals only)."""
        return FaultInjector(self._machine)

    # ----- tick thread -> loop ---------------------------------------------------------------

    def _on_applied_threadsafe(self, completions: list[Completion], index: int) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, completions, index)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _deliver(self, completions: list[Completion], index: int) -> None:
        self.applied.advance(index)
        for callback, result, error in completions:
            callback(result, error)

    # ----- who leads ------------------------------------------------------------------------

    @property
    def term(self) -> int:
        """The Raft term this replica is in."""
        return self._machine.current_term()

    def is_leader(self) -> bool:
        return self._machine.is_leader()

    @property
    def claims(self) -> SlotClaims:
        """This replica's claims on moving slot ranges, as of its last committed apply batch."""
        return self._machine.claims

    def leader_client_address(self) -> str:
        raft_address = self._machine.leader_address()
        return self._client_address_of(raft_address) if raft_address else ""

    def ensure_leader(self) -> None:
        if not self._machine.is_leader():
            raise errors.NotLeader(leader=self.leader_client_address())

    # ----- writes ----------------------------------------------------------------------------

    async def write(self, op: commands.Op, request_tag: bytes = b"") -> WriteResult:
        """Propose `op` through Raft; returns once it is applied and committed here.

        `request_tag`: `commands.request_tag(request id, retry)`, or b"" (not deduplicated).
        Raises NotLeader on a follower; DiskFull or Unavailable while the leader's disk is nearly
        full or its storage failing; the op's own typed error when storage refused it (nothing
        written). Refused with `Overloaded` (nothing proposed) while `max_pending_proposals`
        writes, or `max_pending_bytes` of keys and values, wait to be applied: a leader that cannot
        keep up pushes back instead of queueing without end. A write always goes when none is pending."""
        self.ensure_leader()
        self._machine.check_disk_for_writes()
        size = commands.payload_bytes(op)
        held = size + self._cas_answer_bytes if op[0] == commands.CAS else size
        server = self._server
        if self._pending_count and (
            self._pending_count >= server.max_pending_proposals
            or self._pending_bytes + held > server.max_pending_bytes
        ):
            raise errors.Overloaded(
                f"shard {self.shard_id} leader has {self._pending_count} writes "
                f"({self._pending_bytes} bytes) waiting to be applied, its limit "
                f"(server.max_pending_proposals {server.max_pending_proposals}, "
                f"server.max_pending_bytes {server.max_pending_bytes}): nothing was proposed, retry later"
            )
        # No per-write wait_for: one timer per Raft entry fails the entry's futures instead
        # (`_flush`); a task and a shield per write cost ~8% of a busy leader's CPU.
        return await self._enqueue(request_tag, op, size, held)

    def _enqueue(
        self, request_id: bytes, op: commands.Op, size: int = 0, held: int = 0
    ) -> asyncio.Future[WriteResult]:
        future: asyncio.Future[WriteResult] = self._loop.create_future()
        self._queue.append(_Pending(request_id, op, future, size, held))
        self._pending_count += 1
        self._pending_bytes += held
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._barrier_open = None  # its proposal goes out now: later readers need a later one
        queue, self._queue = self._queue, []
        limits = (self._server.max_entry_proposals, self._server.max_entry_bytes)
        for entry in _group_into_entries(queue, *limits):
            settled = _Settled(self, entry)
            timer = self._loop.call_later(self._server.write_timeout, self._time_out, entry, settled)
            try:
                self._machine.propose(
                    [(p.request_id, p.op) for p in entry], self._completion_for(entry, timer, settled)
                )
            except Exception as exc:  # never leave a proposer waiting for an entry that was not made
                log.exception("proposing an entry failed")
                timer.cancel()
                settled()
                for pending in entry:
                    if not pending.future.done():
                        pending.future.set_exception(errors.Unavailable(f"not proposed: {exc}"))

    def _time_out(self, entry: list[_Pending], settled: _Settled) -> None:
        settled()
        for pending in entry:
            if not pending.future.done():
                pending.future.set_exception(
                    errors.UnknownOutcome(
                        f"write not applied within {self._server.write_timeout}s; it may still apply"
                    )
                )

    def _completion_for(
        self, entry: list[_Pending], timer: asyncio.TimerHandle, settled: _Settled
    ) -> Callable[[Any, int], None]:
        def complete(results: Any, error: int) -> None:
            timer.cancel()
            settled()
            fate = proposal_fate(error)
            for i, pending in enumerate(entry):
                if pending.future.done():
                    continue
                if fate is ProposalFate.APPLIED and results is not None:
                    revision, payload = results[i]
                    if isinstance(payload, commands.Refused):
                        pending.future.set_exception(payload.error())
                    else:
                        pending.future.set_result(WriteResult(revision, payload))
                elif fate is ProposalFate.NOT_APPLIED:
                    pending.future.set_exception(
                        errors.Unavailable(f"not applied: leadership changed (pysyncobj reason {error})")
                    )
                else:
                    pending.future.set_exception(
                        errors.UnknownOutcome(f"outcome unknown (pysyncobj reason {error})")
                    )

        return complete

    # ----- reads -----------------------------------------------------------------------------

    async def fresh_view(
        self, consistency: ConsistencyLevel, session_index: int = 0, max_staleness: float = 0.0
    ) -> ReadView:
        """Read access to this replica once a local read satisfies `consistency` (waiting for it
        if need be), or raise: ReplicaBehind, Unavailable (no quorum), InvalidArgument.

        `session_index`: the client's token for this shard (session reads); `max_staleness`:
        seconds (bounded reads)."""
        if consistency == ConsistencyLevel.STRONG:
            if not self._machine.is_leader():
                await self.barrier()
            elif self._server.unsafe_local_strong_reads:
                pass  # the planted bug (ServerSettings.unsafe_local_strong_reads): no check at all
            elif await self.read_index() is None:
                await self.barrier()  # no longer the leader: as a follower does
        elif consistency == ConsistencyLevel.SESSION:
            if not await self.applied.wait_for(session_index, self._server.session_wait):
                raise errors.ReplicaBehind(
                    f"replica at index {self.applied.index} has not reached session index {session_index}"
                )
        elif consistency == ConsistencyLevel.BOUNDED:
            staleness = self._machine.staleness()
            if staleness > max_staleness:
                raise errors.ReplicaBehind(
                    f"replica staleness {staleness:.3f}s exceeds the bound {max_staleness:.3f}s"
                )
        elif consistency != ConsistencyLevel.EVENTUAL:
            raise errors.InvalidArgument(f"unknown consistency level {consistency}")
        return self._view

    async def read_index(self) -> int | None:
        """Leader: wait until a strong read arriving now may read locally, and return the index it
        sees (read_index.py); None if this replica turned out not to lead. Raises Unavailable if no
        majority confirmed the leadership, or the replica did not apply that far, in time.

        Coalesced: the readers of one loop iteration share one request, made after the last of
        them arrived (its time is the one a heartbeat must follow)."""
        future = self._read_open
        if future is None:
            future = self._read_open = self._loop.create_future()
            self._loop.call_soon(self._ask_read_index, future)
            timer = self._loop.call_later(self._server.read_barrier_timeout, _fail_unless_done, future)
            future.add_done_callback(lambda _: timer.cancel())
        index = await asyncio.shield(future)
        if index is not None and not await self.applied.wait_for(index, self._server.read_barrier_timeout):
            raise errors.Unavailable(f"replica did not apply through read index {index} in time")
        return index

    def _ask_read_index(self, future: asyncio.Future[int | None]) -> None:
        self._read_open = None  # readers from now on arrived after this request: they need the next

        def answer(index: int | None) -> None:  # on the tick thread
            try:
                self._loop.call_soon_threadsafe(_set_unless_done, future, index)
            except RuntimeError:
                pass  # loop closed during shutdown

        self._machine.read_index(answer)

    async def barrier(self) -> int:
        """Linearizable read point: index of a no-op entry proposed after this call, applied here.

        Coalesced: readers share the barrier whose proposal has not gone out yet (it was made in
        this loop iteration); once it has, new readers wait for the *next* one, so one Raft round
        serves all the reads that arrive during the previous round."""
        if self._barrier_open is not None:
            future = self._barrier_open
        elif self._barrier_in_flight is None:
            future = self._barrier_in_flight = self._barrier_open = self._start_barrier()
        else:
            if self._barrier_next is None:
                self._barrier_next = self._loop.create_future()
            future = self._barrier_next
        # Each barrier has its own expiry timer (`_start_barrier`), so this wait is bounded
        # without a per-read wait_for; the shield keeps one cancelled reader from cancelling it.
        return await asyncio.shield(future)

    def _start_barrier(self) -> asyncio.Future[int]:
        result: asyncio.Future[int] = self._loop.create_future()
        proposal = self._enqueue(b"", commands.barrier())

        def done(f: asyncio.Future[WriteResult]) -> None:
            if result.done():
                return  # expired first; _expire_barrier already moved on
            if f.exception() is not None:
                result.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                result.set_result(f.result().revision)
            if self._barrier_in_flight is result:
                self._barrier_finished()

        proposal.add_done_callback(done)
        # A barrier that never completes (lost leader) must not block later readers forever.
        self._loop.call_later(self._server.read_barrier_timeout, self._expire_barrier, result)
        return result

    def _expire_barrier(self, barrier: asyncio.Future[int]) -> None:
        if not barrier.done():
            barrier.set_exception(errors.Unavailable(_NO_QUORUM))
            if self._barrier_in_flight is barrier:
                # The readers queued behind it fail now too, rather than wait for a whole new
                # round: no reader waits much longer than read_barrier_timeout for an answer.
                waiting, self._barrier_next = self._barrier_next, None
                if waiting is not None and not waiting.done():
                    waiting.set_exception(errors.Unavailable(_NO_QUORUM))
                self._barrier_finished()

    def _barrier_finished(self) -> None:
        waiting, self._barrier_next = self._barrier_next, None
        self._barrier_in_flight = None
        if waiting is not None:
            self._barrier_in_flight = self._barrier_open = self._start_barrier()
            self._barrier_in_flight.add_done_callback(lambda f: _copy_outcome(f, waiting))

    # ----- online backup ---------------------------------------------------------------------

    async def backup_copy(self) -> ShardCopy:
        """Start copying this replica's store (kvstore backup): the copy holds every write
        acknowledged before this call (a read barrier first, as a strong read), at one applied
        index (`ShardCopy.applied_index`). Read it with `read_chunk`, then `finish`; always
        `release_backup_copy` it. Raises Overloaded (a copy already runs here) or Unavailable."""
        return await self._backups.start(self.barrier, self._server.read_barrier_timeout)

    def release_backup_copy(self, copy: ShardCopy) -> None:
        self._backups.release(copy)

    # ----- status ----------------------------------------------------------------------------

    def status(self) -> ShardStatus:
        machine = self._machine
        staleness = machine.staleness()
        return ShardStatus(
            role=machine.role(),
            term=machine.current_term(),
            leader_raft_address=machine.leader_address() or "",
            leader_address=self.leader_client_address(),
            commit_index=machine.commit_index(),
            applied_index=self._storage.applied_index(),
            leader_commit_index=machine.leader_commit_index(),
            staleness_seconds=-1.0 if staleness == float("inf") else staleness,
            key_count=self._storage.key_count(),
            raft_log_size=machine.log_size(),
        )

    # ----- health ----------------------------------------------------------------------------

    def stuck(self) -> str | None:
        """Why this replica's Raft side is stuck (tick thread dead or stalled, applies not moving)."""
        return self._liveness.problem(self._machine.tick_thread_alive())

    def health(self) -> tuple[bool, str]:
        """(serving, why not): serving while not stuck and storage takes writes."""
        problem = self.stuck() or self._machine.storage_problem()
        return (problem is None, problem or "")


class _Settled:
    """Releases an entry's share of the shard's pending-write bounds, once (at completion, at
    its timeout or when proposing failed, whichever comes first)."""

    __slots__ = ("_shard", "_count", "_bytes")

    def __init__(self, shard: Shard, entry: list[_Pending]) -> None:
        self._shard = shard
        self._count = len(entry)
        self._bytes = sum(p.held for p in entry)

    def __call__(self) -> None:
        if self._shard is not None:
            self._shard._pending_count -= self._count
            self._shard._pending_bytes -= self._bytes
            self._shard = None  # type: ignore[assignment]


def _set_unless_done(future: asyncio.Future[int | None], index: int | None) -> None:
    if not future.done():
        future.set_result(index)


def _fail_unless_done(future: asyncio.Future[int | None]) -> None:
    if not future.done():
        future.set_exception(errors.Unavailable(_NO_QUORUM))


def _copy_outcome(source: asyncio.Future[int], target: asyncio.Future[int]) -> None:
    if target.done():
        return
    if source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _group_into_entries(queue: list[_Pending], max_proposals: int, max_bytes: int) -> list[list[_Pending]]:
    """Split proposals into Raft entries: bounded size, and no key written twice in one entry."""
    entries: list[list[_Pending]] = []
    current: list[_Pending] = []
    keys: set[bytes] = set()
    size = 0
    for pending in queue:
        touched = tuple(commands.touched_keys(pending.op))  # read twice below
        op_size = pending.size
        if current and (
            len(current) >= max_proposals or size + op_size > max_bytes or not keys.isdisjoint(touched)
        ):
            entries.append(current)
            current, keys, size = [], set(), 0
        current.append(pending)
        keys.update(touched)
        size += op_size
    if current:
        entries.append(current)
    return entries
