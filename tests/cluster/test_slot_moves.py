"""Moving slots between shards while they serve (issue 16, item 3), with real node processes: a
range moves under a write and read load and every acknowledged write is found afterwards, on the
new owner, with no strong read ever older than a write acknowledged before it began; a move whose
coordinator stops mid-way is resumed by another after the source's and the target's leaders are
killed; a move aborted after its fence leaves the source owning (and serving) all of it."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvstore import Client, errors
from kvstore.cluster.backup import BackupFailed, backup_cluster, restore_cluster
from kvstore.cluster.local import LocalCluster
from kvstore.meta.mover import Mover
from kvstore.meta.store import MapStore, MoveRecord
from kvstore.routing.cluster_map import ClusterMap
from kvstore.routing.ring import slot_of
from tests.conftest import TEST_RAFT, new_leader


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("moves") / "c")
    cluster.create(shards=2, replicas=3, meta_replicas=3, raft=TEST_RAFT)
    cluster.start_all()
    try:
        cluster.wait_until_serving(timeout=60)
        _stored_map(cluster)  # the group has seeded the map
        yield cluster
    finally:
        cluster.down()


def _stored_map(cluster: LocalCluster) -> ClusterMap:
    async def read() -> ClusterMap:
        store = MapStore(cluster.cluster_map())
        try:
            for _ in range(100):
                stored, _ = await store.read()
                if stored is not None:
                    return stored
                await asyncio.sleep(0.2)
            raise AssertionError("the metadata group was never seeded")
        finally:
            await store.close()

    return asyncio.run(read())


def _runs(cluster_map: ClusterMap, owner: int) -> list[tuple[int, int]]:
    """The slot runs `owner` holds, longest first."""
    runs: list[tuple[int, int]] = []
    for slot in range(65536):
        if cluster_map.slots.shard_for_slot(slot) != owner:
            continue
        if runs and runs[-1][1] == slot - 1:
            runs[-1] = (runs[-1][0], slot)
        else:
            runs.append((slot, slot))
    return sorted(runs, key=lambda r: r[0] - r[1])


def _keys(first: int, last: int, count: int, tag: str) -> list[bytes]:
    found = []
    for i in range(2_000_000):
        key = f"{tag}:{i}".encode()
        if first <= slot_of(key) <= last:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("too few keys")


def _move(cluster: LocalCluster, first: int, last: int, target: int, **kwargs: object) -> list[MoveRecord]:
    async def run() -> list[MoveRecord]:
        mover = Mover(cluster.cluster_map(), cluster.admin_token())
        try:
            return await mover.move_slots(first, last, target, **kwargs)  # type: ignore[arg-type]
        finally:
            await mover.close()

    return asyncio.run(run())


def _resume(cluster: LocalCluster, move_id: int, abort: bool = False) -> MoveRecord:
    async def run() -> MoveRecord:
        mover = Mover(cluster.cluster_map(), cluster.admin_token())
        try:
            return await (mover.abort(move_id) if abort else mover.resume(move_id))
        finally:
            await mover.close()

    return asyncio.run(run())


@dataclass
class Load:
    """One writer (sequential puts of increasing numbers) and one strong reader, over `keys`."""

    cluster: LocalCluster
    keys: list[bytes]
    acked: dict[bytes, int] = field(default_factory=dict)
    uncertain: dict[bytes, set[int]] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    writes: int = 0
    reads: int = 0

    scans: int = 0
    scan_problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write),
            threading.Thread(target=self._read),
            threading.Thread(target=self._scan),
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _write(self) -> None:
        rng = random.Random(1)
        deadline = time.monotonic() + 120
        with Client.from_cluster(self.cluster.dir, timeout=10) as kv:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline and n < 50_000:
                n += 1
                key = rng.choice(self.keys)
                try:
                    kv.put(key, b"%d" % n)
                    self.acked[key] = n
                except errors.UnknownOutcome:
                    self.uncertain.setdefault(key, set()).add(n)
                except errors.KvError as exc:
                    self.errors.append(f"put: {exc.kind}: {exc.message}")
                self.writes += 1

    def _read(self) -> None:
        rng = random.Random(2)
        deadline = time.monotonic() + 120
        with Client.from_cluster(self.cluster.dir, timeout=10) as kv:
            while not self._stop.is_set() and time.monotonic() < deadline and self.reads < 50_000:
                key = rng.choice(self.keys)
                floor = self.acked.get(key, 0)  # acknowledged before this read began
                try:
                    value = kv.get(key)
                except errors.KvError as exc:
                    self.errors.append(f"get: {exc.kind}: {exc.message}")
                    continue
                self.reads += 1
                if int(value or 0) < floor:
                    self.stale.append(f"{key!r}: read {value!r} after {floor} was acknowledged")

    def _scan(self) -> None:
        """Whole scans, page by page, while slots move: each of `keys` listed exactly once."""
        wanted = set(self.keys)
        deadline = time.monotonic() + 120
        with Client.from_cluster(self.cluster.dir, timeout=10) as kv:
            while not self._stop.is_set() and time.monotonic() < deadline and self.scans < 1000:
                seen: list[bytes] = []
                continuation = b""
                try:
                    while True:
                        page = kv.scan(limit=500, continuation=continuation)
                        seen += [item.key for item in page if item.key in wanted]
                        continuation = page.continuation
                        if not continuation:
                            break
                except errors.KvError as exc:
                    self.errors.append(f"scan: {exc.kind}: {exc.message}")
                    continue
                self.scans += 1
                if len(seen) != len(set(seen)) or set(seen) != wanted:
                    twice = len(seen) - len(set(seen))
                    self.scan_problems.append(f"{twice} listed twice, {len(wanted - set(seen))} missing")

    def check_final(self, kv: Client) -> None:
        found = kv.multi_get(self.keys)
        for key in self.keys:
            got = int(found.get(key, b"0"))
            allowed = {self.acked.get(key, 0)} | {
                n for n in self.uncertain.get(key, ()) if n > self.acked.get(key, 0)
            }
            assert got in allowed, f"{key!r} holds {got}, acknowledged {self.acked.get(key)}"


def _owned_counts(cluster: LocalCluster, keys: list[bytes]) -> dict[int, int]:
    return {s["shard"]: s["key_count"] for s in cluster.status()}


def test_a_range_moves_under_load_and_every_acknowledged_write_is_on_its_new_owner(
    cluster: LocalCluster,
) -> None:
    before = _stored_map(cluster)
    first, last = _runs(before, owner=0)[0]
    keys = _keys(first, last, 1500, "moving")
    bystanders = _keys(0, 65535, 300, "still")
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many({k: b"0" for k in keys + bystanders}, atomic=False)
    counts_before = _owned_counts(cluster, keys)

    with Load(cluster, keys + bystanders) as load:
        time.sleep(1.0)
        began = time.monotonic()
        (record,) = _move(cluster, first, last, target=1)
        took = time.monotonic() - began
        time.sleep(1.0)
    print(
        f"moved {record.keys_copied} keys + {record.changes_applied} changes in {took:.2f}s; "
        f"{load.writes} writes, {load.reads} reads meanwhile"
    )
    assert record.phase == "done" and record.keys_copied >= len(keys) - 10
    assert load.writes > 50 and load.reads > 50 and load.scans > 2  # the load ran through the move
    assert not load.stale, load.stale[:5]
    assert not load.scan_problems, load.scan_problems[:5]
    assert not load.errors, load.errors[:5]

    after = _stored_map(cluster)
    assert after.epoch == before.epoch + 1 and record.epoch == after.epoch
    assert {after.slots.shard_for_slot(s) for s in range(first, last + 1)} == {1}
    with Client.from_cluster(cluster.dir) as kv:
        load.check_final(kv)
    # The keys left shard 0 (cleaned up) and are on shard 1, every replica.
    counts = _owned_counts(cluster, keys)
    assert counts[0] == counts_before[0] - len(keys)
    assert counts[1] == counts_before[1] + len(keys)


def test_a_stopped_move_resumes_after_its_shards_lose_their_leaders(cluster: LocalCluster) -> None:
    before = _stored_map(cluster)
    first, last = _runs(before, owner=0)[0]
    keys = _keys(first, last, 500, "resumed")
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many({k: b"1" for k in keys}, atomic=False)
    (record,) = _move(cluster, first, last, target=1, stop_at="catching_up")  # a coordinator "crash"
    assert record.phase == "catching_up" and record.keys_copied >= len(keys)  # (and any other key there)
    with Client.from_cluster(cluster.dir) as kv:
        kv.put(keys[0], b"written after the copy")  # reaches the target by the catch-up
        kv.delete(keys[1])
    for shard in (0, 1):
        leader = cluster.leader_of(shard)
        assert leader is not None
        cluster.kill(leader)
        new_leader(cluster, shard, leader)
        cluster.start(leader)
    done = _resume(cluster, record.id)
    assert done.phase == "done"
    with Client.from_cluster(cluster.dir) as kv:
        got = kv.multi_get(keys)
    assert got[keys[0]] == b"written after the copy" and keys[1] not in got
    assert all(got[k] == b"1" for k in keys[2:])
    assert {_stored_map(cluster).slots.shard_for_slot(s) for s in range(first, last + 1)} == {1}


def test_a_move_aborted_after_its_fence_leaves_the_source_owning_all_of_it(cluster: LocalCluster) -> None:
    before = _stored_map(cluster)
    first, last = _runs(before, owner=0)[0]
    keys = _keys(first, last, 200, "aborted")
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many({k: b"2" for k in keys}, atomic=False)
    counts_before = _owned_counts(cluster, keys)
    (record,) = _move(cluster, first, last, target=1, stop_at="fenced")
    with Client.from_cluster(cluster.dir, timeout=1.0) as kv:
        with pytest.raises((errors.Moving, errors.Timeout, errors.UnknownOutcome)):
            kv.put(keys[0], b"while fenced")  # retried until its deadline: the range is fenced
    aborted = _resume(cluster, record.id, abort=True)
    assert aborted.phase == "aborted"
    assert _stored_map(cluster).epoch == before.epoch  # the map never changed
    with Client.from_cluster(cluster.dir) as kv:
        kv.put(keys[0], b"after the abort")
        got = kv.multi_get(keys)
    assert got[keys[0]] == b"after the abort" and all(got[k] == b"2" for k in keys[1:])
    counts = _owned_counts(cluster, keys)
    assert counts == counts_before  # the target dropped what it imported


def test_a_session_token_from_the_source_keeps_its_promise_on_the_target(cluster: LocalCluster) -> None:
    """A session token names shards; after a move, its entry for the source says nothing to the
    target. The promise holds anyway: a target replica serves the range only once it has applied
    its `serving` claim, which follows every import through the fence, and so every write the
    session made at the source. Read from the target's followers right after the move."""
    before = _stored_map(cluster)
    first, last = _runs(before, owner=0)[0]
    keys = _keys(first, last, 50, "session")
    with Client.from_cluster(cluster.dir, consistency="session", read_policy="followers_only") as kv:
        for key in keys:
            kv.put(key, b"mine")  # at the source, shard 0
        _move(cluster, first, last, target=1)
        for key in keys:
            assert kv.get(key) == b"mine"
        assert kv.core.cluster_map.slots.shard_for(keys[0]) == 1


def test_add_shard_under_load_takes_its_share_and_loses_nothing(cluster: LocalCluster) -> None:
    """`kvstore cluster add-shard` (issue 16): a third shard starts and takes ~1/3 of the slots,
    only from the other two, while a writer and a reader run; every acknowledged write is then
    found, and no strong read was older than a write acknowledged before it began."""
    before = _stored_map(cluster)
    keys = [f"spread:{i}".encode() for i in range(1500)]
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many({k: b"0" for k in keys}, atomic=False)
    with Load(cluster, keys) as load:
        time.sleep(1.0)
        began = time.monotonic()
        added = subprocess.run(
            [sys.executable, "-m", "kvstore", "cluster", "add-shard", "--dir", str(cluster.dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        took = time.monotonic() - began
        time.sleep(1.0)
    assert added.returncode == 0, added.stdout + added.stderr
    print(added.stdout[-600:], f"add-shard took {took:.1f}s; {load.writes} writes, {load.reads} reads")
    assert not load.stale, load.stale[:5]
    assert not load.errors, load.errors[:5]
    assert not load.scan_problems, load.scan_problems[:5]
    assert load.writes > 50 and load.reads > 50 and load.scans > 2

    after = _stored_map(cluster)
    assert [s.id for s in after.shards] == [0, 1, 2]
    counts = after.slots.slot_counts()
    assert 0.25 < counts[2] / 65536 < 0.42, counts
    # Only slots of the new shard changed owner: none moved between the old two.
    assert all(
        after.slots.shard_for_slot(s) in (before.slots.shard_for_slot(s), 2) for s in range(0, 65536, 7)
    )
    with Client.from_cluster(cluster.dir) as kv:
        load.check_final(kv)
    status = {s["shard"]: s for s in cluster.status()}
    on_new = sum(1 for k in keys if after.slots.shard_for(k) == 2)
    assert status[2]["leader"] and status[2]["key_count"] >= on_new > 0


def test_a_backup_refuses_a_move_in_flight_and_restores_moved_slots(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Backups know about moves (issue 16, item 6b): none is taken while a move is in flight (a
    range would be on both sides, half imported); once moves are done, a backup restores with the
    slot table they made, and the restored cluster moves slots again (its move ids start afresh:
    the copies' finished claims are forgotten)."""
    before = _stored_map(cluster)
    first, last = _runs(before, owner=0)[0]
    (record,) = _move(cluster, first, last, target=1, stop_at="copying")
    with pytest.raises(BackupFailed, match=f"move {record.id} .* is in phase copying"):
        backup_cluster(cluster.dir, tmp_path / "refused", say=lambda _: None)
    assert _resume(cluster, record.id, abort=True).phase == "aborted"

    keys = [f"backed:{i}".encode() for i in range(300)]
    with Client.from_cluster(cluster.dir) as kv:
        kv.put_many({k: b"b" for k in keys}, atomic=False)
    backup_cluster(cluster.dir, tmp_path / "backup", say=lambda _: None)
    restored = LocalCluster(tmp_path / "restored")
    try:
        digests = restore_cluster(tmp_path / "backup", restored.dir, say=lambda _: None)
        assert all(d.matches for d in digests)
        assert restored.cluster_map().slots == _stored_map(cluster).slots  # the moved slots stayed put
        with Client.from_cluster(restored.dir) as kv:
            assert kv.multi_get(keys) == {k: b"b" for k in keys}
        again = _stored_map(restored)
        run = _runs(again, owner=0)[0]
        (moved,) = _move(restored, run[0], run[1], target=1)
        assert moved.id == 1 and moved.phase == "done"
    finally:
        restored.down()
