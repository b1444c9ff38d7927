"""Building blocks of `kvstore bench` (loadtests/bench.py): the load driver, result rows, processes.

The client model every row shares: one client process (the bench itself), grpc.aio on uvloop,
`concurrency` calls in flight (asyncio workers pulling from one counter), 16-byte keys and 100-byte
values, batched calls carrying 100 keys (drawn before the run: `KeyBatches`). A run is bounded in
operations AND in time; a call still in flight at the time bound (plus a grace) is cancelled, so
no run can hang the bench.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.config import StorageSettings

KEY_BYTES = 16
VALUE = bytes(random.Random(7).randrange(256) for _ in range(100))
BATCH = 100  # keys per batched call (multi_put, multi_get, echo batched, pysyncobj mset)
GRACE_SECONDS = 5.0  # how long in-flight calls may outlive a run's time bound before cancellation


def key(i: int) -> bytes:
    """The i-th key of a keyspace: exactly 16 bytes."""
    return b"k%015d" % i


def keys(n: int) -> list[bytes]:
    """The first n keys of a keyspace."""
    return [key(i) for i in range(n)]


class KeyBatches:
    """Random batches of distinct keys, drawn once before a run and handed out in turn by call
    number. Drawing and formatting 100 random keys costs the client ~25 us per call (a fifth of
    its CPU under strong multi_get); drawn inside the timed loop, the harness's `random` module
    would be measured as the system's. Every batched row (kvstore, echo, pysyncobj, etcd) takes
    its keys this way."""

    def __init__(self, population: list[bytes], seed: int, count: int = 1024, size: int = BATCH) -> None:
        rng = random.Random(seed)
        self._batches = [rng.sample(population, size) for _ in range(count)]

    def __getitem__(self, call: int) -> list[bytes]:
        return self._batches[call % len(self._batches)]


def tagged_key(tag: int, i: int) -> bytes:
    """A 16-byte key whose shard is chosen by its {hash tag} (only the tag is hashed)."""
    return b"{t%03d}k%09d" % (tag % 1000, i % 10**9)


# ----- measurements --------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What one bounded run produced. Latencies are of successful calls, in seconds."""

    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def record_error(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]


async def drive(
    op: Callable[[int], Awaitable[Any]],
    *,
    concurrency: int,
    max_calls: int,
    max_seconds: float,
) -> Measurement:
    """Run `op(i)` with `concurrency` calls in flight until `max_calls` or `max_seconds`.

    No per-call wrapper (a `wait_for` per call would cost more than the bare gRPC echo): the time
    bound is enforced by not starting new calls, then by cancelling stragglers after a grace."""
    result = Measurement()
    counter = itertools.count()
    started = time.perf_counter()
    deadline = started + max_seconds
    clock = time.perf_counter

    async def worker() -> None:
        while (i := next(counter)) < max_calls and clock() < deadline:
            t0 = clock()
            try:
                await op(i)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # counted and reported; one failing call must not end the run
                result.record_error(exc)
                await asyncio.sleep(0.01)  # no hot loop against an unavailable server
            else:
                result.latencies.append(clock() - t0)
                result.calls += 1

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=max_seconds + GRACE_SECONDS)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        result.first_error = result.first_error or f"{len(pending)} call(s) cancelled at the time bound"
    result.seconds = time.perf_counter() - started
    return result


def drive_threads(
    op: Callable[[int], Any], *, threads: int, max_calls: int, max_seconds: float
) -> Measurement:
    """The synchronous twin of `drive`: `threads` callers, each blocking in `op`."""
    result = Measurement()
    counter = itertools.count()
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= max_calls or time.perf_counter() >= deadline:
                return
            t0 = time.perf_counter()
            try:
                op(i)
            except Exception as exc:
                with lock:
                    result.record_error(exc)
                time.sleep(0.01)
            else:
                elapsed = time.perf_counter() - t0
                with lock:
                    result.latencies.append(elapsed)
                    result.calls += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(0.1, deadline + GRACE_SECONDS - time.perf_counter()))
    result.seconds = time.perf_counter() - started
    return result


# ----- result rows ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. `rate` is per unit: operations, or keys for batched calls."""

    group: str  # ceiling | kvstore | peer | growth
    scenario: str
    unit: str  # "ops" or "keys"
    per_call: int  # units per call
    measurement: Measurement
    ceiling: str | None = None  # the scenario name of the ceiling this row is compared with
    peer: str | None = None  # the etcd scenario it is compared with, when etcd ran
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.measurement.calls_per_s() * self.per_call

    def as_dict(self, ratio: float | None, peer_ratio: float | None) -> dict[str, Any]:
        m = self.measurement
        return {
            "group": self.group,
            "scenario": self.scenario,
            "unit": self.unit,
            "per_call": self.per_call,
            "rate": round(self.rate, 1),
            "calls": m.calls,
            "errors": m.errors,
            "seconds": round(m.seconds, 3),
            "p50_ms": round(m.percentile_ms(0.50), 3),
            "p99_ms": round(m.percentile_ms(0.99), 3),
            "ceiling": self.ceiling,
            "ratio": None if ratio is None else round(ratio, 3),
            "peer": self.peer,
            "peer_ratio": None if peer_ratio is None else round(peer_ratio, 3),
            "first_error": m.first_error,
            "note": self.note,
            **self.extra,
        }


class Results:
    """All rows of one run, in order, with ratios resolved by scenario name at the end."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.sections: dict[str, Any] = {}

    def add(self, row: Row, echo: bool = True) -> Row:
        self.rows.append(row)
        if echo:
            m = row.measurement
            err = f" errors={m.errors} ({m.first_error})" if m.errors or m.first_error else ""
            print(
                f"  {row.scenario:<44} {row.rate:>11,.0f} {row.unit}/s  p50 {m.percentile_ms(0.5):7.2f} ms"
                f"  p99 {m.percentile_ms(0.99):7.2f} ms{err}",
                flush=True,
            )
        return row

    def rate_of(self, scenario: str | None) -> float | None:
        for row in self.rows:
            if row.scenario == scenario and row.measurement.calls > 0:
                return row.rate
        return None

    def row(self, scenario: str) -> Row | None:
        return next((r for r in self.rows if r.scenario == scenario), None)

    def ratios(self, row: Row) -> tuple[float | None, float | None]:
        ceiling, peer = self.rate_of(row.ceiling), self.rate_of(row.peer)
        ratio = row.rate / ceiling if ceiling else None
        return ratio, (row.rate / peer if peer else None)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict(*self.ratios(r)) for r in self.rows]

    def table(self) -> str:
        show_peer = any(self.rate_of(r.peer) for r in self.rows)
        head = (
            f"| scenario | rate | p50 ms | p99 ms | errors | ratio | to ceiling |{' vs etcd |' * show_peer}"
        )
        lines = [head, "|" + " --- |" * (head.count("|") - 1)]
        for row, d in zip(self.rows, self.as_dicts(), strict=True):
            ratio = f"{d['ratio']:.2f}x" if d["ratio"] is not None else "-"
            cells = [
                row.scenario,
                f"{row.rate:,.0f} {row.unit}/s",
                f"{d['p50_ms']:.2f}",
                f"{d['p99_ms']:.2f}",
                str(d["errors"]),
                ratio,
                row.ceiling or "-",
            ]
            if show_peer:
                cells.append(f"{d['peer_ratio']:.2f}x ({row.peer})" if d["peer_ratio"] is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(out)
    return out


# ----- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a helper process in its own session, output to `log_path`; stop it with `stop`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM this one process by PID, SIGKILL it if it lingers, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5.0)


def wait_for_port(address: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {address} after {timeout}s")
        time.sleep(0.1)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process (kB), from /proc/PID/status; empty if it is gone."""
    wanted = ("VmRSS", "RssAnon", "RssFile")
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in wanted:
                    found[name] = int(value.split()[0])
    except OSError:
        return {}
    return found


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import grpc
    import lmdb

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}",
    }
    from importlib import metadata

    for dist in ("protobuf", "uvloop", "pysyncobj"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    with contextlib.suppress(OSError):
        info["cpu"] = next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            "?",
        )
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    return info


# ----- configuration -------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Every bound of one run. `quick` aims at < 3 minutes in all, the full run at < 20."""

    quick: bool
    work: Path
    concurrency: int = 64  # calls in flight, for every scenario (and sync callers for pysyncobj)
    seconds: float = 6.0  # measured part of each scenario
    warmup_seconds: float = 1.0  # unmeasured calls before each scenario (channels, leaders, caches)
    max_calls: int = 500_000  # per scenario: the op bound beside the time bound
    keyspace: int = 10_000  # keys preloaded and read/overwritten by the kvstore scenarios
    growth_small: int = 10_000
    growth_large: int = 1_000_000
    load_seconds: float = 300.0  # bound on loading the large growth keyspace
    # Past one client-session retention (storage.dedup_retention_seconds, 60 s): until then every
    # write adds an outcome row that nothing expires yet, by design, so memory is not yet at its
    # steady state. The RSS target judges the run after that.
    rss_warmup: float = field(default_factory=lambda: StorageSettings().dedup_retention_seconds + 15.0)
    rss_seconds: float = 300.0
    rss_interval: float = 5.0
    profile_seconds: float = 20.0  # py-spy on the leader, during the RSS run's warm-up

    @classmethod
    def make(cls, quick: bool, work: Path, concurrency: int | None = None) -> BenchConfig:
        config = cls(quick=quick, work=work)
        if quick:
            config.seconds, config.warmup_seconds = 1.5, 0.4
            config.growth_large, config.load_seconds = 100_000, 40.0
            config.rss_warmup, config.rss_seconds, config.rss_interval = 6.0, 20.0, 2.0
            config.profile_seconds = 5.0
        if concurrency:
            config.concurrency = concurrency
        return config

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
