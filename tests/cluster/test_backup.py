"""Online backup and restore with real node processes (kvstore backup / backup verify / restore).

A 2-shard x 3-replica source cluster keeps taking writes while it is backed up; the backup is
restored into a new cluster beside it on the same host while the source still runs. The restore's
digests must equal the backup's, every write acknowledged before the backup began must be in it,
new writes must reach every restored replica (a replica seeded wrongly would skip the new
leader's first entries), and the source must be untouched. `backup verify` must catch a flipped
byte, a missing shard file, a shard missing from the manifest and a changed epoch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client, errors
from kvstore.cluster.backup import backup_cluster, replica_digest
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests.conftest import running_cluster, wait_until

PRELOAD_KEYS = 4000
VALUE = b"x" * 200


def kvstore_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("source"), shards=2, replicas=3) as cluster:
        with Client.from_cluster(cluster.dir, timeout=30.0) as kv:
            kv.put_many({b"pre:%05d" % i: VALUE + b"%d" % i for i in range(PRELOAD_KEYS)}, atomic=False)
        yield cluster


class Writer(threading.Thread):
    """Puts distinct keys one at a time (bounded in count and time), recording when each was acknowledged."""

    def __init__(self, cluster: LocalCluster, max_ops: int = 20_000, max_seconds: float = 40.0) -> None:
        super().__init__(daemon=True)
        self.cluster, self.max_ops, self.max_seconds = cluster, max_ops, max_seconds
        self.acked: list[tuple[bytes, bytes, float]] = []  # key, value, monotonic time of the ack
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with Client.from_cluster(self.cluster.dir, timeout=10.0) as kv:
            for i in range(self.max_ops):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                key, value = b"live:%06d" % i, b"v%d" % i
                try:
                    kv.put(key, value)
                except errors.KvError as exc:
                    self.failures.append(f"{key!r}: {exc}")
                    continue
                self.acked.append((key, value, time.monotonic()))


def test_a_backup_under_load_restores_beside_the_running_source(source: LocalCluster, tmp_path: Path) -> None:
    writer = Writer(source)
    writer.start()
    backup_dir, restored_dir = tmp_path / "backup", tmp_path / "restored"
    try:
        wait_until(lambda: len(writer.acked) >= 30, 30)
        began = time.monotonic()
        manifest = backup_cluster(source.dir, backup_dir)
        ended = time.monotonic()
        wait_until(lambda: any(t > ended for _, _, t in writer.acked), 20)  # still writing after it
    finally:
        writer.stop.set()
        writer.join(30)
    acked_before = [(k, v) for k, v, t in writer.acked if t < began]
    during = [k for k, _, t in writer.acked if began <= t <= ended]
    assert during, "no write was acknowledged while the backup ran: it did not run under load"
    assert writer.failures == [], writer.failures[:3]
    print(
        f"backup: {sum(e['bytes'] for e in manifest['shards'])} bytes in {ended - began:.2f}s, "
        f"{len(during)} writes acknowledged meanwhile"
    )

    assert [e["shard"] for e in manifest["shards"]] == [0, 1]
    assert manifest["epoch"] == source.cluster_map().epoch
    assert manifest["cluster_id"] == source.cluster_map().cluster_id != ""
    assert sum(e["key_count"] for e in manifest["shards"]) >= PRELOAD_KEYS + len(acked_before)

    verify = kvstore_cli("backup", "verify", str(backup_dir))
    assert verify.returncode == 0, verify.stderr

    started = time.monotonic()
    restore = kvstore_cli("restore", "--from", str(backup_dir), "--dir", str(restored_dir), "--timeout", "60")
    restored = LocalCluster(restored_dir)
    try:
        assert restore.returncode == 0, restore.stdout + restore.stderr
        print(f"restore: {time.monotonic() - started:.2f}s\n{restore.stdout}")
        for entry in manifest["shards"]:
            assert (
                f"shard {entry['shard']}: digest {entry['data_digest']}: matches the backup" in restore.stdout
            )

        # A new cluster, beside the source: its own ports and secrets.
        source_ports = {source.node_config(n).listen for n in source.node_names()}
        assert source_ports.isdisjoint(restored.node_config(n).listen for n in restored.node_names())
        assert restored.secret_path(0).read_text() != source.secret_path(0).read_text()
        # ... and its own cluster id: it can never take the source's peers or clients.
        assert restored.cluster_map().cluster_id not in ("", manifest["cluster_id"])
        assert f"the backup's was {manifest['cluster_id']}" in restore.stdout

        with Client.from_cluster(restored.dir, timeout=30.0) as kv:
            # Every write acknowledged before the backup began is there, preloaded or live.
            expected = dict(acked_before) | {b"pre:%05d" % i: VALUE + b"%d" % i for i in range(PRELOAD_KEYS)}
            keys = sorted(expected)
            for i in range(0, len(keys), 1000):
                got = kv.multi_get(keys[i : i + 1000])
                assert {k: v for k, v in got.items() if v is not None} == {
                    k: expected[k] for k in keys[i : i + 1000]
                }
            # New writes commit and reach every replica of their shard.
            new = {b"after:%03d" % i: b"new%d" % i for i in range(40)}
            revisions = {k: kv.put(k, v) for k, v in new.items()}
        restored_map = restored.cluster_map()
        for shard in restored_map.shards:
            entry = manifest["shards"][shard.id]
            mine = {k: v for k, v in new.items() if restored_map.shard_for(k).id == shard.id}
            assert mine and all(revisions[k] > entry["applied_index"] for k in mine)
            for replica in shard.replicas:
                wait_until(lambda r=replica, m=mine: _eventual_reads(r.address, m) == m, 20)

            def converged(s=shard) -> bool:
                return len({replica_digest(r.address) for r in s.replicas}) == 1

            wait_until(converged, 20)

        # Restarted (the seed snapshot loaded again, the log replayed after it), it still holds it all.
        restored.down()
        restored.start_all()
        restored.wait_until_serving(timeout=60)
        with Client.from_cluster(restored.dir, timeout=30.0) as kv:
            assert kv.multi_get(sorted(new)) == new
            assert kv.get(b"pre:00001") == VALUE + b"1"
            assert kv.put(b"after:restart", b"ok") > max(revisions.values())
    finally:
        restored.down()

    # The source is untouched: still serving every write, its replicas agreeing.
    with Client.from_cluster(source.dir, timeout=30.0) as kv:
        assert kv.put(b"source-after-restore", b"ok") > 0
        live = [k for k, _, _ in writer.acked]
        got = kv.multi_get(live[:1000])
        assert all(v is not None for v in got.values())
    for shard in source.cluster_map().shards:
        wait_until(lambda s=shard: len({replica_digest(r.address) for r in s.replicas}) == 1, 20)


def _eventual_reads(address: str, keys: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What one replica holds of `keys`, read locally (no barrier, no redirect)."""
    found = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KVStub(channel)
        for key in keys:
            answer = stub.Get(
                pb.GetRequest(key=key, read=pb.ReadOptions(consistency=pb.EVENTUAL)), timeout=5.0
            )
            if answer.found:
                found[key] = answer.kv.value
    return found


# ----- backup verify ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backup(source: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "backup"
    made = kvstore_cli("backup", "--cluster", str(source.dir), "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "backup of 2 shard(s)" in made.stdout
    again = kvstore_cli("backup", "--cluster", str(source.dir), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr  # never over an existing backup
    whole = kvstore_cli("backup", "verify", str(out))
    assert whole.returncode == 0 and "is whole" in whole.stdout, whole.stderr
    return out


def _damaged(backup: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / damage
    shutil.copytree(backup, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "flipped-byte":
        data = bytearray((copy / "shard-0.mdb").read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / "shard-0.mdb").write_bytes(bytes(data))
    elif damage == "missing-file":
        (copy / "shard-1.mdb").unlink()
    elif damage == "missing-shard":
        manifest["shards"] = [e for e in manifest["shards"] if e["shard"] != 1]
    elif damage == "epoch":
        manifest["epoch"] += 1
    elif damage == "rewritten-data":  # a consistent checksum over a different store
        shutil.copy(copy / "shard-1.mdb", copy / "shard-0.mdb")
        entry = manifest["shards"][0]
        entry["sha256"], entry["bytes"] = manifest["shards"][1]["sha256"], manifest["shards"][1]["bytes"]
    manifest_path.write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("flipped-byte", r"shard 0: .*SHA-256 .* \(corrupt\)"),
        ("missing-file", "shard 1: .*shard-1.mdb is missing"),
        ("missing-shard", "shards of the map missing from the backup: \\[1\\]"),
        ("epoch", "manifest epoch 2 is not its map's epoch 1"),
        ("rewritten-data", "shard 0: (applied_index|key_count|data_digest) .* differs"),
    ],
)
def test_verify_fails_on_a_damaged_backup(backup: Path, tmp_path: Path, damage: str, says: str) -> None:
    damaged = _damaged(backup, tmp_path, damage)
    result = kvstore_cli("backup", "verify", str(damaged))
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(says, result.stderr), result.stderr
    if damage == "missing-shard":
        assert "slots belong to shards the backup lacks" in result.stderr


def test_restore_refuses_a_damaged_backup_and_starts_nothing(backup: Path, tmp_path: Path) -> None:
    damaged = _damaged(backup, tmp_path, "flipped-byte")
    result = kvstore_cli("restore", "--from", str(damaged), "--dir", str(tmp_path / "new"))
    assert result.returncode == 1 and "does not verify" in result.stderr, result.stderr
    assert not (tmp_path / "new" / "cluster.json").exists()


def test_a_cancelled_backup_stream_releases_its_copy(source: LocalCluster) -> None:
    """A caller that goes away mid-stream stops the copy: the next backup of that replica runs
    (one copy at a time per replica: a leaked one would refuse it RESOURCE_EXHAUSTED forever)."""
    address = source.cluster_map().shard(0).replicas[0].address

    def stream(chunk: int) -> grpc.Future:
        channel = grpc.insecure_channel(address)
        return pb_grpc.AdminStub(channel).Backup(pb.BackupRequest(shard=0, chunk_bytes=chunk), timeout=30)

    first = stream(64 << 10)
    assert next(first).header.revision > 0
    first.cancel()

    def completes() -> bool:
        try:
            return list(stream(0))[-1].done
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            return False

    wait_until(completes, 10)
    with grpc.insecure_channel(address) as channel:
        wrong = pb_grpc.AdminStub(channel).Backup(pb.BackupRequest(shard=1), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            list(wrong)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds shard 0, not shard 1" in (refused.value.details() or "")


def test_control_without_the_seed_snapshot_writes_after_a_restore_are_skipped(
    backup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the new-writes check above: replicas seeded with the store alone (LMDB at
    the backup's index, an empty Raft log) skip the new leader's entries up to that index, so a
    write is not applied anywhere. The check above would catch a restore that seeded so."""
    from kvstore.cluster import backup as backup_module

    monkeypatch.setattr(backup_module, "write_seed_snapshot", lambda *args: None)
    restored = LocalCluster(tmp_path / "unseeded")
    try:
        digests = backup_module.restore_cluster(backup, restored.dir, 60.0, say=lambda _: None)
        assert all(d.matches for d in digests)  # the data is there: the loss only shows on writes
        shard = restored.cluster_map().shard_for(b"after:lost")
        leader = str(wait_until(lambda: restored.leader_of(shard.id), 15))
        with grpc.insecure_channel(restored.cluster_map().replica(leader)[1].address) as channel:
            with pytest.raises(grpc.RpcError) as skipped:  # one attempt, no SDK retries
                pb_grpc.KVStub(channel).Put(pb.PutRequest(key=b"after:lost", value=b"x"), timeout=10)
        assert skipped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # unknown outcome
        for replica in shard.replicas:
            assert _eventual_reads(replica.address, {b"after:lost": b"x"}) == {}
    finally:
        restored.down()


def test_a_paused_replica_is_passed_over(
    source: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that answers nothing (SIGSTOPped) is given up after the stall bound and the
    shard is copied from another one: a backup never hangs on one node."""
    from kvstore.cluster import backup as backup_module

    monkeypatch.setattr(backup_module, "STALL_SECONDS", 2.0)
    leader = str(wait_until(lambda: source.leader_of(0), 15))
    paused = next(r.name for r in source.cluster_map().shard(0).replicas if r.name != leader)  # tried first
    source.kill(paused, "STOP")
    try:
        manifest = backup_cluster(source.dir, tmp_path / "backup", say=lambda _: None)
    finally:
        source.kill(paused, "CONT")
    assert manifest["shards"][0]["served_by"] != paused
    assert kvstore_cli("backup", "verify", str(tmp_path / "backup")).returncode == 0
    wait_until(lambda: all(r["health"] == "serving" for s in source.status() for r in s["replicas"]), 30)
