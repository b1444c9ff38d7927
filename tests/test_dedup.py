"""Client sessions and write outcomes (Raft dissertation §6.3): tables on a real Storage, the apply
rules of the state machine, and (with real node processes) the issue-12 reproductions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.replication import commands
from kvstore.replication.state_machine import ShardStateMachine
from kvstore.storage.dedup import CAS_FAILED, DONE, Outcome
from kvstore.storage.engine import Storage

SECOND = 1_000_000  # the tables count in µs
RETENTION = 60 * SECOND


def _id(client: int, seq: int) -> bytes:
    return client.to_bytes(16, "big") + seq.to_bytes(8, "big")


class _Replica:
    """The apply rules of `ShardStateMachine` on a real Storage, without Raft around them."""

    _apply_proposal = ShardStateMachine._apply_proposal
    _forgotten = ShardStateMachine._forgotten
    _apply_op = ShardStateMachine._apply_op

    def __init__(self, storage: Storage, max_sessions: int = 1000) -> None:
        self._storage = storage
        self._settings = type("S", (), {"dedup_retention": 60.0, "max_dedup_sessions": max_sessions})()
        self._entry_stamp = 0
        self.index = 0

    def apply(self, request_id: bytes, op: commands.Op, *, retry: bool = False, at: float) -> commands.Result:
        self.index += 1
        self._entry_stamp = int(at * SECOND)
        result = self._apply_proposal(self.index, (commands.request_tag(request_id, retry), op))
        self._storage.set_applied(self.index)
        self._storage.commit()
        return result


# ----- the tables ---------------------------------------------------------------------------------


def test_outcome_is_recalled_and_expires_by_time_not_by_count(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    s.remember_outcome(_id(1, 1), Outcome(10, DONE), 0, RETENTION, 1000)
    # 10,000 other clients' writes within the retention do not push it out (the old window did).
    for i in range(10_000):
        s.remember_outcome(_id(2, i + 1), Outcome(11 + i, DONE), SECOND, RETENTION, 100_000)
    assert s.recall_outcome(_id(1, 1)) == Outcome(10, DONE, applied_at=0)
    s.commit()
    # Past the retention, each new outcome drops a few of the oldest: client 1's goes first.
    s.remember_outcome(_id(3, 1), Outcome(20_000, DONE), RETENTION + 1, RETENTION, 100_000)
    assert s.recall_outcome(_id(1, 1)) is None
    assert s.session(_id(1, 0)[:16]) is None  # idle past the retention too: dropped
    assert s.recall_outcome(_id(2, 1)) is not None  # 59 s old: kept


def test_outcome_row_is_a_small_fixed_struct(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    key = _id(1, 1)
    s.remember_outcome(key, Outcome(5, CAS_FAILED, current_revision=4), 7, RETENTION, 10)
    s.commit()
    with s._env.begin() as txn:
        raw = txn.get(key, db=s._dedup._outcomes)
    assert len(raw) == 30  # revision, stamp, kind, error, count, current revision: no value, no pickle
    assert s.recall_outcome(key) == Outcome(5, CAS_FAILED, 0, 4, 0, 7)


def test_session_cap_evicts_the_least_recently_active_and_records_when(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    for client in range(1, 6):
        s.remember_outcome(_id(client, 1), Outcome(client, DONE), client * SECOND, RETENTION, 3)
    s.commit()
    assert s.dedup_counts()[0] == 3
    assert s.session(_id(1, 0)[:16]) is None and s.session(_id(2, 0)[:16]) is None
    assert s.session(_id(5, 0)[:16]) is not None
    assert s.session_evicted_at() == 2 * SECOND  # the newest last-active time among evicted sessions


def test_sessions_survive_a_restart(tmp_path: Path) -> None:
    s = Storage(tmp_path)
    s.remember_outcome(_id(7, 3), Outcome(42, DONE, count=2), SECOND, RETENTION, 10)
    s.set_applied(42)
    s.commit()
    s.close()
    again = Storage(tmp_path)
    assert again.recall_outcome(_id(7, 3)) == Outcome(42, DONE, 2, 0, 0, SECOND)
    assert again.session(_id(7, 0)[:16]) is not None


def test_dedup_clock_never_moves_back(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    assert s.advance_dedup_clock(100) == 100
    assert s.advance_dedup_clock(50) == 100  # a new leader with a slower clock
    assert s.advance_dedup_clock(0) == 100  # an entry from an older version (no stamp)


# ----- the apply rules --------------------------------------------------------------------------


def test_a_retry_is_answered_from_its_outcome(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    first = r.apply(_id(1, 1), commands.put(b"k", b"v1"), at=1)
    r.apply(_id(2, 1), commands.put(b"k", b"v2"), at=2)
    retry = r.apply(_id(1, 1), commands.put(b"k", b"v1"), retry=True, at=3)
    assert retry == first
    assert r._storage.get(b"k").value == b"v2"  # not applied again


def test_a_failed_compare_and_set_is_answered_from_its_outcome_without_storing_the_value(
    tmp_path: Path,
) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(b"", commands.put(b"big", b"x" * 100_000), at=1)
    cas = commands.compare_and_set(b"big", b"y", 999)
    revision, (ok, current) = r.apply(_id(1, 1), cas, at=2)
    assert not ok and current.revision == 1
    again = r.apply(_id(1, 1), cas, retry=True, at=3)
    assert again[0] == revision and not again[1][0] and again[1][1].value == b"x" * 100_000
    with r._storage._env.begin() as txn:
        assert len(txn.get(_id(1, 1), db=r._storage._dedup._outcomes)) == 30


def test_delete_count_is_replayed(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(b"", commands.multi_put([(b"a", b"1"), (b"b", b"2")]), at=1)
    first = r.apply(_id(1, 1), commands.delete([b"a", b"b", b"c"]), at=2)
    assert first[1] == 2
    assert r.apply(_id(1, 1), commands.delete([b"a", b"b", b"c"]), retry=True, at=3) == first


def test_unknown_session_retry_applies_unless_a_recent_session_was_evicted(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False), max_sessions=2)
    # A new client whose first attempt never arrived: nothing could have applied, so it applies.
    revision, payload = r.apply(_id(1, 1), commands.put(b"a", b"1"), retry=True, at=1)
    assert payload is None and r._storage.get(b"a").revision == revision
    r.apply(_id(2, 1), commands.put(b"b", b"1"), at=2)
    r.apply(_id(3, 1), commands.put(b"c", b"1"), at=3)  # evicts client 1 (cap 2)
    assert r._storage.session(_id(1, 0)[:16]) is None
    # Client 1's outcome is still on record: its retry is answered from it.
    assert r.apply(_id(1, 1), commands.put(b"a", b"1"), retry=True, at=4)[0] == revision
    # A retry of another of client 1's writes: its session is gone, it may have applied: refused.
    before = r._storage.get(b"a").revision
    refused = r.apply(_id(1, 2), commands.put(b"a", b"2"), retry=True, at=5)
    assert refused[1][0] == commands.SESSION_EXPIRED
    assert r._storage.get(b"a").revision == before  # nothing applied
    # A first attempt (not a retry) from an unknown session is always applied.
    assert r.apply(_id(4, 1), commands.put(b"d", b"1"), at=6)[1] is None
    # Once every eviction is older than the retention, unknown sessions are new ones again.
    assert r.apply(_id(5, 1), commands.put(b"e", b"1"), retry=True, at=200)[1] is None


def test_retry_at_or_below_the_forgotten_sequence_is_refused(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(_id(1, 5), commands.put(b"a", b"1"), at=1)
    r.apply(_id(1, 6), commands.put(b"a", b"2"), at=100)  # keeps the session active
    r.apply(_id(2, 1), commands.put(b"z", b"1"), at=101)  # drops client 1's seq 5 (older than 60 s)
    assert r._storage.session(_id(1, 0)[:16]).forgotten_through == 5
    refused = r.apply(_id(1, 5), commands.put(b"a", b"1"), retry=True, at=102)
    assert refused[1][0] == commands.SESSION_EXPIRED
    assert r._storage.get(b"a").value == b"2"
    # A newer sequence without an outcome never applied: its retry applies.
    assert r.apply(_id(1, 7), commands.put(b"a", b"3"), retry=True, at=103)[1] is None


@pytest.mark.parametrize("length", [1, 16, 23, 25, 33, 64])
def test_request_ids_of_another_shape_are_refused(length: int) -> None:
    from kvstore import errors

    with pytest.raises(errors.InvalidArgument):
        commands.check_request_id(b"r" * length)
    commands.check_request_id(b"")
    commands.check_request_id(b"r" * 24)
    commands.check_request_id(b"r" * 32)
