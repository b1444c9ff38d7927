"""The long power-loss run (issue 15, item 3): `kvstore chaos` on the power-loss filesystem, with
power cuts between and during the kill, pause and partition nemeses.

The chaos runner (kvstore/chaos/runner.py) does the work: its recorded workload (per shard, strong
clients doing put/get/delete/CAS on a few keys, a session client, a bounded reader), its nemeses
and its checkers (linearizability of the whole history, session and bounded guarantees, no
acknowledged write lost, replicas converged on applied index and data digest). This module gives
it a power supply (tests/support/power_cluster.py, `FusePower`: each replica's data directory is
its own power-loss FUSE mount) and asks for `--cuts` power cuts, in seeded round-robin over every
replica of a shard, a majority of a shard, one replica and every node (kvstore/chaos/power.py).

    .venv/bin/python -m tests.powerloss.long_run --cuts 20 --seed 1       # `make powerloss-long`
    .venv/bin/python -m tests.powerloss.long_run --cuts 20 --seed 1 --durability none   # the control

It prints the report and writes history.jsonl, report.json and report.md under --out. Exit 0 only
when every check passed and all the cuts were made. tests/powerloss/test_long_run.py runs a short
form in CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from kvstore.chaos.power import CUT_KINDS
from kvstore.chaos.report import ChaosReport
from kvstore.chaos.runner import NEMESES, ChaosOptions, ChaosRun
from kvstore.config import StorageSettings
from tests.support.power_cluster import FusePower

REPO = Path(__file__).resolve().parents[2]


def run_long(
    out: Path,
    cuts: int,
    seed: int,
    shards: int = 2,
    nemeses: tuple[str, ...] = ("kill", "pause", "partition"),
    durability: str = "fsync",
    max_seconds: float = 1200.0,
    **options: object,
) -> ChaosReport:
    """One chaos run with `cuts` power cuts (bounded by `max_seconds` of faults)."""
    chaos = ChaosOptions(
        shards=shards,
        duration=max_seconds,
        nemeses=nemeses,
        seed=seed,
        out=out,
        storage=StorageSettings(durability=durability),
        power=FusePower(),
        power_cuts=cuts,
        **options,  # type: ignore[arg-type]
    )
    return ChaosRun(chaos).run()


def power_cuts_made(report: ChaosReport) -> int:
    return sum(n for kind, n in report.faults.items() if kind.startswith("powercut-"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=20, help="power cuts to make")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--nemesis", default="kill,pause,partition", help=f"from {','.join(NEMESES)}")
    parser.add_argument("--kinds", default=",".join(CUT_KINDS), help="power-cut kinds, round-robin")
    parser.add_argument("--durability", choices=("fsync", "none"), default="fsync", help='"none": control')
    parser.add_argument("--torn", action="store_true", help="torn cuts: unsynced blocks survive at random")
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="bound on the fault phase")
    parser.add_argument("--out", default="results/powerloss-long")
    args = parser.parse_args()
    nemeses = tuple(n for n in args.nemesis.split(",") if n)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"power-loss long run: {args.shards} shard(s) x 3, {args.cuts} cuts ({args.kinds}), nemeses "
        f"{','.join(nemeses)}, durability {args.durability}, seed {args.seed}, commit {commit}",
        flush=True,
    )
    report = run_long(
        Path(args.out),
        args.cuts,
        args.seed,
        shards=args.shards,
        nemeses=nemeses,
        durability=args.durability,
        max_seconds=args.max_seconds,
        cut_kinds=tuple(k for k in args.kinds.split(",") if k),
        torn_cuts=args.torn,
        progress=lambda line: print(line, flush=True),
    )
    print(report.to_markdown())
    made = power_cuts_made(report)
    print(f"power cuts made: {made} of {args.cuts}; history and report in {args.out}/", flush=True)
    return 0 if report.ok and made >= args.cuts else 1


if __name__ == "__main__":
    sys.exit(main())
