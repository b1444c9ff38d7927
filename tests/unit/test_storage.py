"""The LMDB engine alone: group commit, applied index, scans, request ids, snapshots, map growth."""

from __future__ import annotations

import io
from pathlib import Path

from kvstore.replication import commands
from kvstore.storage.engine import Storage


def test_writes_are_invisible_until_the_group_commit(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    s.put(b"k", b"v", 7)
    s.set_applied(7)
    assert s.get(b"k") is None and s.applied_index() == 0  # readers see only committed state
    s.commit()
    record = s.get(b"k")
    assert record is not None and (record.value, record.revision) == (b"v", 7)
    assert s.applied_index() == 7


def test_abort_rolls_back_data_and_applied_index_together(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    s.put(b"a", b"1", 1)
    s.set_applied(1)
    s.commit()
    s.put(b"b", b"2", 2)
    s.set_applied(2)
    s.abort()
    assert s.get(b"b") is None and s.applied_index() == 1


def test_reopen_keeps_committed_state(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=True)
    s.put(b"a", b"1", 3)
    s.set_applied(3)
    s.commit()
    s.close()
    again = Storage(tmp_path)
    assert again.applied_index() == 3 and again.get(b"a").revision == 3


def test_scan_bounds_prefix_and_continuation(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    for key in [b"a", b"b1", b"b2", b"b3", b"c"]:
        s.put(key, key, 1)
    s.commit()
    records, more, _ = s.scan(b"", b"", b"b", 2)
    assert [r.key for r in records] == [b"b1", b"b2"] and more
    records, more, _ = s.scan(b"", b"", b"b", 2, after=b"b2")
    assert [r.key for r in records] == [b"b3"] and not more
    records, _, _ = s.scan(b"b2", b"c", b"", 10)
    assert [r.key for r in records] == [b"b2", b"b3"]


def test_apply_ops_and_compare_and_set_sees_own_batch(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    assert commands.apply_op(s, 5, commands.put(b"k", b"v")) is None
    # Same batch, not yet committed: CAS must see revision 5.
    ok, current = commands.apply_op(s, 6, commands.compare_and_set(b"k", b"w", 5))
    assert ok and current is None
    failed, current = commands.apply_op(s, 7, commands.compare_and_set(b"k", b"x", 5))
    assert not failed and current.revision == 6 and current.value == b"w"
    assert commands.apply_op(s, 8, commands.delete([b"k", b"missing"])) == 1
    s.commit()
    assert s.get(b"k") is None


def test_snapshot_copy_and_install(tmp_path: Path) -> None:
    source = Storage(tmp_path / "a", fsync=False)
    for i in range(1000):
        source.put(b"k%04d" % i, b"v" * 50, i + 1)
    source.set_applied(1000)
    source.commit()
    txn = source.begin_snapshot()
    buffer = tmp_path / "snap.mdb"
    with open(buffer, "wb") as f:
        source.write_snapshot(txn, f)
    target = Storage(tmp_path / "b", fsync=False)
    target.put(b"stale", b"x", 1)
    target.commit()
    data = buffer.read_bytes()
    target.install_snapshot(io.BytesIO(data), len(data))
    assert target.applied_index() == 1000
    assert target.get(b"stale") is None
    assert target.checksum() == source.checksum()


def test_map_grows_before_it_fills(tmp_path: Path) -> None:
    s = Storage(tmp_path, map_size=1 << 20, fsync=False)  # 1 MiB to start
    value = b"x" * 4000
    for batch in range(40):  # ~16 MB in total, one transaction per batch
        for i in range(100):
            s.put(b"%03d-%03d" % (batch, i), value, batch + 1)
        s.set_applied(batch + 1)
        s.commit()
    assert s.applied_index() == 40 and s.key_count() == 4000


def test_get_columns_matches_reading_each_key(tmp_path: Path) -> None:
    s = Storage(tmp_path, fsync=False)
    for i in range(0, 20, 2):
        s.put(b"k%02d" % i, b"v%d" % i, 100 + i)
    s.set_applied(42)
    s.commit()
    keys = [b"k%02d" % i for i in (5, 4, 0, 19, 18, 4)]  # misses, hits, a duplicate, any order
    records, applied = [s.get(k) for k in keys], s.applied_index()
    found = [r for r in records if r is not None]
    assert s.get_columns(keys) == (
        [r.key for r in found],
        [r.value for r in found],
        [r.revision for r in found],
        applied,
    )
    assert applied == 42 and [r.key for r in found] == [b"k04", b"k00", b"k18", b"k04"]
