"""The Locust load test and `kvstore demo`, run for real: node processes, Locust subprocesses, signals."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstore.cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
MIX = "strong=1,session=1,eventual=1,bounded:0.5s=1"


def _locust(host: Path, prefix: Path, seconds: int, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", "4", "-r", "4", "-t", f"{seconds}s", "--host", str(host),
        "--csv", str(prefix), "--json-file", str(prefix), "--kv-report", f"{prefix}_kv.json", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, cwd=prefix.parent)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_run(
    prefix: Path, done: subprocess.CompletedProcess[str], types: set[str], shards: set[str], allowed: set[str]
) -> None:
    """Requests of every expected type were made and none failed; `shards` (at least) saw traffic."""
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["Type"]: r for r in _csv_rows(Path(f"{prefix}_stats.csv"))}
    aggregated = rows.pop("")
    assert int(aggregated["Request Count"]) > 0
    assert int(aggregated["Failure Count"]) == 0
    assert set(rows) == types
    assert all(int(r["Request Count"]) > 0 for r in rows.values())
    # Locust's CSV lags its last second; the final JSON stats do not.
    final = json.loads(Path(f"{prefix}.json").read_text())
    assert sum(e["num_requests"] for e in final) >= int(aggregated["Request Count"])
    assert sum(e["num_failures"] for e in final) == 0
    report = json.loads(Path(f"{prefix}_kv.json").read_text())
    assert report["failures"] == 0 and report["availability"] == 1.0
    assert shards <= {s for s, v in report["shards"].items() if v["ok"] > 0} <= allowed
    assert all(v["failed"] == 0 for v in report["shards"].values())


def test_locustfile_drives_every_consistency_level_without_failures(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster("lt", shards=2)
    prefix = tmp_path / "single"
    done = _locust(
        cluster.dir, prefix, 5, "--kv-shape", "ramp", "--kv-consistency-mix", MIX,
        "--kv-read-policy", "round_robin", "--kv-preload", "--csv-full-history",
    )  # fmt: skip
    types = {"get:strong", "get:session", "get:eventual", "get:bounded:0.5s", "put:strong"}
    _check_run(prefix, done, types, shards={"0", "1"}, allowed={"0", "1"})
    # The ramp shape: users climb from one to -u, never down.
    users = [int(r["User Count"]) for r in _csv_rows(Path(f"{prefix}_stats_history.csv"))]
    users = [u for u in users if u > 0]
    assert users == sorted(users) and max(users) == 4 and min(users) < 4, users
    # --kv-preload wrote every key: single-key reads found values (100 bytes each).
    final = json.loads(Path(f"{prefix}.json").read_text())
    reads = [e for e in final if e["method"].startswith("get:")]
    assert sum(e["total_content_length"] for e in reads) == 100 * sum(e["num_requests"] for e in reads)

    batched = tmp_path / "batched"
    done = _locust(
        cluster.dir, batched, 3, "--kv-batch-size", "5", "--kv-distribution", "zipf",
        "--kv-consistency-mix", "strong=1,session",  # no weight: 1
    )  # fmt: skip
    # Five keys rarely share a shard: those operations are reported with shard -1.
    types = {"multi_get:strong", "multi_get:session", "put_many:strong"}
    _check_run(batched, done, types, shards={"-1"}, allowed={"-1", "0", "1"})


def _demo(directory: Path, results: Path, seconds: int) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "kvstore", "demo", "--phase-seconds", str(seconds), "--users", "6",
        "--dir", str(directory), "--results", str(results),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (our cluster or results directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _state(entry) != "Z":
                pids.append(int(entry.name))
    return pids


def _state(entry: Path) -> str:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _assert_nothing_left(directory: Path, results: Path) -> None:
    cluster = LocalCluster(directory)
    assert [n for n in cluster.node_names() if cluster.pid(n)] == []
    assert _pids_mentioning(str(directory)) == []
    assert _pids_mentioning(str(results)) == []  # no Locust process either


def _summary_rows(summary: str) -> dict[int, list[str]]:
    rows = {}
    for line in summary.splitlines():
        match = re.match(r"\| (\d)\. ", line)
        if match:
            rows[int(match.group(1))] = [c.strip() for c in line.strip("|").split("|")]
    return rows


def test_short_demo_runs_every_phase_and_recovers_from_the_fault(tmp_path: Path) -> None:
    directory, results = tmp_path / "cluster", tmp_path / "results"
    proc = _demo(directory, results, 6)
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        _stop(proc)
    assert proc.returncode == 0, output[-4000:]
    summary = (results / "summary.md").read_text()
    assert summary in output  # printed at the end too
    rows = _summary_rows(summary)
    assert sorted(rows) == [1, 2, 3]
    for cells in rows.values():
        assert float(cells[1].replace(",", "")) > 0, cells  # ops/s
    assert "recovered: yes" in summary
    data = json.loads((results / "summary.json").read_text())
    phase1, phase2, phase3 = data["phases"]
    assert {t.split(":")[1] for t in phase1["stats"]["by_type"]} == {"strong"}
    assert {"get:session", "get:eventual"} <= set(phase2["stats"]["by_type"])
    assert phase1["stats"]["all"]["failures"] == phase2["stats"]["all"]["failures"] == 0
    fault = phase3["fault"]
    assert phase3["recovered"] is True and fault["new_leader"] != fault["node"]
    assert 0 < fault["writes_resumed_after_seconds"] < 10
    assert fault["errors_confined_to_shard"] is True, fault["errors_in_window_by_shard"]
    for n in (1, 2, 3):
        for suffix in (".html", "_stats.csv", "_stats_history.csv", ".json", "_kv.json"):
            assert (results / f"phase{n}{suffix}").exists(), f"phase{n}{suffix}"
    _assert_nothing_left(directory, results)


def test_demo_interrupted_mid_fault_leaves_nothing_running(tmp_path: Path) -> None:
    directory, results = tmp_path / "cluster", tmp_path / "results"
    proc = _demo(directory, results, 5)
    try:
        # Ctrl-C once phase 3 has killed a leader: the hardest moment to clean up after.
        report = results / "phase3_kv.json"
        deadline = time.monotonic() + 90
        while not _has_fault(report) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and _has_fault(report), "phase 3 never killed a leader"
        os.kill(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output
    _assert_nothing_left(directory, results)


def _has_fault(report: Path) -> bool:
    try:
        data: dict[str, Any] = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("faults"))


def _stop(proc: subprocess.Popen[str]) -> None:
    """Test failed half way: the demo's own cleanup runs on SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
