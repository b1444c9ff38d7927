"""Client sessions and write outcomes (Raft dissertation §6.3): tables on a real Storage, the apply
rules of the state machine, and (with real node processes) the issue-12 reproductions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import errors
from kvstore.client.core import ClientCore
from kvstore.client.plans import Call, Plan
from kvstore.client.split import sub_request_id
from kvstore.config import NodeConfig, StorageSettings
from kvstore.replication import commands
from kvstore.replication.slot_moves import SlotMoves
from kvstore.replication.state_machine import ShardStateMachine
from kvstore.routing.ring import slot_of
from kvstore.storage.dedup import CAS_FAILED, DONE, Outcome
from kvstore.storage.engine import Storage

SECOND = 1_000_000  # the tables count in µs


RETENTION = 60 * SECOND


def _id(client: int, seq: int) -> bytes:
    return client.to_bytes(16, "big") + seq.to_bytes(8, "big")


class _Replica(SlotMoves):
    """The apply rules of `ShardStateMachine` on a real Storage, without Raft around them."""

    _apply_proposal = ShardStateMachine._apply_proposal
    _apply_checked = ShardStateMachine._apply_checked
    _refused = ShardStateMachine._refused
    _forgotten = ShardStateMachine._forgotten

    def __init__(self, storage: Storage, max_sessions: int = 1000) -> None:
        self._storage = storage
        storage_settings = StorageSettings(dedup_retention_seconds=60.0, max_dedup_sessions=max_sessions)
        self._settings = type("S", (), {"storage": storage_settings})()
        self._entry_stamp = 0
        self._careful_through = 0
        self._max_request_id = storage.max_key_size - 8
        self._last_refusal_log = -1e9
        self.refused_ops = 0
        self.index = 0
        self._init_slot_moves()

    def apply(self, request_id: bytes, op: commands.Op, *, retry: bool = False, at: float) -> commands.Result:
        self.index += 1
        self._entry_stamp = int(at * SECOND)
        result = self._apply_proposal(self.index, (commands.request_tag(request_id, retry), op))
        self._storage.set_applied(self.index)
        self._storage.commit()
        self._publish_claims()
        return result


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
    assert s.session_dropped_at() == 5 * SECOND  # the clock when the last one was evicted


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


def test_unknown_session_retry_applies_unless_a_session_was_dropped_recently(tmp_path: Path) -> None:
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
    assert isinstance(refused[1], commands.Refused) and refused[1].kind == errors.SessionExpired.kind
    assert r._storage.get(b"a").revision == before  # nothing applied
    # A first attempt (not a retry) from an unknown session is always applied.
    assert r.apply(_id(4, 1), commands.put(b"d", b"1"), at=6)[1] is None
    # Once every drop is older than the retention, unknown sessions are new ones again.
    assert r.apply(_id(5, 1), commands.put(b"e", b"1"), retry=True, at=200)[1] is None


def test_a_leader_clock_jump_never_turns_a_retry_into_a_second_apply(tmp_path: Path) -> None:
    # A leader whose wall clock jumps a day ahead expires every outcome and idle session at once.
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(_id(1, 1), commands.put(b"a", b"1"), at=1)  # client 1: no answer yet, will retry
    r.apply(_id(2, 1), commands.put(b"b", b"1"), at=2)
    for i in range(3):
        r.apply(_id(3, 1 + i), commands.put(b"c", b"%d" % i), at=86_400 + i)  # the jumped clock
    assert r._storage.session(_id(1, 0)[:16]) is None and r._storage.recall_outcome(_id(1, 1)) is None
    r.apply(_id(2, 2), commands.put(b"b", b"2"), at=86_405)  # client 2 moves the value on
    refused = r.apply(_id(1, 1), commands.put(b"a", b"1"), retry=True, at=86_406)
    assert isinstance(refused[1], commands.Refused) and refused[1].kind == errors.SessionExpired.kind
    assert r._storage.get(b"a").revision == 1  # applied once


def test_retry_at_or_below_the_forgotten_sequence_is_refused(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(_id(1, 5), commands.put(b"a", b"1"), at=1)
    r.apply(_id(1, 6), commands.put(b"a", b"2"), at=100)  # keeps the session active
    r.apply(_id(2, 1), commands.put(b"z", b"1"), at=101)  # drops client 1's seq 5 (older than 60 s)
    assert r._storage.session(_id(1, 0)[:16]).forgotten_through == 5
    refused = r.apply(_id(1, 5), commands.put(b"a", b"1"), retry=True, at=102)
    assert isinstance(refused[1], commands.Refused) and refused[1].kind == errors.SessionExpired.kind
    assert r._storage.get(b"a").value == b"2"
    # A newer sequence without an outcome never applied: its retry applies.
    assert r.apply(_id(1, 7), commands.put(b"a", b"3"), retry=True, at=103)[1] is None


def test_malformed_stamps_and_tags_in_an_entry_never_raise_from_apply(tmp_path: Path) -> None:
    r = _Replica(Storage(tmp_path, fsync=False))
    r.apply(_id(1, 1), commands.put(b"a", b"1"), at=5)
    for stamp in (1 << 64, -1, 2.5, "soon", None):
        r._entry_stamp = stamp
        result = r._apply_proposal(99, (_id(1, 2) + b"\x00", commands.put(b"a", b"2")))
        assert result == (99, None)
    assert r._storage.advance_dedup_clock(0) == 5 * SECOND  # the bad stamps moved nothing
    # A tag that is not bytes: the same refusal on every replica, nothing written, no exception.
    revision, payload = r._apply_proposal(100, (12345, commands.put(b"b", b"1")))
    assert (revision, payload.kind) == (100, errors.InvalidArgument.kind)
    assert r._storage.get_for_update(b"b") is None


@pytest.mark.parametrize("length", [1, 16, 23, 25, 33, 64])
def test_request_ids_of_another_shape_are_refused(length: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        commands.check_request_id(b"r" * length)
    commands.check_request_id(b"")
    commands.check_request_id(b"r" * 24)
    commands.check_request_id(b"r" * 32)


def test_sdk_request_ids_are_its_client_id_and_a_sequence() -> None:
    core, other = ClientCore(seeds=["127.0.0.1:1"]), ClientCore(seeds=["127.0.0.1:1"])
    first, second = core.new_request_id(), core.new_request_id()
    assert len(first) == 24 and first[:16] == second[:16] == core.client_id != other.client_id
    assert int.from_bytes(second[16:], "big") == int.from_bytes(first[16:], "big") + 1
    # One shard's part of a split write: same client and sequence, 8 bytes naming the part.
    part = sub_request_id(first, 2, [b"b", b"a"], whole=False)
    assert part[:24] == first and len(part) == 32
    assert part == sub_request_id(first, 2, [b"a", b"b"], whole=False)  # stable across retries
    assert part != sub_request_id(first, 1, [b"a", b"b"], whole=False)
    commands.check_request_id(part)


def _one_shard_core() -> ClientCore:
    from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo

    replicas = tuple(ReplicaInfo(f"r{i}", f"127.0.0.1:{i + 1}", f"127.0.0.1:{i + 11}") for i in range(3))
    return ClientCore(cluster_map=ClusterMap(1, (ShardInfo(0, replicas),), vnodes_per_shard=8))


def _next_call(plan: Plan, outcome: BaseException | None = None) -> Call:
    step = plan.send(None) if outcome is None else plan.throw(outcome)
    while not isinstance(step, Call):
        step = plan.send(None)  # back-off sleeps
    return step


def test_sdk_flags_a_retry_only_once_an_attempt_may_have_applied() -> None:
    plan = _one_shard_core().put(b"k", b"v")
    call = _next_call(plan)
    request_id = call.request.request_id
    assert not call.request.retry
    # A definite refusal (not the leader): nothing applied, the next attempt is not a retry.
    call = _next_call(plan, errors.NotLeader("no", leader="127.0.0.1:2"))
    assert not call.request.retry
    # No answer in time: it may have applied, so every later attempt says so, with the same id.
    call = _next_call(plan, errors.UnknownOutcome("timed out"))
    assert call.request.retry and call.request.request_id == request_id
    call = _next_call(plan, errors.Unavailable("no leader"))
    assert call.request.retry
    # SessionExpired is final: the plan raises it instead of trying again.
    with pytest.raises(errors.SessionExpired):
        plan.throw(errors.SessionExpired("evicted"))


def test_config_old_window_setting_fails_clearly_and_values_are_range_checked() -> None:
    base = {
        "name": "n",
        "shard": 0,
        "listen": "127.0.0.1:1",
        "raft_bind": "127.0.0.1:2",
        "raft_advertise": "127.0.0.1:2",
        "peers": [],
        "data_dir": "d",
        "cluster_map": "m",
    }
    with pytest.raises(ValueError, match="dedup_window_ids was renamed max_dedup_sessions"):
        NodeConfig.from_dict({**base, "storage": {"dedup_window_ids": 100_000}})
    for bad in (
        {"dedup_retention_seconds": 10.0},  # shorter than a client may retry a write
        {"dedup_retention_seconds": float("nan")},
        {"max_dedup_sessions": 0},
        {"max_dedup_sessions": True},
    ):
        with pytest.raises(ValueError, match="out of range|must be an integer"):
            NodeConfig.from_dict({**base, "storage": bad})
    config = NodeConfig.from_dict(
        {**base, "storage": {"dedup_retention_seconds": 120, "max_dedup_sessions": 5}}
    )
    assert (config.storage.dedup_retention_seconds, config.storage.max_dedup_sessions) == (120, 5)


def test_pickled_request_tables_of_older_versions_are_dropped_unread(tmp_path: Path) -> None:
    import pickle

    import lmdb

    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(
            b"req-1",
            (7).to_bytes(8, "big") + pickle.dumps(("error", "x")),
            db=env.open_db(b"requests", txn=txn),
        )
        txn.put(bytes(8) + b"req-1", b"", db=env.open_db(b"req_by_index", txn=txn))
    env.close()
    s = Storage(tmp_path, fsync=False)
    with s._env.begin() as txn:
        assert txn.get(b"requests") is None and txn.get(b"req_by_index") is None
    s.close()
    Storage(tmp_path, fsync=False).close()  # and opening again (nothing to drop) is fine


def test_a_write_refused_because_its_slot_moves_keeps_no_outcome(tmp_path: Path) -> None:
    """A fenced slot refuses the write (Moving) and records nothing: when the move is aborted, the
    client's retry under the same request id applies, instead of being answered "failed"."""
    replica = _Replica(Storage(tmp_path / "s", fsync=False))
    key = b"moving-key"
    slot = slot_of(key)
    replica.apply(b"", commands.claim(1, [(slot, slot)], "out", "logging"), at=1.0)
    replica.apply(b"", commands.claim(1, [(slot, slot)], "out", "fenced"), at=1.0)
    request = _id(7, 1)
    refused = replica.apply(request, commands.put(key, b"v"), at=2.0)
    assert isinstance(refused[1], commands.Refused) and refused[1].kind == errors.Moving.kind
    assert replica._storage.recall_outcome(request) is None
    replica.apply(b"", commands.claim(1, [(slot, slot)], "out", "aborted"), at=3.0)
    revision, payload = replica.apply(request, commands.put(key, b"v"), retry=True, at=4.0)
    assert payload is None and replica._storage.get(key).value == b"v"
