"""The files of a backup and a restore, without processes: a store's compacted copy reads back as
the store it came from (applied index, key count, `Storage.checksum`'s digest), a damaged copy is
refused, and a restore's seed snapshot is one the replica's snapshot loader takes, with a Raft log
that ends at the backup's index under term 0."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from kvstore.replication.snapshots import SnapshotManager, write_seed_snapshot
from kvstore.storage.copies import DataDigest, NotAStoreCopy, describe_copy
from kvstore.storage.engine import Storage


def _store_with_data(path: Path, keys: int = 300) -> Storage:
    storage = Storage(path, fsync=False)
    for i in range(keys):
        storage.put(b"k%05d" % i, b"value-%d" % i * 3, revision=i + 2)
    storage.delete(b"k00007")
    storage.set_applied(keys + 5)
    storage.commit()
    return storage


def _copy(storage: Storage, path: Path) -> Path:
    txn = storage.begin_snapshot()
    with open(path, "wb") as out:
        storage.write_snapshot(txn, out)
    return path


def test_a_copy_holds_what_the_store_held(tmp_path: Path) -> None:
    storage = _store_with_data(tmp_path / "store")
    copy = _copy(storage, tmp_path / "shard-0.mdb")
    contents = describe_copy(copy)
    assert contents.applied_index == storage.applied_index() == 305
    assert contents.key_count == storage.key_count() == 299
    assert contents.data_digest == storage.checksum()
    # The same digest from (key, revision, value) triples: what a restore computes from scans.
    digest = DataDigest()
    for i in range(300):
        if i != 7:
            digest.add(b"k%05d" % i, i + 2, b"value-%d" % i * 3)
    assert digest.hexdigest() == contents.data_digest
    storage.put(b"k00001", b"changed", revision=400)
    storage.commit()
    assert storage.checksum() != contents.data_digest  # the digest does see a changed value


def test_damaged_or_foreign_files_are_refused(tmp_path: Path) -> None:
    storage = _store_with_data(tmp_path / "store")
    copy = _copy(storage, tmp_path / "shard-0.mdb")
    truncated = tmp_path / "truncated.mdb"
    truncated.write_bytes(copy.read_bytes()[:4096])
    junk = tmp_path / "junk.mdb"
    junk.write_bytes(b"not an lmdb file" * 512)
    for path in (truncated, junk):
        with pytest.raises(NotAStoreCopy):
            describe_copy(path)
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"b")
    env.close()
    with pytest.raises(NotAStoreCopy, match="without kvstore's data and meta"):
        describe_copy(foreign / "data.mdb")


def test_a_seed_snapshot_starts_the_log_at_the_backup_index(tmp_path: Path) -> None:
    storage = _store_with_data(tmp_path / "store")
    copy = _copy(storage, tmp_path / "shard-0.mdb")
    members = ["127.0.0.1:7001", "127.0.0.1:7003", "127.0.0.1:7005"]
    dump = tmp_path / "raft.dump"
    write_seed_snapshot(dump, copy, 305, members)

    # A replica seeded with the store itself: the snapshot loads as its log's start, installs nothing.
    seeded = Storage(tmp_path / "seeded", fsync=False)
    with open(copy, "rb") as f:
        seeded.install_snapshot(f, copy.stat().st_size)
    installed: list[int] = []
    manager = SnapshotManager(seeded, dump, installed.append)
    last, before_last, cluster = manager.deserialize(str(dump))
    assert (last[1:], before_last[1:]) == ((305, 0), (304, 0))  # (index, term): term 0, below any election
    assert last[0] == before_last[0] == b"\x01"  # pysyncobj's no-op: nothing to apply
    assert sorted(node.address for node in cluster) == members
    assert installed == []

    # A replica whose store is empty installs it from the snapshot file (what a lagging follower gets).
    empty = Storage(tmp_path / "empty", fsync=False)
    SnapshotManager(empty, dump, installed.append).deserialize(str(dump))
    assert installed == [305]
    assert empty.checksum() == storage.checksum() and empty.applied_index() == 305

    with pytest.raises(ValueError, match="at least 2"):
        write_seed_snapshot(tmp_path / "x.dump", copy, 1, members)


def test_the_applied_index_is_read_with_or_without_a_term_after_it(tmp_path: Path) -> None:
    """The store's applied value is the index (8 bytes), possibly followed by its entry's term."""
    for name, value in (("index-only", (42).to_bytes(8, "big")), ("with-term", (42).to_bytes(8, "big") * 2)):
        storage = _store_with_data(tmp_path / name, keys=3)
        with storage._env.begin(write=True) as txn:  # noqa: SLF001 (writing the layout under test)
            txn.put(b"applied", value, db=storage._meta)  # noqa: SLF001
        copy = _copy(storage, tmp_path / f"{name}.mdb")
        assert describe_copy(copy).applied_index == 42
