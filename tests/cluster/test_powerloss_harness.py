"""The power-loss harness on a real shard: a cut drops what a replica never synced, nothing else.

Three replicas keep their data directories on the power-loss filesystem (tests/support/). After
writes that every replica has applied, all three are SIGKILLed and their power cut. What is true
today, and must stay true: the state store (LMDB, fsynced at every apply batch) comes back byte
for byte, and every acknowledged write is readable at every replica; the Raft journal (written
through an mmap that is never msynced, see kvstore/replication/journal.py) loses what was
written since the mount. That the journal's bytes change shows the harness really drops unsynced
data from a node; whether acknowledged writes survive *under load*, with a restart and more
writes after it, is the full cycle in tests/powerloss/ (`make powerloss`), which does not pass
until the Raft log is durable (issue 15, item 1). That work flips the journal assertion here: the
journal must then come back unchanged (every entry was applied, so it was synced first), and the
full cycle joins the CI run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import client, wait_until
from tests.powerloss.cycle import run_cycle
from tests.support.power_cluster import (
    cluster_on_powerloss_fs,
    eventual_get,
    wait_applied_equal,
    write_under_load,
)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_power_cut_drops_a_replicas_unsynced_journal_and_keeps_its_synced_store(tmp_path: Path) -> None:
    with cluster_on_powerloss_fs(tmp_path / "c") as powered:
        cluster, names = powered.cluster, powered.replicas_of(0)
        with client(cluster, timeout=8.0) as kv:
            acked, unknown = write_under_load(kv, b"pc:", count=300, seconds=60)
        assert len(acked) >= 250, f"only {len(acked)} of 300 writes acknowledged ({unknown} unknown)"
        wait_applied_equal(powered, names, timeout=30)
        for name in names:
            cluster.kill(name, "KILL")
        # Read through the mounts: what the dead processes left, synced or not.
        before = {name: _digests(powered.mounts[name].mountpoint) for name in names}
        reports = {name: powered.mounts[name].cut() for name in names}
        after = {name: _digests(powered.mounts[name].mountpoint) for name in names}
        for name in names:
            print(name, reports[name], sorted(before[name]))
            changed = sorted(f for f in before[name] if before[name][f] != after[name].get(f))
            journals = [f for f in before[name] if "journal" in f and not f.endswith(".meta")]
            stores = [f for f in before[name] if f.endswith("data.mdb")]
            assert journals and stores, f"{name}: no journal or LMDB file in {sorted(before[name])}"
            assert reports[name].bytes_dropped > 0, f"{name}: the cut dropped nothing"
            assert set(journals) <= set(changed), f"{name}: journal not reverted (changed: {changed})"
            assert not set(stores) & set(changed), f"{name}: the fsynced LMDB store changed: {changed}"
        # Every replica serves every acknowledged write from its own (synced) store again.
        cluster.start_all()
        keys = sorted(acked)
        for name in names:
            address = powered.address(name)
            wait_until(lambda a=address: _serves(a), 30)  # type: ignore[misc]
            got = eventual_get(address, keys)
            lost = [k for k in keys if got[k] != acked[k]]
            assert not lost, f"{name}: {len(lost)} acknowledged writes missing, e.g. {lost[:3]}"


def _serves(address: str) -> bool:
    try:
        eventual_get(address, [b"pc:probe"])
        return True
    except Exception:
        return False


def test_the_full_cycle_passes_without_power_cuts(tmp_path: Path) -> None:
    """The checks of `make powerloss` (tests/powerloss/cycle.py) on a shard that loses no power: all
    pass, the strong reads and the linearizability checker included. What that cycle reports with
    cuts therefore comes from the cuts, not from the harness."""
    result = run_cycle(tmp_path / "c", cuts=0)
    assert result.ok, result.summary()
    assert result.acked >= 250, result.summary()
    reads = [op for op in result.history if op.kind == "get"]
    assert len(reads) >= result.acked, "the strong reads did not all run"
