"""The short form of the long power-loss run (tests/powerloss/long_run.py, `make powerloss-long`),
so its code path (the chaos runner's power cuts, kvstore/chaos/power.py, and the FUSE power
supply) cannot rot: 2 shards x 3, kill/pause/partition, and one power cut of each kind (every
replica of a shard, a majority of a shard, one replica, every node), some while a nemesis holds.
Every check of the chaos runner must pass: linearizability of the whole history, session and
bounded guarantees, no acknowledged write lost, replicas converged."""

from __future__ import annotations

from pathlib import Path

from tests.powerloss.long_run import power_cuts_made, run_long


def test_power_cuts_of_every_kind_amid_nemeses_on_two_shards(tmp_path: Path) -> None:
    kinds = ("shard", "majority", "replica", "all")
    report = run_long(
        tmp_path / "run",
        cuts=len(kinds),
        seed=7,
        max_seconds=120,
        cut_kinds=kinds,
        fault_gap=(1.0, 2.0),
        fault_length=(1.0, 2.0),
    )
    print(report.to_markdown())
    assert power_cuts_made(report) == len(kinds), report.faults
    assert {f"powercut-{k}" for k in kinds} <= set(report.faults), report.faults
    assert sum(n for k, n in report.faults.items() if not k.startswith("powercut-")) >= len(kinds)
    assert report.outcomes.get("ok", 0) > 100, "the workload barely ran: the run proves little"
    assert report.ok, report.to_markdown()
