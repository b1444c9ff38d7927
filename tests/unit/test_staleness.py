"""Bounded staleness from monotonic ages (issue 12): a leader's wall clock, a jump of it, or a forged
stamp cannot make a follower report itself fresher than it provably is.

Drives the state machine's freshness handling directly (its message handler and the transport's
stamping), with pysyncobj's own state set by hand: no sockets, so the clocks can be lied to; and
with real node processes whose wall clocks run a day ahead."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvstore.replication import state_machine
from kvstore.replication.freshness import FreshnessStampingTransport
from kvstore.replication.raft_fixes import PatchedSyncObj
from kvstore.replication.state_machine import ShardStateMachine


@pytest.fixture(autouse=True)
def _no_raft_below(monkeypatch: pytest.MonkeyPatch) -> None:
    """pysyncobj's own message handling (below our override) is not under test: stub it."""
    monkeypatch.setattr(PatchedSyncObj, "_SyncObj__onMessageReceived", lambda self, node, message: None)


def _follower(applied: int = 10) -> ShardStateMachine:
    machine = ShardStateMachine.__new__(ShardStateMachine)  # no tick thread, no sockets
    machine._SyncObj__raftCurrentTerm = 1
    machine.answering = None
    machine._freshness_pending = []
    machine.fresh_as_of = None
    machine._acked_sent_at = {}
    machine._stored_applied = applied
    machine._SyncObj__raftLastApplied = applied
    machine._isLeader = lambda: False  # type: ignore[method-assign]
    return machine


def _receive(machine: ShardStateMachine, **fields: Any) -> None:
    """An append-entries from the leader of term 1 arrives, then the tick ends."""
    machine._SyncObj__onMessageReceived("leader", {"type": "append_entries", "term": 1, **fields})
    machine._track_freshness()


def test_age_is_dated_on_the_followers_clock_at_receipt() -> None:
    machine = _follower()
    _receive(machine, confirmed_age=2.0, commit_index=10)
    assert 2.0 <= machine.staleness() < 2.5


def test_a_stamp_from_the_future_is_refused() -> None:
    machine = _follower()
    _receive(machine, confirmed_age=-3600.0, commit_index=10)  # "confirmed an hour from now"
    assert machine.staleness() == float("inf")
    for forged in (float("nan"), float("inf"), "0", None, True):
        _receive(machine, confirmed_age=forged, commit_index=10)
    assert machine.staleness() == float("inf")


def test_a_far_future_wall_clock_stamp_is_not_freshness(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old protocol's field: an absolute wall-clock time. A leader whose clock jumped a day
    # ahead (or a forger) sent it; staleness was then reported 0 for a day.
    machine = _follower()
    _receive(machine, confirmed_at=time.time() + 86_400, sent_at=time.time() + 86_400, commit_index=10)
    assert machine.staleness() == float("inf")
    # And the follower's own wall clock jumping changes nothing either: only monotonic time counts.
    _receive(machine, confirmed_age=1.0, commit_index=10)
    monkeypatch.setattr(state_machine.time, "time", lambda: 4e9)
    assert 1.0 <= machine.staleness() < 1.5


def test_one_fresh_message_does_not_hold_staleness_at_zero() -> None:
    machine = _follower()
    _receive(machine, confirmed_age=0.0, commit_index=10)
    time.sleep(0.3)
    # No newer proof arrived: staleness grows with real time from the moment of receipt.
    assert machine.staleness() >= 0.3


def test_freshness_waits_for_the_commit_index_to_be_applied() -> None:
    machine = _follower(applied=5)
    _receive(machine, confirmed_age=0.0, commit_index=9)
    assert machine.staleness() == float("inf")  # holds only entries up to 5 of the 9 committed
    machine._stored_applied = machine._SyncObj__raftLastApplied = 9
    machine._track_freshness()
    assert machine.staleness() < 0.5


class _LeaderStub:
    """What the transport asks of its state machine when stamping an append."""

    def __init__(self, confirmed: float | None) -> None:
        self.confirmed = confirmed
        self.answering = None

    def leader_confirmed_at(self) -> float | None:
        return self.confirmed


def _stamped(confirmed: float | None) -> dict[str, Any]:
    transport = FreshnessStampingTransport.__new__(FreshnessStampingTransport)
    transport._syncObj = _LeaderStub(confirmed)
    message: dict[str, Any] = {"type": "append_entries", "commit_index": 3}
    sent: list[dict[str, Any]] = []
    # Stop at the base class: no socket. The stamping is all in the override.
    original = FreshnessStampingTransport.__mro__[1].send
    try:
        FreshnessStampingTransport.__mro__[1].send = lambda self, node, msg: sent.append(msg) or True  # type: ignore[method-assign]
        transport.send(object(), message)
    finally:
        FreshnessStampingTransport.__mro__[1].send = original  # type: ignore[method-assign]
    return sent[0]


def test_leader_sends_an_age_on_its_monotonic_clock_whatever_its_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_machine.time, "time", lambda: time.monotonic() + 86_400)  # a jump
    message = _stamped(time.monotonic() - 1.5)
    assert "confirmed_at" not in message
    assert 1.5 <= message["confirmed_age"] < 2.0
    assert "confirmed_age" not in _stamped(None)  # never confirmed: no claim at all


def test_leader_ignores_an_echo_of_a_send_time_it_never_reached() -> None:
    machine = _follower()
    forged = {"type": "next_node_idx", "echo": (time.monotonic() + 3600, 1)}  # "you sent it in an hour"
    machine._SyncObj__onMessageReceived("peer", forged)
    assert machine._acked_sent_at == {}
    now = time.monotonic()
    machine._SyncObj__onMessageReceived("peer", {"type": "next_node_idx", "echo": (now, 1)})
    assert machine._acked_sent_at == {"peer": (1, now)}
