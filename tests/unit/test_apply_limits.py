"""The apply path with real pysyncobj and LMDB (a one-replica shard): nothing storage does wedges it.

- An op storage refuses deterministically (a key over LMDB's 511 bytes) gets an error result, writes
  nothing (not even the other keys of its multi-put), and the log moves on, also after a restart.
- A transient storage failure is retried with backoff (not every tick), reported by
  `storage_problem()`, and the proposer still gets its result once storage works again.
- Failures that last past storage.io_failure_limit_seconds stop the node (on_fatal), once.
- A snapshot whose start fails releases its read transaction (map growth keeps working).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from pysyncobj.config import SERIALIZER_STATE

from kvstore import errors
from kvstore.cluster.local import free_ports
from kvstore.config import Limits, RaftSettings, StorageSettings
from kvstore.replication import commands
from kvstore.replication.snapshots import SnapshotManager
from kvstore.replication.state_machine import ReplicaSettings, ShardStateMachine
from kvstore.storage.engine import Storage

# A one-member group on loopback with nobody to talk to: no secret needed.
RAFT = RaftSettings(min_timeout=0.4, max_timeout=0.6, insecure=True)


# What pysyncobj hands a snapshot serializer: the last two entries and the members.
META = ((b"x", 2, 1), (b"w", 1, 1), set())


BIG_REQUEST = b"c" * 16 + (1).to_bytes(8, "big")  # client id + sequence


class OneReplica:
    """A one-member shard: its own leader, so every proposal commits and applies at once."""

    def __init__(self, path: Path, storage_settings: StorageSettings | None = None) -> None:
        self.path = path
        self.storage_settings = storage_settings or StorageSettings()
        self.fatal: list[str] = []
        self.indexes: list[int] = []
        self.open()

    def open(self) -> None:
        self.storage = Storage(self.path, fsync=False)
        port = free_ports(1)[0]
        settings = ReplicaSettings(
            f"127.0.0.1:{port}", f"127.0.0.1:{port}", [], self.path, RAFT, storage=self.storage_settings
        )
        self.machine = ShardStateMachine(self.storage, settings, self._on_applied, on_fatal=self.fatal.append)
        deadline = time.monotonic() + 10
        while not self.machine._isLeader():
            assert time.monotonic() < deadline, "a one-member shard elects itself"
            time.sleep(0.02)

    def _on_applied(self, completions: list[Any], index: int) -> None:
        self.indexes.append(index)
        for callback, result, error in completions:
            callback(result, error)

    def propose(self, proposals: list[commands.Proposal], timeout: float = 10.0) -> Any:
        done = threading.Event()
        outcome: list[Any] = []

        def callback(result: Any, error: int) -> None:
            outcome.append((result, error))
            done.set()

        self.machine.propose(proposals, callback)
        assert done.wait(timeout), "the proposal was never answered"
        result, error = outcome[0]
        assert error == 0, f"pysyncobj error {error}"
        return result

    def close(self) -> None:
        self.machine.destroy_synchronous()
        self.machine.snapshots.wait_idle(5)
        self.storage.close()


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[OneReplica]:
    r = OneReplica(tmp_path / "r")
    yield r
    r.close()


def _no_waiting(r: OneReplica) -> bool:
    return r.storage.applied_index() >= r.machine.raftCommitIndex - 1  # the leader no-op is not stored


def test_an_oversize_key_in_the_log_is_refused_on_apply_and_the_log_moves_on(replica: OneReplica) -> None:
    big = b"k" * 512  # LMDB's limit is 511: validation would refuse it; here it reached the log
    results = replica.propose(
        [
            (b"", commands.put(b"before", b"1")),
            (commands.request_tag(BIG_REQUEST, retry=False), commands.put(big, b"v")),
            (b"", commands.multi_put([(b"mp-ok", b"1"), (big, b"2")])),
            (b"", commands.put(b"", b"empty key")),
            (b"", ("no-such-op", b"x")),
            (b"", commands.put(b"after", b"2")),
        ]
    )
    index = results[0][0]
    assert [r[0] for r in results] == [index] * 6
    assert results[0][1] is None and results[5][1] is None
    for refused in results[1:5]:
        err = refused[1].error()
        assert isinstance(err, errors.InvalidArgument), refused
    assert "512 bytes" in str(results[1][1].error())
    storage = replica.storage
    assert storage.get(b"before").value == b"1" and storage.get(b"after").value == b"2"
    assert storage.get(b"mp-ok") is None  # nothing of a refused op is written
    assert storage.recall_outcome(BIG_REQUEST) is None  # nor its request's outcome
    storage.abort()
    assert storage.applied_index() == index and replica.machine.refused_ops == 4
    # The log moves on: the next entry applies, and nothing is stuck behind the commit index.
    later = replica.propose([(b"", commands.put(b"next", b"3"))])
    assert later[0][0] > index and replica.storage.get(b"next").value == b"3"
    assert _no_waiting(replica) and replica.machine.storage_problem() is None
    # ... and again after a restart that replays the journal.
    replica.close()
    replica.open()
    again = replica.propose([(b"", commands.put(b"after-restart", b"4"))])
    assert replica.storage.get(b"after-restart").revision == again[0][0]
    assert replica.storage.get(b"mp-ok") is None


def test_an_op_refused_after_it_wrote_is_undone_by_a_careful_reapply(
    replica: OneReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic refusal *after* an op wrote (no pre-check saw it coming) rolls the batch
    back and re-applies it with a savepoint per op: the op leaves nothing, its neighbours apply."""
    storage = replica.storage
    real_remember = storage.remember_outcome
    poison = b"p" * 16 + (2).to_bytes(8, "big")

    def remember(request_key: bytes, *args: Any) -> None:
        if request_key == poison:
            raise lmdb.BadValsizeError("mdb_put: MDB_BAD_VALSIZE")
        real_remember(request_key, *args)

    monkeypatch.setattr(storage, "remember_outcome", remember)
    results = replica.propose(
        [
            (commands.request_tag(b"f" * 16 + (1).to_bytes(8, "big"), False), commands.put(b"a", b"1")),
            (commands.request_tag(poison, False), commands.put(b"b", b"2")),  # written, then refused
            (commands.request_tag(b"t" * 16 + (3).to_bytes(8, "big"), False), commands.put(b"c", b"3")),
        ]
    )
    assert results[0][1] is None and results[2][1] is None
    assert isinstance(results[1][1].error(), errors.InvalidArgument)
    assert storage.get(b"a").value == b"1" and storage.get(b"c").value == b"3"
    assert storage.get(b"b") is None  # the refused op's write was undone
    assert replica.machine.storage_problem() is None  # not a disk problem: no backoff
    assert replica.propose([(b"", commands.put(b"d", b"4"))])[0][1] is None


def test_a_transient_storage_failure_backs_off_reports_and_recovers(
    replica: OneReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = replica.storage
    real_commit = storage.commit
    attempts: list[float] = []
    failing = threading.Event()
    failing.set()

    def commit() -> bool:
        if failing.is_set() and storage._txn is not None:
            attempts.append(time.monotonic())
            storage.abort()
            raise lmdb.Error("mdb_txn_commit: Input/output error")
        return real_commit()

    monkeypatch.setattr(storage, "commit", commit)
    answers: list[Any] = []
    replica.machine.propose([(b"", commands.put(b"k", b"v"))], lambda result, error: answers.append(result))
    time.sleep(1.5)
    problem = replica.machine.storage_problem()
    assert problem is not None and "Input/output error" in problem
    # Backoff 50, 100, 200, 400, 800 ms: about 5 attempts in 1.5 s, where a tick (~10 ms) would be 150.
    assert 3 <= len(attempts) <= 7, len(attempts)
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > 0.15
    assert answers == [] and storage.get(b"k") is None
    with pytest.raises(errors.Unavailable, match="storage is failing"):
        replica.machine.check_disk_for_writes()  # new writes are refused, not left to time out
    failing.clear()
    deadline = time.monotonic() + 5
    while not answers:
        assert time.monotonic() < deadline, "the write was never answered after storage recovered"
        time.sleep(0.02)
    # The proposer gets the real result of the re-applied entry, not a timeout.
    assert answers[0] is not None and answers[0][0][1] is None
    assert storage.get(b"k").value == b"v"
    assert replica.machine.storage_problem() is None and replica.fatal == []
    replica.machine.check_disk_for_writes()


def test_storage_failing_past_the_limit_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = OneReplica(tmp_path / "r", StorageSettings(io_failure_limit_seconds=0.6, io_retry_max_backoff=0.1))
    try:

        def broken() -> bool:
            r.storage.abort()
            raise lmdb.Error("mdb_txn_commit: No space left on device")

        monkeypatch.setattr(r.storage, "commit", broken)
        r.machine.propose([(b"", commands.put(b"k", b"v"))], lambda result, error: None)
        deadline = time.monotonic() + 5
        while not r.fatal:
            assert time.monotonic() < deadline, "never gave up"
            time.sleep(0.05)
        assert "storage.io_failure_limit_seconds" in r.fatal[0] and "No space left" in r.fatal[0]
    finally:
        monkeypatch.undo()
        r.close()


def test_a_failed_snapshot_start_releases_its_read_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path, map_size=1 << 20, fsync=False)
    dump = tmp_path / "raft.dump"
    manager = SnapshotManager(storage, dump, lambda applied: None)
    manager.serialize(str(tmp_path / "first.tmp"), META)  # the first one is synchronous
    assert storage._snapshots_running == 0 and manager.check() == SERIALIZER_STATE.SUCCESS
    os.replace(tmp_path / "first.tmp", dump)  # what pysyncobj does next

    def no_link(src: Any, dst: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(OSError, match="cross-device"):
        manager.serialize(str(tmp_path / "raft.dump.tmp"), META)
    assert storage._snapshots_running == 0  # released: map growth is not disabled
    assert manager.check() == SERIALIZER_STATE.NOT_SERIALIZING  # pysyncobj may try again
    before = storage._env.info()["map_size"]
    assert storage.grow() and storage._env.info()["map_size"] == 2 * before
    # A background write that fails leaves no side file behind and releases its transaction too.
    monkeypatch.undo()
    monkeypatch.setattr(storage, "write_snapshot", _failing_write(storage))
    manager.serialize(str(tmp_path / "raft.dump.tmp"), META)
    manager.wait_idle(5)
    assert manager.check() == SERIALIZER_STATE.FAILED
    assert storage._snapshots_running == 0 and not (tmp_path / "raft.dump.writing").exists()
    storage.close()


def _failing_write(storage: Storage) -> Any:
    def write(txn: Any, out: Any) -> None:
        storage.end_snapshot(txn)
        raise OSError(28, "No space left on device")

    return write


def test_the_map_grows_within_its_cap_and_writes_are_refused_near_it(tmp_path: Path) -> None:
    storage = Storage(tmp_path, map_size=1 << 20, fsync=False, max_map_size=2 << 20)
    assert storage.grow() and not storage.grow()  # 1 MiB -> 2 MiB, then capped
    assert storage.write_refusal() is None
    value = b"x" * 1000
    with pytest.raises(lmdb.MapFullError):
        for i in range(10_000):
            storage.put(b"k%05d" % i, value, 1)
            if i % 100 == 99:
                storage.commit()
    storage.abort()
    refusal = storage.write_refusal()
    assert refusal is not None and "max_map_size_bytes" in refusal
    storage.close()


def test_a_key_limit_above_what_lmdb_takes_is_refused_at_start(tmp_path: Path) -> None:
    storage = Storage(tmp_path, fsync=False)
    assert storage.max_key_size == 511 and Limits().max_key_bytes == 511
    storage.check_key_limit(Limits().max_key_bytes)
    with pytest.raises(ValueError, match="at most 511"):
        storage.check_key_limit(4096)
    storage.close()


def test_the_free_space_watermark_refuses_writes_and_lifts_by_itself(tmp_path: Path) -> None:
    from kvstore.storage.disk import DiskSpace

    free = [10 << 20]

    def statvfs(path: str) -> Any:
        return os.statvfs_result((4096, 4096, (1 << 30) // 4096, 0, free[0] // 4096, 0, 0, 0, 0, 255))

    disk = DiskSpace(tmp_path, min_free_bytes=64 << 20, min_free_fraction=0.01, interval=0.0, statvfs=statvfs)
    storage = Storage(tmp_path, fsync=False, disk=disk)
    refusal = storage.write_refusal()
    assert refusal is not None and "insufficient storage" in refusal and str(64 << 20) in refusal
    assert errors.DiskFull(refusal).code.name == "RESOURCE_EXHAUSTED"
    assert disk.spare() == 0 and not storage.grow()  # no room: the map does not grow either
    free[0] = 512 << 20
    assert storage.write_refusal() is None and disk.spare() == (512 - 64) << 20
    storage.close()
