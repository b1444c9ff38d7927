"""Restart refuses to diverge (issue 15, item 2): LMDB stores the applied position (index, term) in
the batch's transaction; a replica whose log's entry at that index has another term stops with one
clear line instead of applying around it. Real pysyncobj and LMDB, one replica
(tests/unit/test_apply_limits.py)."""

from __future__ import annotations

import time
from pathlib import Path

from kvstore.cluster.local import free_ports
from kvstore.replication import commands
from kvstore.replication.state_machine import ReplicaSettings, ShardStateMachine
from kvstore.storage.engine import Storage
from tests.unit.test_apply_limits import RAFT, OneReplica


class WatchedReplica(OneReplica):
    """A one-member shard whose divergence stop is recorded instead of exiting the process."""

    def open(self) -> None:
        self.diverged: list[str] = []
        self.storage = Storage(self.path, fsync=False)
        port = free_ports(1)[0]
        settings = ReplicaSettings(f"127.0.0.1:{port}", f"127.0.0.1:{port}", [], self.path, RAFT)
        self.machine = ShardStateMachine(
            self.storage,
            settings,
            self._on_applied,
            on_fatal=self.fatal.append,
            on_diverged=self.diverged.append,
        )
        deadline = time.monotonic() + 10
        while not self.machine._isLeader():
            assert time.monotonic() < deadline, "a one-member shard elects itself"
            time.sleep(0.02)


def _write_some(replica: OneReplica) -> int:
    for i in range(5):
        replica.propose([(b"", commands.put(f"k{i}".encode(), b"v"))])
    return replica.storage.applied_index()


def test_the_applied_term_is_stored_with_the_index_and_an_unchanged_restart_passes(tmp_path: Path) -> None:
    replica = WatchedReplica(tmp_path / "r")
    try:
        applied = _write_some(replica)
        index, term = replica.storage.applied_position()
        assert index == applied > 0
        assert term == replica.machine.current_term() >= 1
    finally:
        replica.close()
    replica.open()
    try:
        replica.propose([(b"", commands.put(b"after", b"restart"))])
        assert replica.diverged == []
    finally:
        replica.close()


def test_a_store_whose_applied_term_differs_from_the_log_stops_the_replica(tmp_path: Path) -> None:
    replica = WatchedReplica(tmp_path / "r")
    try:
        applied = _write_some(replica)
        _, term = replica.storage.applied_position()
    finally:
        replica.close()
    # As if the store came from another history: same index, another term.
    storage = Storage(tmp_path / "r", fsync=False)
    storage.set_applied(applied, term + 7)
    storage.commit()
    storage.close()
    replica.open()
    try:
        deadline = time.monotonic() + 10
        while not replica.diverged and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(replica.diverged) >= 1
        message = replica.diverged[0]
        assert f"LMDB applied index {applied} term {term + 7}" in message
        assert f"entry {applied} has term {term}" in message
        assert "diverged" in message and "--forget-peer" in message
        assert "\n" not in message
    finally:
        replica.close()


def test_a_store_of_the_previous_release_has_no_term_and_is_not_judged(tmp_path: Path) -> None:
    import lmdb

    replica = WatchedReplica(tmp_path / "r")
    try:
        applied = _write_some(replica)
    finally:
        replica.close()
    env = lmdb.open(str(tmp_path / "r" / "lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:  # the previous layout: the index alone, 8 bytes
        txn.put(b"applied", applied.to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    replica.open()
    try:
        replica.propose([(b"", commands.put(b"after", b"upgrade"))])
        assert replica.diverged == []
        assert replica.storage.applied_position()[1] >= 1  # the next apply stores its term
    finally:
        replica.close()


def test_storage_keeps_the_position_with_the_batch_and_snapshots_carry_it(tmp_path: Path) -> None:
    import io

    s = Storage(tmp_path / "a", fsync=False)
    s.put(b"k", b"v", 7)
    s.set_applied(7, 3)
    assert s.applied_position() == (0, 0)  # readers see committed state only
    s.commit()
    assert s.applied_position() == (7, 3) and s.applied_index() == 7
    assert s.read(b"k")[1] == 7  # reads report the index alone, as before
    txn = s.begin_snapshot()
    with open(tmp_path / "snap.mdb", "wb") as f:
        s.write_snapshot(txn, f)
    data = (tmp_path / "snap.mdb").read_bytes()
    target = Storage(tmp_path / "b", fsync=False)
    target.install_snapshot(io.BytesIO(data), len(data))
    assert target.applied_position() == (7, 3)  # a follower installing it knows the term too
    target.close()
    s.close()
