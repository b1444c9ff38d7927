"""`kvstore chaos`: runs (kvstore/chaos/runner.py) from the command line's options, one per seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvstore.chaos.report import aggregate
from kvstore.chaos.runner import ALL_NEMESES, ChaosOptions, ChaosRun


def run_chaos_cli(args: Any) -> int:
    nemeses = tuple(n.strip() for n in args.nemesis.split(",") if n.strip())
    unknown = set(nemeses) - set(ALL_NEMESES)
    if unknown:
        raise ValueError(f"unknown nemesis {sorted(unknown)}; choose from {', '.join(ALL_NEMESES)}")
    runs = max(1, getattr(args, "runs", 1))
    reports = []
    for seed in range(args.seed, args.seed + runs):
        out = Path(args.out) if runs == 1 else Path(args.out) / f"seed-{seed}"
        options = ChaosOptions(
            shards=args.shards, duration=args.duration, nemeses=nemeses, seed=seed, out=out
        )
        print(
            f"chaos: {args.shards} shard(s), {args.duration:.0f} s, nemeses {','.join(nemeses)}, seed {seed}"
        )
        report = ChaosRun(options).run()
        reports.append(report)
        print(report.to_markdown())
        print(f"history and report written to {out}/", flush=True)
    if runs > 1:
        summary = aggregate(reports)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return 0 if all(r.ok for r in reports) else 1
