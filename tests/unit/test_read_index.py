"""The leader's read index (replication/read_index.py): a strong read is answered only once a
majority acknowledged an append sent after it arrived, in the leader's term, after that term
committed an entry; a replica that does not lead answers None.

Drives the tick-thread side directly (pysyncobj's state set by hand, the heartbeat send recorded,
acknowledgements fed to the freshness handler): no sockets, so each step is the test's to order.
The chaos tests check the same reads against real partitions."""

from __future__ import annotations

import time
import types
from typing import Any

from kvstore.replication.state_machine import ShardStateMachine


class _Reads:
    def __init__(self) -> None:
        self.answers: list[int | None] = []

    def ask(self, machine: ShardStateMachine) -> None:
        machine.read_index(self.answers.append)


def _leader(commit: int = 20, noop: int = 15) -> tuple[ShardStateMachine, list[float]]:
    """A leader of term 3 with two followers; returns it and the times it sent heartbeats at."""
    machine = ShardStateMachine.__new__(ShardStateMachine)  # no tick thread, no sockets
    machine._init_freshness()
    machine._init_read_index()
    machine._settings = types.SimpleNamespace(peers=["f1", "f2"])  # type: ignore[assignment]
    machine._SyncObj__raftCurrentTerm = 3
    machine._SyncObj__raftCommitIndex = commit
    machine._SyncObj__noopIDx = noop
    machine._SyncObj__pipeNotifier = types.SimpleNamespace(notify=lambda: None)
    machine._isLeader = lambda: True  # type: ignore[method-assign]
    sent: list[float] = []
    machine._SyncObj__sendAppendEntries = lambda: sent.append(time.monotonic())
    return machine, sent


def _ack(machine: Any, follower: str, sent_at: float, term: int = 3) -> None:
    """`follower` acknowledges the append sent at `sent_at` (its echo, freshness.py)."""
    machine._note_echo(follower, (sent_at, term))


def test_a_read_is_answered_after_a_majority_acknowledged_a_heartbeat_sent_after_it() -> None:
    machine, sent = _leader()
    _ack(machine, "f1", time.monotonic())  # an acknowledgement of an append sent before the read
    reads = _Reads()
    reads.ask(machine)
    machine._serve_reads()
    assert reads.answers == [] and len(sent) == 1  # not confirmed yet: one heartbeat went out
    machine._serve_reads()
    assert len(sent) == 1  # still waiting for that one: no second heartbeat
    _ack(machine, "f2", sent[0])
    machine._SyncObj__raftCommitIndex = 21  # a write committed meanwhile: the later index is fine
    machine._serve_reads()
    assert reads.answers == [21]


def test_acknowledgements_of_older_appends_or_another_term_confirm_nothing() -> None:
    machine, sent = _leader()
    reads = _Reads()
    reads.ask(machine)
    machine._serve_reads()
    _ack(machine, "f1", sent[0] - 0.001)  # sent before the read arrived
    _ack(machine, "f2", sent[0], term=2)  # an acknowledgement in an older term
    machine._serve_reads()
    assert reads.answers == []


def test_no_read_is_confirmed_before_the_leaders_term_committed_an_entry() -> None:
    machine, sent = _leader(commit=14, noop=15)
    reads = _Reads()
    reads.ask(machine)
    machine._serve_reads()
    _ack(machine, "f1", sent[0])
    _ack(machine, "f2", sent[0])
    machine._serve_reads()
    assert reads.answers == []  # the commit index may still lag the previous leader's
    machine._SyncObj__raftCommitIndex = 15
    machine._serve_reads()
    assert reads.answers == [15]


def test_reads_arriving_after_a_heartbeat_wait_for_the_next_one() -> None:
    machine, sent = _leader()
    first, second = _Reads(), _Reads()
    first.ask(machine)
    machine._serve_reads()
    time.sleep(0.002)
    second.ask(machine)  # arrives after the first heartbeat was sent
    machine._serve_reads()
    assert len(sent) == 2
    _ack(machine, "f1", sent[0])
    machine._serve_reads()
    assert first.answers == [20] and second.answers == []
    _ack(machine, "f2", sent[1])
    machine._serve_reads()
    assert second.answers == [20]


def test_a_replica_that_does_not_lead_answers_none_and_sends_nothing() -> None:
    machine, sent = _leader()
    reads = _Reads()
    reads.ask(machine)
    machine._serve_reads()
    machine._isLeader = lambda: False  # type: ignore[method-assign]  # stepped down meanwhile
    later = _Reads()
    later.ask(machine)
    machine._serve_reads()
    assert reads.answers == [None] and later.answers == [None] and len(sent) == 1
