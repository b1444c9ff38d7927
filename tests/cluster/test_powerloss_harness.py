"""The power-loss harness on a real shard: a cut drops what a replica never synced, nothing else.

Three replicas keep their data directories on the power-loss filesystem (tests/support/). After
writes that every replica has applied, all three are SIGKILLed and their power cut. With
storage.durability = "fsync" (the default) the Raft journal comes back byte for byte (every entry
was synced before it was acknowledged or applied); LMDB may lose its last batch (its meta page is
synced with the next batch: the journal replays it), and every acknowledged write is readable at
every replica after the restart. The control, durability "none", shows the harness really drops
a node's unsynced data: the journal's bytes change. Under load, with restarts and more writes
after them, see the full cycle in tests/powerloss/.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kvstore.config import StorageSettings
from tests.conftest import client, wait_until
from tests.powerloss.cycle import run_cycle
from tests.support.power_cluster import (
    PoweredCluster,
    cluster_on_powerloss_fs,
    eventual_get,
    replica_status,
    wait_applied_equal,
    write_under_load,
)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_a_power_cut_keeps_a_durable_journal_and_drops_an_unsynced_one(
    tmp_path: Path, durability: str
) -> None:
    storage = StorageSettings(durability=durability)
    with cluster_on_powerloss_fs(tmp_path / "c", storage=storage) as powered:
        cluster, names = powered.cluster, powered.replicas_of(0)
        with client(cluster, timeout=8.0) as kv:
            acked, unknown = write_under_load(kv, b"pc:", count=300, seconds=60)
        assert len(acked) >= 250, f"only {len(acked)} of 300 writes acknowledged ({unknown} unknown)"
        applied_before_cut = wait_applied_equal(powered, names, timeout=30)
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
            assert journals, f"{name}: no journal in {sorted(before[name])}"
            assert reports[name].bytes_dropped > 0, f"{name}: the cut dropped nothing"
            if durability == "fsync":
                assert not set(journals) & set(changed), f"{name}: the durable journal changed: {changed}"
            else:
                assert set(journals) <= set(changed), f"{name}: journal not reverted (changed: {changed})"
        if durability == "none":
            return  # what an unsynced journal loses under load: tests/powerloss (the control)
        # Every replica serves every acknowledged write from its own store again, once it has
        # replayed its journal past what the cut took from LMDB (its last batch, at most): that
        # needs the commit index, from the leader the restarted group elects.
        cluster.start_all()
        wait_until(lambda: _applied_at_least(powered, names, applied_before_cut), 30)
        keys = sorted(acked)
        for name in names:
            address = powered.address(name)
            wait_until(lambda a=address: _serves(a), 30)  # type: ignore[misc]
            got = eventual_get(address, keys)
            lost = [k for k in keys if got[k] != acked[k]]
            assert not lost, f"{name}: {len(lost)} acknowledged writes missing, e.g. {lost[:3]}"


def _applied_at_least(powered: PoweredCluster, names: list[str], index: int) -> bool:
    statuses = [replica_status(powered.address(n)) for n in names]
    return all(s is not None and s.applied_index >= index for s in statuses)


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
