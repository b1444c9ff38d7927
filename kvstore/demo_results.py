"""What each phase of `kvstore demo` was, what came of it, and the summary made from it (the
Locust files a phase leaves behind, read back into numbers; the Markdown and JSON summaries).
Kept apart from kvstore/demo.py, which runs the cluster, the phases and the processes."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.cluster.topology import Topology

# The workload every phase runs (loadtests/locustfile.py options, built in kvstore/demo.py).
KEYSPACE, VALUE_SIZE, READ_RATIO = 10_000, 100, 0.8
# An operation not done within this deadline counts as failed: it makes a failover visible as
# errors (on the failed shard only) instead of only as latency.
CLIENT_DEADLINE = 2.0


@dataclass
class Phase:
    title: str
    args: list[str]
    fault: bool = False


@dataclass
class Outcome:
    number: int
    phase: Phase
    stats: dict[str, Any] = field(default_factory=dict)  # from Locust's final JSON stats
    kv: dict[str, Any] = field(default_factory=dict)  # from the locustfile's --kv-report
    exit_code: int | None = None
    rejoined_after_phase: bool | None = None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----- numbers -------------------------------------------------------------------------------


def final_stats(path: Path) -> dict[str, Any]:
    """Locust's final per-entry stats (its CSV lags the last second; the JSON file does not)."""
    entries = read_json(path) or []
    rows = {e["method"]: _entry_numbers([e]) for e in entries}
    return {"all": _entry_numbers(entries), "by_type": rows}


def _entry_numbers(entries: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    buckets: dict[int, int] = {}
    for e in entries:
        for ms, count in e["response_times"].items():
            buckets[int(float(ms))] = buckets.get(int(float(ms)), 0) + count
    start = min((e["start_time"] for e in entries), default=0.0)
    end = max((e["last_request_timestamp"] or 0.0 for e in entries), default=0.0)
    span = end - start
    return {
        "requests": requests,
        "failures": failures,
        "ops_per_second": requests / span if span > 0 else 0.0,
        "p50": _percentile(buckets, 0.50),
        "p95": _percentile(buckets, 0.95),
        "p99": _percentile(buckets, 0.99),
        "seconds": span,
    }


def _percentile(buckets: dict[int, int], fraction: float) -> int | None:
    """Same rule as Locust: the smallest recorded (rounded) time covering `fraction` of requests."""
    total = sum(buckets.values())
    if not total:
        return None
    seen = 0
    for ms in sorted(buckets):
        seen += buckets[ms]
        if seen >= fraction * total:
            return ms
    return max(buckets)


def _rate(outcome: Outcome, kind: str) -> float:
    rows = outcome.stats.get("by_type", {})
    ops = ("get", "multi_get") if kind == "read" else ("put", "put_many")
    return sum(r["ops_per_second"] for t, r in rows.items() if t.split(":")[0] in ops)


def _fault(outcome: Outcome) -> dict[str, Any] | None:
    faults = outcome.kv.get("faults") or []
    return faults[-1] if faults else None


def _recovered(outcome: Outcome) -> bool:
    fault = _fault(outcome)
    rejoined = bool(fault and fault.get("rejoin_seconds") is not None) or bool(outcome.rejoined_after_phase)
    return bool(fault and fault.get("recovered") and rejoined)


def phase_ok(outcome: Outcome) -> bool:
    ran = outcome.stats.get("all", {}).get("ops_per_second", 0.0) > 0
    return ran and (_recovered(outcome) if outcome.phase.fault else True)


def summary_data(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "phases": [
            {
                "phase": o.number,
                "title": o.phase.title,
                "stats": o.stats,
                "availability": o.kv.get("availability"),
                "shards": o.kv.get("shards"),
                "fault": _fault(o),
                "recovered": _recovered(o) if o.phase.fault else None,
                "locust_exit_code": o.exit_code,
            }
            for o in outcomes
        ]
    }


# ----- summary.md ----------------------------------------------------------------------------


def render_summary(
    outcomes: list[Outcome], topology: Topology, users: int, seconds: int, elapsed: float
) -> str:
    shape = f"{topology.shards} shards x {topology.replicas} replicas"
    lines = [
        f"# kvstore demo: {shape}, {users} Locust users, {seconds} s per phase",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; cluster and load generator share it. "
        f"Total run {elapsed:.0f} s.",
        f"Workload: {READ_RATIO:.0%} reads, {KEYSPACE:,} keys (uniform), {VALUE_SIZE}-byte values, one key "
        f"per operation, no think time; client deadline {CLIENT_DEADLINE:g} s (slower counts as an error).",
        "Availability: share of seconds in which no request failed.",
        "",
        "| phase | ops/s | reads/s | writes/s | p50 ms | p95 ms | p99 ms | errors | availability |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        s = o.stats.get("all") or _entry_numbers([])
        lines.append(
            f"| {o.number}. {o.phase.title} | {s['ops_per_second']:,.0f} | {_rate(o, 'read'):,.0f} | "
            f"{_rate(o, 'write'):,.0f} | {_ms(s['p50'])} | {_ms(s['p95'])} | {_ms(s['p99'])} | "
            f"{s['failures']:,} | {_pct(o.kv.get('availability'))} |"
        )
    lines += ["", *_reads_table(outcomes), "", *_fault_section(outcomes)]
    return "\n".join(lines) + "\n"


def _reads_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "## Reads side by side: leaders (phase 1) vs replicas (phase 2)",
        "",
        "| phase | read | served by | reads/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes[:2]:
        served = "replicas (round robin)" if "round_robin" in o.phase.args else "leader"
        for kind, r in sorted(o.stats.get("by_type", {}).items()):
            if kind.split(":")[0] in ("get", "multi_get"):
                lines.append(
                    f"| {o.number} | {kind} | {served} | {r['ops_per_second']:,.0f} | {_ms(r['p50'])} | "
                    f"{_ms(r['p95'])} | {_ms(r['p99'])} | {r['failures']:,} |"
                )
    return lines


def _fault_section(outcomes: list[Outcome]) -> list[str]:
    lines = ["## Failover (phase 3)", ""]
    for o in (o for o in outcomes if o.phase.fault):
        f = _fault(o)
        if f is None:
            return [*lines, "- the fault did not happen (see the phase log); recovered: no"]
        start = o.kv.get("started", f["killed_at"])
        window = o.kv.get("shards") or {}
        in_window = f.get("errors_in_window_by_shard", {})
        per_shard = ", ".join(
            f"shard {s}: {in_window.get(str(s), 0)}" for s in sorted({int(k) for k in window} - {-1})
        )
        total_per_shard = ", ".join(
            f"shard {s}: {window[s]['failed']}" for s in sorted(window, key=int) if s != "-1"
        )
        lines += [
            f"- SIGKILL {f['node']}, leader of shard {f['shard']}, at {f['killed_at'] - start:.1f} s into "
            f"the phase; new leader {f.get('new_leader') or '-'} after "
            f"{_sec(f.get('election_seconds'))} (election)",
            f"- failover window: writes to shard {f['shard']} issued after the kill succeeded again after "
            f"**{_sec(f.get('writes_resumed_after_seconds'))}**",
            f"- {f['node']} restarted at {f.get('restarted_at', start) - start:.1f} s; caught up with the "
            f"leader in {_sec(f.get('rejoin_seconds'))}",
            f"- errors from the kill until it caught up, by shard: {per_shard or '-'} (whole phase: "
            f"{total_per_shard or '-'}); confined to shard {f['shard']}: "
            f"{'yes' if f.get('errors_confined_to_shard') else 'no'}",
            f"- recovered: {'yes' if _recovered(o) else 'no'}",
        ]
    return lines


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
