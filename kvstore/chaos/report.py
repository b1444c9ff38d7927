"""What a chaos run found: the report of one run (`report.md`, `report.json`, next to the recorded
`history.jsonl`) and the summary of several seeds (`kvstore chaos --runs N`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvstore.chaos.checker import Anomaly
from kvstore.chaos.history import History, Op


@dataclass
class ChaosReport:
    seed: int
    duration: float
    ops_recorded: int
    ops_checked: int
    indeterminate: int
    faults: dict[str, int]
    anomalies: dict[str, int]
    lost_writes: int
    converged: bool
    convergence: dict[str, Any]
    linearizable: bool
    explanation: str = ""
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)  # ops by outcome: ok, failed, unknown
    elapsed: float = 0.0  # wall time of the whole run (a run with power cuts ends after its cuts)

    @property
    def ok(self) -> bool:
        return self.linearizable and not self.anomalies and self.converged

    @property
    def bytes_dropped(self) -> int:
        return sum(int(f.get("dropped", 0)) for f in self.fault_log)

    def to_markdown(self) -> str:
        lines = [
            f"# kvstore chaos run (seed {self.seed}, {self.duration:.0f} s)",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| operations recorded | {self.ops_recorded} ({_fmt_counts(self.outcomes)}) |",
            f"| operations checked (linearizability) | {self.ops_checked} |",
            f"| indeterminate operations | {self.indeterminate} |",
            f"| faults injected | {_fmt_counts(self.faults)} |",
            f"| unsynced bytes dropped by power cuts | {self.bytes_dropped} |",
            f"| anomalies | {_fmt_counts(self.anomalies) or '0'} |",
            f"| acknowledged writes lost | {self.lost_writes} |",
            f"| replicas converged | {'yes' if self.converged else 'NO'} |",
            f"| wall time | {self.elapsed:.0f} s |",
            f"| verdict | {'PASS' if self.ok else 'FAIL'} |",
        ]
        if self.explanation:
            lines += ["", "```", self.explanation, "```"]
        return "\n".join(lines) + "\n"


def outcomes(ops: list[Op]) -> dict[str, int]:
    """Ops by outcome: ok (took effect / answered), failed (definitely no effect), unknown."""
    names = {True: "ok", False: "failed", None: "unknown"}
    return dict(Counter(names[op.ok] for op in ops))


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def write_report(out: Path, report: ChaosReport, history: History, anomalies: list[Anomaly]) -> None:
    """history.jsonl, report.json and report.md (with the first anomalies spelled out) under out."""
    history.to_jsonl(out / "history.jsonl")
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    text = report.to_markdown()
    if anomalies:
        text += "\n## Anomalies\n\n" + "\n".join(
            f"- {a.kind} on {a.key}: {a.detail[:500]}" for a in anomalies[:50]
        )
    (out / "report.md").write_text(text + "\n")


def aggregate(reports: list[ChaosReport]) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    for r in reports:
        faults.update(r.faults)
        anomalies.update(r.anomalies)
    return {
        "runs": len(reports),
        "passed": sum(r.ok for r in reports),
        "operations_recorded": sum(r.ops_recorded for r in reports),
        "operations_checked": sum(r.ops_checked for r in reports),
        "indeterminate": sum(r.indeterminate for r in reports),
        "faults": dict(faults),
        "anomalies": dict(anomalies),
        "lost_writes": sum(r.lost_writes for r in reports),
        "not_converged": sum(not r.converged for r in reports),
        "failed_seeds": [r.seed for r in reports if not r.ok],
    }
