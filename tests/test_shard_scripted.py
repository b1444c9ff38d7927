"""The asyncio side of a shard (`Shard`) against a scripted state machine: which proposals it makes,
when, and how their outcomes reach writers and readers. No Raft here: the tests decide when (and
whether) each proposed entry is applied, which is what the linearizability argument rests on:
a strong read is served only by a barrier proposed after the read arrived."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import FAIL_REASON

from kvstore import errors
from kvstore.config import RaftSettings, ServerSettings
from kvstore.replication import commands
from kvstore.replication import shard as shard_module
from kvstore.replication.shard import Shard
from kvstore.replication.state_machine import ReplicaSettings
from kvstore.storage.engine import Storage


class ScriptedMachine:
    """Stands in for ShardStateMachine: records each proposed entry; the test applies it."""

    def __init__(self, storage: Storage, replica: ReplicaSettings, on_applied: Any) -> None:
        self.entries: list[tuple[list[commands.Proposal], Any]] = []

    def propose(self, proposals: list[commands.Proposal], callback: Any) -> None:
        self.entries.append((proposals, callback))

    def _isLeader(self) -> bool:  # noqa: N802 (pysyncobj's name)
        return True

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
        shard = Shard(0, storage, replica, ServerSettings(**server), lambda raft: "")
        return shard, shard.machine  # type: ignore[return-value]

    yield make
    storage.close()


def _apply(shard: Shard, machine: ScriptedMachine, entry: int, index: int) -> None:
    """Report entry number `entry` as applied at log index `index` (as the tick thread would)."""
    proposals, callback = machine.entries[entry]
    results = [(index, None) for _ in proposals]
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
