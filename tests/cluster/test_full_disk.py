"""A full disk is refused, not crashed on (issue 12, item 5), with real node processes on a small tmpfs.

The three replicas' data directories share one tmpfs (a real filesystem that fills up). A filler
file takes part of it; writes of 64 KiB values fill the rest until the leader refuses them with
DiskFull (RESOURCE_EXHAUSTED) at the free-space watermark. Then: more writes get the same clear
refusal at once, reads keep working, no node died (no SIGBUS from the journal's mmap, no crash on
ENOSPC). The filler is deleted and writes resume by themselves; every acknowledged write is
readable and the replicas converge. The timeline is printed (run with -s) for the closing note.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvstore import errors
from kvstore.client.core import Consistency
from kvstore.cluster.local import LocalCluster
from kvstore.config import StorageSettings
from tests.conftest import TEST_RAFT, client, wait_until
from tests.tmpfs import fill, small_tmpfs

DISK = 192 << 20
WATERMARK = 16 << 20
VALUE = b"v" * (64 << 10)


def test_a_full_disk_refuses_writes_keeps_reads_and_resumes_by_itself(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    storage = StorageSettings(min_free_bytes=WATERMARK, min_free_fraction=0.0, map_size_bytes=64 << 20)
    cluster.create(shards=1, replicas=3, raft=TEST_RAFT, storage=storage)
    with small_tmpfs(cluster.dir / "data", DISK) as data:
        try:
            filler = fill(data / "filler", leave_bytes=120 << 20)
            cluster.start_all()
            cluster.wait_for_leaders(30)
            pids = {name: cluster.pid(name) for name in cluster.node_names()}
            timeline: dict[str, float] = {"start": time.monotonic()}
            acked: dict[bytes, bytes] = {}
            unknown = 0
            with client(cluster) as kv:
                # 1. Fill the disk with writes until the leader refuses them.
                refusal: errors.DiskFull | None = None
                for i in range(5_000):
                    key = b"fd-%05d" % i
                    try:
                        kv.put(key, VALUE)
                        acked[key] = VALUE
                    except errors.DiskFull as err:
                        refusal = err
                        break
                    except errors.UnknownOutcome:
                        unknown += 1
                    assert time.monotonic() - timeline["start"] < 180, "the disk never filled"
                timeline["refused"] = time.monotonic()
                st = os.statvfs(data)
                free_at_refusal = st.f_bavail * st.f_frsize
                assert refusal is not None and "insufficient storage" in refusal.message
                assert refusal.code.name == "RESOURCE_EXHAUSTED"
                # 2. Every further write gets the same clear refusal, at once.
                for i in range(5):
                    started = time.monotonic()
                    try:
                        kv.put(b"refused-%d" % i, VALUE)
                        raise AssertionError("a write was accepted below the watermark")
                    except errors.DiskFull:
                        assert time.monotonic() - started < 1.0
                # 3. Reads keep working, strong (a barrier through the Raft log) and local.
                first, last = min(acked), max(acked)
                assert kv.get(first) == VALUE and kv.get(last) == VALUE
                assert kv.get(last, consistency=Consistency.EVENTUAL) in (VALUE, None)
                # 4. The refusal holds while reads go on (a few seconds), and no node died.
                while time.monotonic() - timeline["refused"] < 3.0:
                    assert kv.get(first) == VALUE
                    try:
                        kv.put(b"refused", VALUE)
                        raise AssertionError("a write was accepted below the watermark")
                    except errors.DiskFull:
                        pass
                    time.sleep(0.1)
                assert {name: cluster.pid(name) for name in pids} == pids
                # 5. Space returns: writes resume by themselves.
                filler.unlink()
                timeline["freed"] = time.monotonic()
                while True:
                    try:
                        kv.put(b"resumed", b"1")
                        acked[b"resumed"] = b"1"
                        break
                    except errors.DiskFull:
                        assert time.monotonic() - timeline["freed"] < 30, "writes never resumed"
                        time.sleep(0.05)
                timeline["resumed"] = time.monotonic()
                for i in range(20):
                    kv.put(b"after-%02d" % i, VALUE)
                    acked[b"after-%02d" % i] = VALUE
                # 6. Nothing acknowledged is lost.
                keys = sorted(acked)
                for start in range(0, len(keys), 50):
                    chunk = keys[start : start + 50]
                    assert kv.multi_get(chunk) == {k: acked[k] for k in chunk}
            assert {name: cluster.pid(name) for name in pids} == pids

            def converged() -> bool:
                replicas = cluster.status()[0]["replicas"]
                return len({(r["applied_index"], r["key_count"]) for r in replicas}) == 1

            wait_until(converged, 30)
            logs = "".join(cluster.log_path(name).read_text(errors="replace") for name in pids)
            assert "Traceback" not in logs, logs[-5000:]
            t0 = timeline["start"]
            print(
                f"\nfull-disk timeline: {len(acked) - 21} writes of 64 KiB acknowledged, refusal began at "
                f"{timeline['refused'] - t0:.1f}s; filler deleted at {timeline['freed'] - t0:.1f}s; "
                f"writes resumed {1000 * (timeline['resumed'] - timeline['freed']):.0f} ms later; "
                f"free at refusal {free_at_refusal / 2**20:.1f} MiB (watermark {WATERMARK / 2**20:.0f} MiB); "
                f"unknown outcomes {unknown}; nodes that waited for the disk: "
                f"{logs.count('storage failing')} log lines"
            )
        finally:
            cluster.down()


def _cluster_with_a_slow_follower(directory: Path, give_up_seconds: float = 120.0) -> LocalCluster:
    """1x3; s0r2 stays a follower (a longer election timeout lets one of the others win)."""
    cluster = LocalCluster(directory)
    cluster.create(shards=1, replicas=3, raft=TEST_RAFT)
    config = cluster.dir / "nodes" / "s0r2.toml"
    text = config.read_text()
    text = text.replace(f"min_timeout = {TEST_RAFT.min_timeout}", "min_timeout = 4.0")
    text = text.replace(f"max_timeout = {TEST_RAFT.max_timeout}", "max_timeout = 5.0")
    text = text.replace(f"connection_timeout = {TEST_RAFT.connection_timeout}", "connection_timeout = 5.0")
    text = text.replace("io_failure_limit_seconds = 120.0", f"io_failure_limit_seconds = {give_up_seconds}")
    config.write_text(text)
    return cluster


def test_a_follower_whose_disk_fills_waits_for_space_and_catches_up(tmp_path: Path) -> None:
    """Only one follower's disk is small: the leader (on a roomy disk) goes on with the other
    follower; the full one backs off (LMDB ENOSPC, the journal waiting for space), stays alive, and
    catches up by itself once space is freed."""
    cluster = _cluster_with_a_slow_follower(tmp_path / "c")
    with small_tmpfs(cluster.dir / "data" / "s0r2", 128 << 20) as small:
        try:
            filler = fill(small / "filler", leave_bytes=10 << 20)
            cluster.start_all()
            cluster.wait_for_leaders(30)
            assert cluster.leader_of(0) != "s0r2"
            pids = {name: cluster.pid(name) for name in cluster.node_names()}
            acked: dict[bytes, bytes] = {}
            with client(cluster) as kv:
                for i in range(300):  # ~19 MiB: more than the 10 MiB left free
                    kv.put(b"ff-%05d" % i, VALUE)
                    acked[b"ff-%05d" % i] = VALUE
            log = cluster.log_path("s0r2")
            wait_until(lambda: "No space left on device" in log.read_text(errors="replace"), 30)
            time.sleep(2.0)  # the follower keeps backing off; it must not die
            assert {name: cluster.pid(name) for name in pids} == pids
            freed = time.monotonic()
            filler.unlink()

            def caught_up() -> bool:
                replicas = {r["node"]: r for r in cluster.status()[0]["replicas"]}
                leader = replicas[cluster.leader_of(0) or "s0r0"]
                full = replicas["s0r2"]
                return full["applied_index"] == leader["applied_index"] and full["key_count"] == len(acked)

            wait_until(caught_up, 60)
            lines = log.read_text(errors="replace").count("storage failing")
            took = time.monotonic() - freed
            print(f"\nfull follower caught up {took:.1f}s after space was freed; {lines} backoff lines")
            assert {name: cluster.pid(name) for name in pids} == pids
            with client(cluster) as kv:
                keys = sorted(acked)
                for start in range(0, len(keys), 50):
                    chunk = keys[start : start + 50]
                    assert kv.multi_get(chunk) == {k: acked[k] for k in chunk}
        finally:
            cluster.down()


def test_a_disk_that_stays_full_past_the_limit_stops_the_node_with_one_clear_line(tmp_path: Path) -> None:
    """Past storage.io_failure_limit_seconds of failing storage the node exits (code 74) instead of
    spinning; the other replicas go on serving."""
    cluster = _cluster_with_a_slow_follower(tmp_path / "c", give_up_seconds=3.0)
    with small_tmpfs(cluster.dir / "data" / "s0r2", 64 << 20) as small:
        try:
            fill(small / "filler", leave_bytes=4 << 20)
            cluster.start_all()
            cluster.wait_for_leaders(30)
            with client(cluster) as kv:
                for i in range(150):  # ~9 MiB: more than the 4 MiB left free
                    kv.put(b"gu-%05d" % i, VALUE)
                wait_until(lambda: cluster.pid("s0r2") is None, 60)
                text = cluster.log_path("s0r2").read_text(errors="replace")
                assert text.count("CRITICAL") == 1
                assert (
                    "storage.io_failure_limit_seconds = 3s" in text and "stopping this node (exit 74)" in text
                )
                kv.put(b"still", b"serving")  # the other two are a majority
                assert kv.get(b"still") == b"serving"
        finally:
            cluster.down()
