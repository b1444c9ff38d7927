"""A durable Raft log (storage.durability = "fsync"), with real pysyncobj and LMDB in one process:
a replica's log is on disk before it acknowledges entries, and before anything applies them (the
leader counts its own copy toward the commit only once it is synced)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.cluster.local import free_ports
from kvstore.config import RaftSettings, StorageSettings
from kvstore.replication import commands, journal
from kvstore.replication.freshness import FreshnessStampingTransport
from kvstore.replication.state_machine import ReplicaSettings, ShardStateMachine
from kvstore.storage.engine import Storage

RAFT = RaftSettings(min_timeout=0.4, max_timeout=0.6, insecure=True)  # loopback, in one process


def _log_of(machine: Any) -> journal.ReservedFileJournal:
    return machine._SyncObj__raftLog  # type: ignore[no-any-return]


def _group(tmp_path: Path, durability: str) -> list[ShardStateMachine]:
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    machines = []
    for i, me in enumerate(addresses):
        settings = ReplicaSettings(
            me,
            me,
            [a for a in addresses if a != me],
            tmp_path / f"r{i}",
            RAFT,
            storage=StorageSettings(durability=durability),
        )
        storage = Storage(tmp_path / f"r{i}", fsync=durability == "fsync")
        machines.append(ShardStateMachine(storage, settings, _answer))
    return machines


def _answer(completions: list[Any], index: int) -> None:
    for callback, result, error in completions:
        callback(result, error)


def _leader(machines: list[ShardStateMachine]) -> ShardStateMachine:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        leaders = [m for m in machines if m.is_leader()]
        if leaders:
            return leaders[0]
        time.sleep(0.05)
    raise AssertionError("no leader in 15 s")


def _write(leader: ShardStateMachine, n: int) -> None:
    done = threading.Semaphore(0)
    for i in range(n):
        proposal = (b"", commands.put(b"k%d" % i, b"v"))
        leader.propose([proposal], lambda result, error: done.release())
    for _ in range(n):
        assert done.acquire(timeout=20), "a write was never answered"


@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_acks_and_applies_wait_for_the_log_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """With "fsync": every success acknowledgement leaves a synced log, and every apply finds one;
    with "none" (the control), the same checks see unsynced records, so they can fail."""
    syncs = {"acks": 0, "acks_unsynced": 0, "applies": 0, "applies_unsynced": 0, "fdatasync": 0, "appends": 0}
    real_send = FreshnessStampingTransport.send
    real_apply = ShardStateMachine._apply_proposal
    real_sync = journal._ReservedFile.sync

    def send(self: Any, node: Any, message: Any) -> bool:
        if isinstance(message, dict) and message.get("entries"):
            syncs["appends"] += 1
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("success"):
            syncs["acks"] += 1
            syncs["acks_unsynced"] += _log_of(self._syncObj)._unsynced
        return real_send(self, node, message)

    def apply(self: Any, index: int, proposal: Any) -> Any:
        syncs["applies"] += 1
        syncs["applies_unsynced"] += _log_of(self)._unsynced
        return real_apply(self, index, proposal)

    def sync(self: Any) -> None:
        syncs["fdatasync"] += 1
        real_sync(self)

    monkeypatch.setattr(FreshnessStampingTransport, "send", send)
    monkeypatch.setattr(ShardStateMachine, "_apply_proposal", apply)
    monkeypatch.setattr(journal._ReservedFile, "sync", sync)
    machines = _group(tmp_path, durability)
    try:
        leader = _leader(machines)
        _write(leader, 200)
        time.sleep(0.5)  # followers apply what the last heartbeat committed
        # Held acknowledgements still echo the append they answer: the leader stays confirmed and
        # followers fresh (bounded-staleness reads depend on it; freshness.py).
        confirmed = leader.leader_confirmed_at()
        assert confirmed is not None and time.monotonic() - confirmed < 1.0
        assert all(m.staleness() < 1.0 for m in machines if m is not leader)
    finally:
        for m in machines:
            m.destroy_synchronous()
    assert syncs["acks"] > 5 and syncs["applies"] >= 3 * 200 * 0.9
    # The proposals of a tick go to each follower in one message (pysyncobj sent one per proposal).
    assert syncs["appends"] < 200
    if durability == "fsync":
        assert syncs["acks_unsynced"] == 0 and syncs["applies_unsynced"] == 0
        # Group commit: far fewer syncs than entries times replicas (200 writes, 3 replicas).
        assert 0 < syncs["fdatasync"] < 3 * 200
    else:
        assert syncs["fdatasync"] == 0
        assert syncs["acks_unsynced"] > 0  # the control: without syncs the checks do see it
