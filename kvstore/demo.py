"""`kvstore demo` (`make demo`): a 3-shard x 3-replica cluster (cluster/local-3x3.toml) under
Locust, phase by phase.

1. strong reads and writes across 3 shards (every request to a shard leader),
2. the same load with session and eventual reads served by replicas,
3. a shard leader SIGKILLed under load and restarted: the failover window, errors per shard.

Each phase is one headless Locust process (loadtests/locustfile.py): gevent's monkey patching
stays out of this process, and a phase that hangs can be killed. Results (Locust's HTML report,
CSVs and final JSON stats, the locustfile's per-shard report, summary.md) go to --results.
Whatever happens, including Ctrl-C or SIGTERM, every process started here is stopped at the end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvstore.cluster.local import LocalCluster
from kvstore.cluster.topology import Topology, load_topology, named_topology
from kvstore.config import ConfigError
from kvstore.demo_results import (
    CLIENT_DEADLINE,
    KEYSPACE,
    READ_RATIO,
    VALUE_SIZE,
    Outcome,
    Phase,
    final_stats,
    phase_ok,
    read_json,
    render_summary,
    summary_data,
)

DEMO_TOPOLOGY = "local-3x3"  # in the repository's cluster/ folder
FAULT_SHARD = 1  # so the demo needs at least two shards
WORKLOAD = (
    f"--kv-keyspace {KEYSPACE} --kv-value-size {VALUE_SIZE} --kv-read-ratio {READ_RATIO} "
    f"--kv-timeout {CLIENT_DEADLINE}"
).split()


def phases(seconds: int, shards: int = 3) -> list[Phase]:
    kill_at = max(2.0, round(0.3 * seconds, 1))
    restart_after = max(1.5, round(0.25 * seconds, 1))
    strong = "--kv-consistency-mix strong=1 --kv-read-policy leader".split()
    replicas = "--kv-consistency-mix session=1,eventual=1 --kv-read-policy round_robin".split()
    fault = f"--kv-kill-leader-at {kill_at} --kv-restart-after {restart_after} --kv-kill-shard {FAULT_SHARD}"
    return [
        Phase(f"strong reads + writes, {shards} shards", strong),
        Phase("session + eventual reads on replicas", replicas),
        Phase(f"shard {FAULT_SHARD} leader SIGKILLed + restarted", strong + fault.split(), fault=True),
    ]


# ----- entry point ---------------------------------------------------------------------------


def run_demo(args: Any) -> int:
    seconds = max(2, round(float(args.phase_seconds)))
    users = max(1, int(args.users))
    results = Path(args.results).absolute()
    topology = _topology(getattr(args, "topology", None))
    cluster = LocalCluster(args.dir)
    locust = _LocustProcess()
    started = time.monotonic()
    with _signals_raise_interrupt():
        try:
            locustfile = _locustfile()
            results.mkdir(parents=True, exist_ok=True)
            _start_cluster(cluster, topology)
            outcomes = []
            for number, phase in enumerate(phases(seconds, topology.shards), 1):
                outcome = _run_phase(number, phase, cluster, locust, users, seconds, results, locustfile)
                outcomes.append(outcome)
            summary = render_summary(outcomes, topology, users, seconds, time.monotonic() - started)
            (results / "summary.md").write_text(summary)
            (results / "summary.json").write_text(json.dumps(summary_data(outcomes), indent=1))
            print("\n" + summary)
            print(f"results: {results} (summary.md, phase*.html, phase*_stats.csv, ...)")
            return 0 if all(phase_ok(o) for o in outcomes) else 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping Locust and the cluster", file=sys.stderr)
            return 130
        finally:
            with _ignoring_interrupts():
                locust.stop()
                _stop_cluster(cluster)


def _locustfile() -> Path:
    path = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the demo from a kvstore source checkout")
    return path


# ----- cluster -------------------------------------------------------------------------------


def _topology(path: str | None) -> Topology:
    topology = load_topology(path) if path else named_topology(DEMO_TOPOLOGY)
    if topology.shards <= FAULT_SHARD:
        raise ConfigError(
            f"the demo needs at least {FAULT_SHARD + 1} shards (it fails shard {FAULT_SHARD}'s leader); "
            f"the topology {topology.label} has {topology.shards}"
        )
    return topology


def _start_cluster(cluster: LocalCluster, topology: Topology) -> None:
    _remove_stale(cluster)
    print(f"starting the {topology.label} cluster in {cluster.dir} ...", flush=True)
    t = time.monotonic()
    cluster.create(topology=topology)
    cluster.start_all()
    shards = cluster.wait_for_leaders(60.0)
    leaders = ", ".join(f"shard {s['shard']}: {s['leader']}" for s in shards)
    print(f"cluster up in {time.monotonic() - t:.1f}s ({leaders})", flush=True)
    _preload(cluster)


def _remove_stale(cluster: LocalCluster) -> None:
    """A previous demo's directory is stopped and removed; anything else there is left alone."""
    if not cluster.dir.exists():
        return
    if not cluster.map_path.exists():
        if any(cluster.dir.iterdir()):
            raise FileExistsError(f"{cluster.dir} is not empty and holds no kvstore cluster: not touching it")
        return
    print(f"removing the previous cluster in {cluster.dir}", flush=True)
    _stop_cluster(cluster)
    shutil.rmtree(cluster.dir)


def _stop_cluster(cluster: LocalCluster) -> None:
    if cluster.map_path.exists():
        cluster.down()
    _kill_strays(cluster.dir)


def _kill_strays(directory: Path) -> None:
    """Node processes of this cluster directory that no pid file names (a restart cut short)."""
    marker = str(directory / "nodes") + os.sep
    for pid in _pids_with_arg_prefix(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_with_arg_prefix(prefix: str) -> list[int]:
    pids = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node" in argv and any(a.decode(errors="replace").startswith(prefix) for a in argv):
            pids.append(int(entry.name))
    return pids


def _preload(cluster: LocalCluster) -> None:
    """Every key exists before the first read, so reads return values, not misses."""
    from kvstore import Client

    value = os.urandom(VALUE_SIZE)
    with Client.from_cluster(cluster.dir, timeout=30.0) as kv:
        for first in range(0, KEYSPACE, 500):
            kv.put_many(
                {b"lt:%08d" % i: value for i in range(first, min(first + 500, KEYSPACE))}, atomic=False
            )


def _wait_rejoined(cluster: LocalCluster, timeout: float = 30.0) -> bool:
    """After the fault phase: every replica running and following a leader again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = cluster.status(timeout=0.5)
        roles = [r["role"] for s in shards for r in s["replicas"]]
        if all(s["leader"] for s in shards) and all(r in ("leader", "follower") for r in roles):
            return True
        time.sleep(0.3)
    return False


# ----- one phase -----------------------------------------------------------------------------


def _run_phase(
    number: int,
    phase: Phase,
    cluster: LocalCluster,
    locust: _LocustProcess,
    users: int,
    seconds: int,
    results: Path,
    locustfile: Path,
) -> Outcome:
    prefix = results / f"phase{number}"
    for stale in results.glob(f"phase{number}[._]*"):
        stale.unlink()
    cmd = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--kv-shape", "steady",
        "--host", str(cluster.dir), "--csv", str(prefix), "--csv-full-history",
        "--html", f"{prefix}.html", "--json-file", str(prefix), "--only-summary",
        "--kv-report", f"{prefix}_kv.json", *WORKLOAD, *phase.args,
    ]  # fmt: skip
    print(f"\nphase {number}: {phase.title} ({users} users, {seconds}s)", flush=True)
    outcome = Outcome(number, phase)
    locust.start(cmd, prefix.with_suffix(".log"))
    progress = _Progress(number, phase, seconds, prefix)
    outcome.exit_code = locust.wait(seconds + 90.0, progress.show)
    progress.done()
    outcome.stats = final_stats(prefix.with_suffix(".json"))
    outcome.kv = read_json(Path(f"{prefix}_kv.json"))
    if phase.fault:
        outcome.rejoined_after_phase = _wait_rejoined(cluster)
    return outcome


class _LocustProcess:
    """The one Locust subprocess running at a time, stopped by its pid."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cmd: list[str], log_path: Path) -> None:
        with open(log_path, "wb") as log:
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop it in order.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait(self, timeout: float, tick: Any) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                print(f"\nLocust did not finish within {timeout:.0f}s: stopping it", file=sys.stderr)
                self.stop()
                break
            tick()
            time.sleep(0.5)
        code, self.proc = self.proc.returncode, None
        return code

    def stop(self) -> None:
        """SIGTERM (Locust then stops its users and restarts a node it killed), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


class _Progress:
    """One live line per phase: elapsed, users, ops/s, p95, errors, and the fault as it happens."""

    def __init__(self, number: int, phase: Phase, seconds: int, prefix: Path) -> None:
        self.label = f"phase {number}"
        self.seconds = seconds
        self.history = Path(f"{prefix}_stats_history.csv")
        self.report = Path(f"{prefix}_kv.json")
        self.fault = phase.fault
        self.load_started: float | None = None
        self.tty = sys.stdout.isatty()
        self.last_print = 0.0
        self.line = ""

    def show(self) -> None:
        row = _last_aggregated_row(self.history)
        if row is not None and self.load_started is None and int(row["User Count"] or 0) > 0:
            self.load_started = time.monotonic()
        elapsed = min(self.seconds, time.monotonic() - (self.load_started or time.monotonic()))
        if row is None or self.load_started is None:
            text = f"{self.label}: starting Locust ..."
        else:
            text = (
                f"{self.label}: {elapsed:4.0f}/{self.seconds}s  users {row['User Count']:>3}  "
                f"{float(row['Requests/s']):7.0f} ops/s  p95 {row['95%']:>4} ms  "
                f"requests {row['Total Request Count']}  errors {row['Total Failure Count']}"
            )
        if self.fault:
            text += _fault_progress(read_json(self.report))
        self.line = text
        if self.tty:
            print("\r\033[K" + text, end="", flush=True)
        elif time.monotonic() - self.last_print >= 5.0:
            print(text, flush=True)
            self.last_print = time.monotonic()

    def done(self) -> None:
        if self.tty:
            print(flush=True)
        elif self.line:
            print(self.line, flush=True)


def _fault_progress(report: dict[str, Any]) -> str:
    faults = report.get("faults") or []
    if not faults:
        return ""
    f = faults[-1]
    text = f"  | killed {f['node']}"
    if f.get("new_leader"):
        text += f", {f['new_leader']} leads after {f['election_seconds']:.1f}s"
    if f.get("restarted_at"):
        text += ", restarted"
    if f.get("rejoin_seconds") is not None:
        text += f", caught up in {f['rejoin_seconds']:.1f}s"
    return text


def _last_aggregated_row(path: Path) -> dict[str, str] | None:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    except (OSError, csv.Error):
        return None
    return rows[-1] if rows else None


# ----- signals -------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `finally` cleans up either way."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with _signals_handled_by(interrupt):
        yield


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave nodes running."""
    with _signals_handled_by(signal.SIG_IGN):
        yield


@contextlib.contextmanager
def _signals_handled_by(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block (only the main thread may set them)."""
    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        old = {}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
