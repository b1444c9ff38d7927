"""Short fault runs checked by machine (marker `chaos`; they run in CI, the long runs are by hand).

A checker is trusted only because it catches a planted bug: the first test turns on
`ServerSettings.unsafe_local_strong_reads` (strong reads served by whoever believes it leads)
and cuts leaders off; the history must then fail the linearizability check. The same run without
the bug, and runs with every nemesis, must show no anomaly at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.chaos.runner import ChaosOptions, ChaosRun

pytestmark = pytest.mark.chaos


def _run(tmp_path: Path, **kwargs: object) -> object:
    options = ChaosOptions(out=tmp_path / "chaos", **kwargs)  # type: ignore[arg-type]
    return ChaosRun(options).run()


def test_planted_stale_read_bug_is_caught(tmp_path: Path) -> None:
    # Isolating the leader's Raft links leaves it serving clients while it still believes it leads
    # (pysyncobj keeps that belief for leader_fallback_timeout, 30 s by its default), as the
    # majority elects a new leader and moves on: seconds of stale local reads per fault.
    report = _run(
        tmp_path,
        shards=1,
        duration=24,
        nemeses=("partition",),
        seed=1,
        unsafe_local_strong_reads=True,
        leader_bias=1.0,
        leader_fallback_timeout=8.0,
        fault_gap=(1.0, 2.0),
        fault_length=(5.0, 6.0),
    )
    assert report.faults.get("partition", 0) >= 2
    assert not report.linearizable, "a deposed leader serving local reads must be caught"
    assert report.anomalies.get("not-linearizable", 0) >= 1
    assert (tmp_path / "chaos" / "history.jsonl").exists()


def test_same_partitions_without_the_bug_pass(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        shards=1,
        duration=24,
        nemeses=("partition",),
        seed=1,
        leader_bias=1.0,
        leader_fallback_timeout=8.0,
        fault_gap=(1.0, 2.0),
        fault_length=(5.0, 6.0),
    )
    assert report.faults.get("partition", 0) >= 2
    assert report.ok, report.to_markdown()


def test_same_pauses_without_the_bug_pass(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        shards=1,
        duration=20,
        nemeses=("pause",),
        seed=1,
        fault_gap=(1.0, 2.0),
        fault_length=(3.0, 4.0),
    )
    assert report.faults.get("pause", 0) >= 2
    assert report.ok, report.to_markdown()


@pytest.mark.parametrize("nemesis", ["kill", "partition", "delay"])
def test_each_nemesis_leaves_no_anomaly(tmp_path: Path, nemesis: str) -> None:
    report = _run(tmp_path, shards=1, duration=18, nemeses=(nemesis,), seed=7, fault_gap=(1.0, 2.5))
    assert report.faults.get(nemesis, 0) >= 2
    assert report.ops_checked > 100
    assert report.ok, report.to_markdown()
    assert report.lost_writes == 0 and report.converged


def test_mixed_nemeses_on_two_shards(tmp_path: Path) -> None:
    report = _run(tmp_path, shards=2, duration=30, seed=11)
    assert sum(report.faults.values()) >= 3
    assert report.ok, report.to_markdown()
