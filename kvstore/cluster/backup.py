"""Online backup and restore of a local cluster (`kvstore backup`, `backup verify`, `restore`).

A backup directory holds one file per shard, `shard-<N>.mdb` (a compacted LMDB copy of one
replica's store, taken by Admin.Backup after a read barrier: every write acknowledged before the
backup began is in it), and `manifest.json`, written last (no manifest: no backup):

    {"format": "kvstore-backup", "version": 1, "created": "<UTC ISO time>",
     "source": "<cluster dir>", "epoch": <map epoch>, "cluster_map": {<cluster.json>},
     "shards": [{"shard": N, "file": "shard-N.mdb", "bytes", "sha256", "applied_index",
                 "key_count", "data_digest", "served_by", "epoch", "seconds"}, ...]}

Each shard is copied at one Raft index of its own, while writes go on; there is no single point
in time across shards (README, "Backup and restore"). `data_digest` is `Storage.checksum`'s digest
(`kvstore.storage.copies`), so a restored replica, scanned, must give the same value.

Restore creates a new cluster through `LocalCluster.create` (fresh ports and secrets), with the
backup's shard count, replicas per shard and ring (so every slot maps to the same shard), seeds
every replica's data directory (the store, and a Raft snapshot whose log ends at the backup's
applied index: `snapshots.write_seed_snapshot`) before its first start, starts it, and compares
each replica's digest with the backup's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from kvstore import errors
from kvstore.cluster.local import LocalCluster
from kvstore.config import RaftSettings, StorageSettings, grpc_message_options
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.replication.snapshots import write_seed_snapshot
from kvstore.routing.cluster_map import ClusterMap
from kvstore.routing.ring import SLOT_COUNT as SLOTS
from kvstore.storage.copies import DataDigest, NotAStoreCopy, describe_copy
from kvstore.storage.disk import fsync_directory
from kvstore.storage.move_tables import forget_moves

FORMAT, VERSION = "kvstore-backup", 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20
STALL_SECONDS = 20.0  # a replica that sends nothing for this long is given up (the next one is tried)
MAX_SECONDS = 6 * 3600.0  # the longest one shard's copy may take
_CHANNEL_OPTIONS = grpc_message_options(8 << 20)  # chunks are at most 4 MiB (server/backup.py)

Say = Callable[[str], None]


class BackupFailed(RuntimeError):
    """A backup, verification or restore that cannot succeed; the message says why."""


@dataclass(frozen=True)
class ShardDigest:
    shard: int
    expected: str  # the backup's
    replicas: dict[str, str]  # replica name -> its digest after the restore

    @property
    def matches(self) -> bool:
        return all(d == self.expected for d in self.replicas.values())


# ----- backup ---------------------------------------------------------------------------------


def _moves_at_rest(cluster: LocalCluster, cluster_map: ClusterMap) -> int:
    """The number of slot moves the metadata group records (0 without a group), once none is in
    flight: a copy taken mid-move would hold a range on both sides, one of them half imported,
    so a backup refuses to start then (and fails if one starts meanwhile: the count changes)."""
    if not cluster_map.meta:
        return 0
    import asyncio

    from kvstore.meta.store import MapStore, MoveRecords

    async def read() -> list[Any]:
        store = MapStore(cluster_map)
        try:
            return await MoveRecords(store).all()
        finally:
            await store.close()

    try:
        moves = asyncio.run(read())
    except errors.KvError as exc:
        raise BackupFailed(f"the metadata group cannot say whether slots are moving: {exc.message}") from None
    busy = [m for m in moves if not m.finished_phase]
    if busy:
        m = busy[0]
        raise BackupFailed(
            f"move {m.id} ({m.describe()}) is in phase {m.phase}: resume it to done or abort it "
            "(kvstore cluster migrations), then back up"
        )
    return len(moves)


def backup_cluster(cluster_dir: str | Path, out_dir: str | Path, say: Say = print) -> dict[str, Any]:
    """Back up every shard of the cluster at `cluster_dir` into `out_dir` (new or empty); returns
    the manifest. Shards are copied in parallel, each from the first replica that serves it
    (followers first, the leader last)."""
    cluster = LocalCluster(cluster_dir)
    cluster_map = cluster.current_map(timeout=2.0)  # the metadata group's, not an older cluster.json
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a backup goes into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    moves_before = _moves_at_rest(cluster, cluster_map)
    leaders = {s["shard"]: s["leader"] for s in cluster.status(timeout=2.0)}
    with ThreadPoolExecutor(len(cluster_map.shards)) as pool:
        entries = list(
            pool.map(
                lambda shard: _backup_shard(shard, leaders.get(shard.id), cluster_map.cluster_id, out, say),
                cluster_map.shards,
            )
        )
    for entry in entries:
        if entry["epoch"] != cluster_map.epoch:
            raise BackupFailed(
                f"shard {entry['shard']} was copied under cluster map epoch {entry['epoch']}, but "
                f"{cluster.map_path} has epoch {cluster_map.epoch}: the map changed; back up again"
            )
    if _moves_at_rest(cluster, cluster_map) != moves_before:
        raise BackupFailed("a slot move began while the shards were copied: back up again once it is done")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(cluster.dir),
        "cluster_id": cluster_map.cluster_id,  # a restore gets a new one (README, "Backup and restore")
        "epoch": cluster_map.epoch,
        "cluster_map": json.loads(cluster_map.to_json()),
        "shards": entries,
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_atomically(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _backup_shard(shard: Any, leader: str | None, cluster_id: str, out: Path, say: Say) -> dict[str, Any]:
    # A follower first: the copy's reading, hashing and sending then leave the leader, which
    # every write goes through, alone (measured: a writer's puts/s fell by a third while a
    # follower served the copy, by five sixths while the leader did). The read barrier makes a
    # follower's copy hold every acknowledged write all the same.
    replicas = sorted(shard.replicas, key=lambda r: r.name == leader)
    failures = []
    for replica in replicas:
        try:
            return _copy_from(shard.id, replica.name, replica.address, cluster_id, out, say)
        except (grpc.RpcError, BackupFailed, NotAStoreCopy) as exc:
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            failures.append(f"{replica.name}: {why}")
        finally:
            (out / f"shard-{shard.id}.mdb.tmp").unlink(missing_ok=True)
    raise BackupFailed(f"no replica of shard {shard.id} gave a copy: {'; '.join(failures)}")


def _copy_from(
    shard_id: int, name: str, address: str, cluster_id: str, out: Path, say: Say
) -> dict[str, Any]:
    started = time.monotonic()
    final = out / f"shard-{shard_id}.mdb"
    tmp = out / f"shard-{shard_id}.mdb.tmp"
    sha = hashlib.sha256()
    size = 0
    header: pb.ResponseHeader | None = None
    done: pb.BackupChunk | None = None
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel, open(tmp, "wb") as f:
        stream = pb_grpc.AdminStub(channel).Backup(
            pb.BackupRequest(shard=shard_id, chunk_bytes=CHUNK_BYTES),
            timeout=MAX_SECONDS,
            # Another cluster's node at this address (a restored copy that took its port) refuses.
            metadata=((errors.CLUSTER_ID_KEY, cluster_id),) if cluster_id else None,
        )
        with _StallGuard(stream, STALL_SECONDS) as guard:  # a paused node must not hang the backup
            try:
                for message in stream:
                    guard.progress()
                    if message.HasField("header"):
                        header = message.header
                    elif message.done:
                        done = message
                    else:
                        sha.update(message.data)
                        f.write(message.data)
                        size += len(message.data)
            except grpc.RpcError:
                if guard.fired:
                    raise BackupFailed(f"sent nothing for {STALL_SECONDS:g}s: given up") from None
                raise
        f.flush()
        os.fsync(f.fileno())
    if header is None or done is None:
        raise BackupFailed(f"{name}: the stream ended before the copy did")
    if done.size != size or done.sha256 != sha.hexdigest():
        raise BackupFailed(
            f"{name}: received {size} bytes with SHA-256 {sha.hexdigest()}, the node sent {done.size} "
            f"bytes with {done.sha256}"
        )
    os.replace(tmp, final)
    fsync_directory(out)
    contents = describe_copy(final)
    if contents.applied_index != header.revision:
        raise BackupFailed(
            f"{name}: the copy holds applied index {contents.applied_index}, the node said {header.revision}"
        )
    seconds = time.monotonic() - started
    say(
        f"shard {shard_id}: {size} bytes from {name} at applied index {header.revision}, "
        f"{contents.key_count} keys, digest {contents.data_digest} ({seconds:.2f}s)"
    )
    return {
        "shard": shard_id,
        "file": final.name,
        "bytes": size,
        "sha256": done.sha256,
        "applied_index": contents.applied_index,
        "key_count": contents.key_count,
        "data_digest": contents.data_digest,
        "served_by": name,
        "term": header.term,
        "epoch": header.epoch,
        "seconds": round(seconds, 3),
    }


class _StallGuard:
    """Cancels a call that brings no message for `seconds` (its iterator then raises CANCELLED)."""

    def __init__(self, call: Any, seconds: float) -> None:
        self._call, self._seconds = call, seconds
        self._last = time.monotonic()
        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="backup-stall-guard", daemon=True)

    def __enter__(self) -> _StallGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self._seconds / 4)):
            if time.monotonic() - self._last > self._seconds:
                self.fired = True
                self._call.cancel()
                return


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


# ----- verify ---------------------------------------------------------------------------------


def load_manifest(backup_dir: str | Path) -> dict[str, Any]:
    path = Path(backup_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupFailed(f"{path} is missing: not a backup, or the backup never finished") from None
    except (OSError, ValueError) as exc:
        raise BackupFailed(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupFailed(f"{path} is not a kvstore backup manifest")
    if manifest.get("version") != VERSION:
        found = manifest.get("version")
        raise BackupFailed(f"{path}: backup format version {found!r}; this kvstore reads {VERSION}")
    return manifest


def verify_backup(backup_dir: str | Path, say: Say = print) -> list[str]:
    """Every check of a backup directory; returns the problems found (none: the backup is whole).

    The manifest and its map (same epoch, every shard of the map present, every slot of the ring
    on a backed-up shard), and per shard file: size, SHA-256, a readable LMDB store whose applied
    index, key count and data digest are the manifest's."""
    root = Path(backup_dir)
    try:
        manifest = load_manifest(root)
        cluster_map = ClusterMap.from_json(json.dumps(manifest["cluster_map"]))
        entries = {int(e["shard"]): e for e in manifest["shards"]}
    except BackupFailed as exc:
        return [str(exc)]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{root / MANIFEST}: malformed ({exc!r})"]
    problems = []
    if manifest.get("epoch") != cluster_map.epoch:
        problems.append(f"manifest epoch {manifest.get('epoch')} is not its map's epoch {cluster_map.epoch}")
    map_ids = {s.id for s in cluster_map.shards}
    if missing := sorted(map_ids - set(entries)):
        problems.append(f"shards of the map missing from the backup: {missing}")
    if extra := sorted(set(entries) - map_ids):
        problems.append(f"shards in the backup but not in its map: {extra}")
    table = cluster_map.slots
    uncovered = sum(1 for slot in range(SLOTS) if table.shard_for_slot(slot) not in entries)
    if uncovered:
        problems.append(f"{uncovered} of {SLOTS} slots belong to shards the backup lacks")
    for shard_id in sorted(entries):
        e = entries[shard_id]
        wrong = _verify_shard(root, e, cluster_map.epoch)
        problems += [f"shard {shard_id}: {p}" for p in wrong]
        if not wrong:
            say(
                f"shard {shard_id}: ok ({e['bytes']} bytes, applied index {e['applied_index']}, "
                f"{e['key_count']} keys, digest {e['data_digest']})"
            )
    return problems


def _verify_shard(root: Path, entry: dict[str, Any], epoch: int) -> list[str]:
    path = root / str(entry.get("file", ""))
    if entry.get("epoch") != epoch:
        return [f"copied under map epoch {entry.get('epoch')}, the backup's map has {epoch}"]
    if not path.is_file():
        return [f"{path} is missing"]
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return [f"{path} has {size} bytes, the manifest says {entry.get('bytes')}"]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    if sha.hexdigest() != entry.get("sha256"):
        return [f"{path}: SHA-256 {sha.hexdigest()} is not the manifest's {entry.get('sha256')} (corrupt)"]
    try:
        contents = describe_copy(path)
    except NotAStoreCopy as exc:
        return [str(exc)]
    wrong = [
        f"{field} {got} differs from the manifest's {entry.get(field)}"
        for field, got in (
            ("applied_index", contents.applied_index),
            ("key_count", contents.key_count),
            ("data_digest", contents.data_digest),
        )
        if got != entry.get(field)
    ]
    return wrong


# ----- restore --------------------------------------------------------------------------------


def restore_cluster(
    backup_dir: str | Path,
    new_dir: str | Path,
    timeout: float = 60.0,
    insecure: bool = False,
    durability: str = "fsync",
    say: Say = print,
) -> list[ShardDigest]:
    """Create, seed and start a new cluster at `new_dir` from a verified backup; returns each
    shard's digests (the backup's and every restored replica's)."""
    root = Path(backup_dir)
    started = time.monotonic()
    problems = verify_backup(root, say=lambda _: None)
    if problems:
        raise BackupFailed("the backup does not verify: " + "; ".join(problems))
    say(f"backup verified in {time.monotonic() - started:.2f}s")
    manifest = load_manifest(root)
    source = ClusterMap.from_json(json.dumps(manifest["cluster_map"]))
    ids = [s.id for s in source.shards]
    if ids != list(range(len(ids))) or len({len(s.replicas) for s in source.shards}) != 1:
        raise BackupFailed(f"a restore makes shards 0..n-1 of equal size; this backup's map has shards {ids}")
    cluster = LocalCluster(new_dir)
    new_map = cluster.create(
        shards=len(ids),
        replicas=len(source.shards[0].replicas),
        vnodes=source.vnodes_per_shard,
        raft=RaftSettings(insecure=insecure),
        storage=StorageSettings(durability=durability),
        meta_replicas=len(source.meta),  # its group is seeded with the new map at its first start
    )
    if new_map.cluster_id == manifest.get("cluster_id"):  # create() draws a fresh one: never
        raise BackupFailed("the new cluster got the backup's cluster id; it could talk to the original")
    if source.slot_ranges or source.ring_shards:  # slots had moved: the backup's table, not the ring's
        new_map = dataclasses.replace(new_map, slot_ranges=source.slot_ranges, ring_shards=source.ring_shards)
        new_map.save(cluster.map_path)
    if new_map.slots != source.slots:
        raise BackupFailed("the new cluster would place slots on other shards than the backup's")
    entries = {int(e["shard"]): e for e in manifest["shards"]}
    started = time.monotonic()
    seeds = [
        (Path(cluster.node_config(r.name).data_dir), root / entries[s.id]["file"], entries[s.id], members)
        for s in new_map.shards
        for members in [[replica.raft_address for replica in s.replicas]]
        for r in s.replicas
    ]
    with ThreadPoolExecutor(4) as pool:  # the disk is the limit; a few writers keep it busy
        list(pool.map(lambda seed: _seed(*seed), seeds))
    seconds = time.monotonic() - started
    say(
        f"seeded {len(seeds)} replicas in {seconds:.2f}s; starting the cluster at {cluster.dir} "
        f"(cluster id {new_map.cluster_id}; the backup's was {manifest.get('cluster_id') or 'not recorded'})"
    )
    started = time.monotonic()
    cluster.start_all()
    try:
        cluster.wait_until_serving(timeout=timeout)
    except Exception:
        cluster.down()
        raise
    say(f"serving after {time.monotonic() - started:.2f}s")
    started = time.monotonic()
    replicas = [r for s in new_map.shards for r in s.replicas]
    with ThreadPoolExecutor(len(replicas)) as pool:
        read = pool.map(lambda r: replica_digest(r.address), replicas)
        found = dict(zip((r.name for r in replicas), read, strict=True))
    digests = [
        ShardDigest(s.id, entries[s.id]["data_digest"], {r.name: found[r.name] for r in s.replicas})
        for s in new_map.shards
    ]
    say(f"every replica's digest read in {time.monotonic() - started:.2f}s")
    return digests


def _seed(data_dir: Path, store_copy: Path, entry: dict[str, Any], members: list[str]) -> None:
    """The replica's store, and (past index 1) the snapshot its Raft log starts from."""
    lmdb_dir = data_dir / "lmdb"
    lmdb_dir.mkdir(parents=True)
    shutil.copyfile(store_copy, lmdb_dir / "data.mdb")  # in the kernel where it can (sendfile)
    # Claims of finished moves say what the restored map's slot table says already; their move
    # ids would collide with the new cluster's (its metadata group counts from 1 again).
    forget_moves(lmdb_dir)
    with open(lmdb_dir / "data.mdb", "rb+") as dest:
        os.fsync(dest.fileno())
    fsync_directory(lmdb_dir)
    if entry["applied_index"] >= 2:
        write_seed_snapshot(data_dir / "raft.dump", store_copy, entry["applied_index"], members)
    fsync_directory(data_dir)


def replica_digest(address: str, timeout: float = 10.0) -> str:
    """The data digest of one running replica (`Storage.checksum`'s), from eventual scans."""
    digest = DataDigest()
    continuation = b""
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.KVStub(channel)
        while True:
            page = stub.Scan(
                pb.ScanRequest(
                    limit=5000, continuation=continuation, read=pb.ReadOptions(consistency=pb.EVENTUAL)
                ),
                timeout=timeout,
            )
            for kv in page.kvs:
                digest.add(kv.key, kv.revision, kv.value)
            if not page.continuation:
                return digest.hexdigest()
            continuation = page.continuation
