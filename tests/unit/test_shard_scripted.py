"""The asyncio side of a shard (`Shard`) against a scripted state machine: which proposals it makes,
when, and how their outcomes reach writers and readers. No Raft here: the tests decide when (and
whether) each proposed entry is applied, which is what the linearizability argument rests on:
a strong read is served only by a barrier proposed after the read arrived (a follower), or by a
read index asked for after it arrived and applied here (the leader)."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import FAIL_REASON

from kvstore import errors
from kvstore.config import RaftSettings, ServerSettings
from kvstore.consistency import ConsistencyLevel
from kvstore.replication import commands
from kvstore.replication import shard as shard_module
from kvstore.replication.shard import Shard
from kvstore.replication.state_machine import ReplicaSettings
from kvstore.replication.views import ShardStatus, WriteResult
from kvstore.storage.engine import Storage


class ScriptedMachine:
    """Stands in for ShardStateMachine: records each proposed entry; the test applies it."""

    def __init__(self, storage: Storage, replica: ReplicaSettings, on_applied: Any) -> None:
        self.entries: list[tuple[list[commands.Proposal], Any]] = []
        self.read_requests: list[Any] = []
        self.leader = True
        self.disk_refusal: str | None = None
        self.stale_for = float("inf")
        # What the shard wires backup copies to (replication/backup_copy.py).
        self.snapshots = types.SimpleNamespace(before_install=None, wait_idle=lambda timeout: None)

    def propose(self, proposals: list[commands.Proposal], callback: Any) -> None:
        self.entries.append((proposals, callback))

    def read_index(self, callback: Any) -> None:
        self.read_requests.append(callback)  # the test answers, as the tick thread would

    def is_leader(self) -> bool:
        return self.leader

    def check_disk_for_writes(self) -> None:
        if self.disk_refusal is not None:
            raise errors.DiskFull(self.disk_refusal)

    def staleness(self) -> float:
        return self.stale_for

    def role(self) -> str:
        return "leader" if self.leader else "follower"

    def current_term(self) -> int:
        return 3

    def commit_index(self) -> int:
        return 12

    def leader_commit_index(self) -> int:
        return 12

    def leader_address(self) -> str | None:
        return "10.0.0.1:7000" if self.leader else None

    def log_size(self) -> int:
        return 5

    def addOnTickCallback(self, callback: Any) -> None:  # noqa: N802 (the liveness check's hook)
        pass  # no tick thread here: the script applies entries itself


async def _settle() -> None:
    for _ in range(5):  # let tasks run and the shard's call_soon flush happen
        await asyncio.sleep(0)


@pytest.fixture
async def make_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(shard_module, "ShardStateMachine", ScriptedMachine)
    storage = Storage(tmp_path / "data", fsync=False)
    replica = ReplicaSettings("127.0.0.1:1", "127.0.0.1:1", [], tmp_path, RaftSettings())

    def make(**server: Any) -> tuple[Shard, ScriptedMachine]:
        shard = Shard(0, storage, replica, ServerSettings(**server), lambda raft: f"client-of-{raft}")
        return shard, shard._machine  # type: ignore[return-value]

    yield make
    storage.close()


def _apply(
    shard: Shard, machine: ScriptedMachine, entry: int, index: int, payloads: list[Any] | None = None
) -> None:
    """Report entry number `entry` as applied at log index `index` (as the tick thread would)."""
    proposals, callback = machine.entries[entry]
    results = [(index, p) for p in (payloads or [None] * len(proposals))]
    shard._deliver([(callback, results, FAIL_REASON.SUCCESS)], index)


async def test_reads_of_one_iteration_share_a_barrier_and_later_reads_wait_for_the_next(
    make_shard: Any,
) -> None:
    shard, machine = make_shard()
    first = [asyncio.ensure_future(shard.barrier()) for _ in range(3)]  # same loop iteration
    await _settle()
    assert len(machine.entries) == 1  # one barrier proposed for all three
    late = asyncio.ensure_future(shard.barrier())  # arrives after that proposal left
    await _settle()
    assert len(machine.entries) == 1  # it must not join the in-flight barrier, nor start a second
    _apply(shard, machine, 0, index=7)
    await _settle()
    assert [f.result() for f in first] == [7, 7, 7]
    assert not late.done()
    assert len(machine.entries) == 2  # the next barrier, proposed after `late` arrived
    assert machine.entries[1][0] == [(b"", commands.barrier())]
    _apply(shard, machine, 1, index=9)
    assert await late == 9


async def test_a_read_after_the_barrier_finished_starts_a_new_one(make_shard: Any) -> None:
    shard, machine = make_shard()
    read = asyncio.ensure_future(shard.barrier())
    await _settle()
    _apply(shard, machine, 0, index=3)
    assert await read == 3
    again = asyncio.ensure_future(shard.barrier())
    await _settle()
    assert len(machine.entries) == 2 and not again.done()
    _apply(shard, machine, 1, index=4)
    assert await again == 4


async def test_a_barrier_without_quorum_fails_its_readers_and_those_queued_behind(make_shard: Any) -> None:
    shard, machine = make_shard(read_barrier_timeout=0.3)
    in_flight = asyncio.ensure_future(shard.barrier())
    await _settle()
    queued = asyncio.ensure_future(shard.barrier())
    started = asyncio.get_running_loop().time()
    for reader in (in_flight, queued):
        with pytest.raises(errors.Unavailable):
            await reader
    # Both answered once the in-flight barrier expired, not a whole second round later.
    assert asyncio.get_running_loop().time() - started < 0.5  # a second round would end at 0.6


async def test_writes_of_one_iteration_are_one_entry_and_each_gets_its_result(make_shard: Any) -> None:
    shard, machine = make_shard()
    writes = [
        asyncio.ensure_future(shard.write(commands.put(b"k%d" % i, b"v"), b"id%d" % i)) for i in range(3)
    ]
    await _settle()
    assert len(machine.entries) == 1 and len(machine.entries[0][0]) == 3
    writes[1].cancel()  # the caller went away: the others must not notice
    await _settle()
    _apply(shard, machine, 0, index=11)
    assert await writes[0] == (11, None) and await writes[2] == (11, None)
    assert writes[1].cancelled()


async def test_a_write_not_applied_in_time_is_an_unknown_outcome(make_shard: Any) -> None:
    shard, machine = make_shard(write_timeout=0.1)
    write = asyncio.ensure_future(shard.write(commands.put(b"k", b"v"), b"id"))
    with pytest.raises(errors.UnknownOutcome, match="may still apply"):
        await write
    _apply(shard, machine, 0, index=5)  # a late apply is ignored, it reaches nobody
    await _settle()


async def test_a_write_whose_leadership_was_lost_is_reported_not_applied(make_shard: Any) -> None:
    shard, machine = make_shard()
    write = asyncio.ensure_future(shard.write(commands.put(b"k", b"v"), b"id"))
    await _settle()
    proposals, callback = machine.entries[0]
    shard._deliver([(callback, None, FAIL_REASON.NOT_LEADER)], 0)
    with pytest.raises(errors.Unavailable, match="not applied"):
        await write


async def test_a_write_whose_outcome_pysyncobj_cannot_tell_is_an_unknown_outcome(make_shard: Any) -> None:
    shard, machine = make_shard()
    write = asyncio.ensure_future(shard.write(commands.put(b"k", b"v"), b"id"))
    await _settle()
    proposals, callback = machine.entries[0]
    shard._deliver([(callback, None, FAIL_REASON.UNKNOWN_OUTCOME)], 0)
    with pytest.raises(errors.UnknownOutcome):
        await write


async def test_a_refused_op_raises_its_typed_error_and_its_entry_mates_get_results(make_shard: Any) -> None:
    shard, machine = make_shard()
    writes = [asyncio.ensure_future(shard.write(commands.put(b"k%d" % i, b"v"))) for i in range(3)]
    await _settle()
    payloads = [
        None,
        commands.Refused(errors.InvalidArgument.kind, "key too long"),
        commands.Refused(errors.SessionExpired.kind, "gone"),
    ]
    _apply(shard, machine, 0, index=8, payloads=payloads)
    assert await writes[0] == WriteResult(8, None)
    with pytest.raises(errors.InvalidArgument, match="key too long"):
        await writes[1]
    with pytest.raises(errors.SessionExpired, match="gone"):
        await writes[2]


async def test_writes_are_refused_before_proposing_on_a_follower_or_a_full_disk(make_shard: Any) -> None:
    shard, machine = make_shard()
    machine.leader = False
    with pytest.raises(errors.NotLeader):
        await shard.write(commands.put(b"k", b"v"))
    machine.leader, machine.disk_refusal = True, "disk below its watermark"
    with pytest.raises(errors.DiskFull, match="watermark"):
        await shard.write(commands.put(b"k", b"v"))
    await _settle()
    assert machine.entries == []  # nothing was proposed


async def test_a_view_is_handed_out_only_once_the_replica_is_fresh_enough(make_shard: Any) -> None:
    shard, machine = make_shard(session_wait=0.2)
    machine.leader = False
    # strong, at a follower: only after a barrier proposed after the read arrived is applied
    strong = asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG))
    await _settle()
    assert not strong.done() and machine.entries[0][0] == [(b"", commands.barrier())]
    _apply(shard, machine, 0, index=4)
    view = await strong
    assert view.get(b"absent") == (None, 0)
    # session: once the applied index reaches the token, else ReplicaBehind
    with pytest.raises(errors.ReplicaBehind):
        await shard.fresh_view(ConsistencyLevel.SESSION, session_index=5)
    assert await shard.fresh_view(ConsistencyLevel.SESSION, session_index=4) is view
    # bounded: only within the bound
    with pytest.raises(errors.ReplicaBehind):
        await shard.fresh_view(ConsistencyLevel.BOUNDED, max_staleness=1.0)
    machine.stale_for = 0.5
    assert await shard.fresh_view(ConsistencyLevel.BOUNDED, max_staleness=1.0) is view
    # eventual: at once
    assert await shard.fresh_view(ConsistencyLevel.EVENTUAL) is view
    with pytest.raises(errors.InvalidArgument):
        await shard.fresh_view(7)  # type: ignore[arg-type]
    assert len(machine.entries) == 1  # only the strong read proposed anything


async def test_status_is_typed(make_shard: Any) -> None:
    shard, machine = make_shard()
    status = shard.status()
    assert status == ShardStatus(
        role="leader",
        term=3,
        leader_raft_address="10.0.0.1:7000",
        leader_address="client-of-10.0.0.1:7000",
        commit_index=12,
        applied_index=0,
        leader_commit_index=12,
        staleness_seconds=-1.0,  # never proven fresh
        key_count=0,
        raft_log_size=5,
    )
    assert shard.term == 3 and shard.is_leader()


def _answer_read_index(shard: Shard, machine: ScriptedMachine, request: int, index: int | None) -> None:
    """Answer read-index request number `request` (on the tick thread, in the node)."""
    machine.read_requests[request](index)


async def test_a_strong_read_at_the_leader_waits_for_its_read_index_and_proposes_nothing(
    make_shard: Any,
) -> None:
    shard, machine = make_shard()
    reads = [asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG)) for _ in range(3)]
    await _settle()
    assert len(machine.read_requests) == 1  # one request for the reads of one loop iteration
    late = asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG))
    await _settle()
    assert len(machine.read_requests) == 2  # it arrived after the first request: it needs its own
    _answer_read_index(shard, machine, 0, 7)
    await _settle()
    assert not any(r.done() for r in reads)  # confirmed, but not applied through 7 yet
    shard._deliver([], 6)
    await _settle()
    assert not any(r.done() for r in reads)
    shard._deliver([], 7)
    await _settle()
    assert all(r.done() for r in reads) and not late.done()
    _answer_read_index(shard, machine, 1, 7)
    await _settle()
    assert late.done()
    assert machine.entries == []  # no barrier entry


async def test_a_strong_read_whose_leader_stepped_down_falls_back_to_a_barrier(make_shard: Any) -> None:
    shard, machine = make_shard()
    read = asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG))
    await _settle()
    machine.leader = False
    _answer_read_index(shard, machine, 0, None)
    await _settle()
    assert not read.done() and machine.entries[0][0] == [(b"", commands.barrier())]
    _apply(shard, machine, 0, index=9)
    await read


async def test_a_read_index_never_confirmed_fails_the_read_as_unavailable(make_shard: Any) -> None:
    shard, machine = make_shard(read_barrier_timeout=0.3)
    read = asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG))
    with pytest.raises(errors.Unavailable, match="no quorum"):
        await asyncio.wait_for(read, 5)
    _answer_read_index(shard, machine, 0, 3)  # a late answer changes nothing
    await _settle()


async def test_a_read_index_not_applied_in_time_fails_the_read_as_unavailable(make_shard: Any) -> None:
    shard, machine = make_shard(read_barrier_timeout=0.3)
    read = asyncio.ensure_future(shard.fresh_view(ConsistencyLevel.STRONG))
    await _settle()
    _answer_read_index(shard, machine, 0, 50)
    with pytest.raises(errors.Unavailable, match="read index 50"):
        await asyncio.wait_for(read, 5)
