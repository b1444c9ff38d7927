"""Where a put's latency goes, one put at a time: a timeline of the client and the three replicas.

    python loadtests/trace_put.py [--puts 2000] [--seconds 60]

Starts a 1x3 cluster (production defaults, durable) whose nodes load `trace_hooks/sitecustomize.py`,
which timestamps the steps of a write on CLOCK_MONOTONIC (one clock for every process on the host).
Then it makes `--puts` puts one at a time, cuts each put's timeline into the segments below (the
first follower to acknowledge is the one that commits the entry) and prints their quartiles.
The hooks add a few microseconds per event; compare segments, not the total, with the bench's row
`kv put 1x3 smart, 1 in flight`. Findings: docs/performance.md, "The 1-in-flight latency path"."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import bench_lib as lib  # noqa: E402

from kvstore.client import AsyncClient, ReadPolicy  # noqa: E402

HOOKS = Path(__file__).resolve().parent / "trace_hooks"

# (segment end, who, event): each found after the previous one in the put's timeline.
STEPS = [
    ("the SDK calls gRPC", "C", "c.send"),
    ("the leader's Put handler runs", "L", "handler"),
    ("request checked, write begins", "L", "put.start"),
    ("proposal leaves the loop", "L", "flush"),
    ("tick thread sends the entry", "L", "send append_entries"),
    ("a follower receives it", "F", "recv append_entries"),
    ("it acknowledges (after its sync)", "F", "send next_node_idx"),
    ("the leader reads the ack", "L", "recv next_node_idx"),
    ("its next tick starts", "L", "tick"),
    ("commit found, apply starts", "L", "apply.start"),
    ("apply + LMDB commit done", "L", "apply"),
    ("loop delivers the result", "L", "deliver"),
    ("handler returns", "L", "put.end"),
    ("gRPC answer reaches the SDK", "C", "c.recv"),
    ("the SDK returns it", "C", "c.end"),
]


def load(directory: Path) -> list[tuple[int, str, str]]:
    events = []
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            t, pid, name = line.split(" ", 2)
            events.append((int(t), pid, name))
    events.sort()
    return events


def segments(events: list[tuple[int, str, str]], client: str) -> dict[str, list[float]]:
    leader = next(pid for _, pid, name in events if name == "flush")
    out: dict[str, list[float]] = defaultdict(list)
    window: list[tuple[int, str, str]] | None = None
    for event in events:
        t, pid, name = event
        if pid == client and name == "c.start":
            window = [event]
        elif window is not None:
            window.append(event)
            if pid == client and name == "c.end":
                _cut(window, client, leader, out)
                window = None
    return out


def _cut(window: list[tuple[int, str, str]], client: str, leader: str, out: dict[str, list[float]]) -> None:
    def who(pid: str) -> str:
        return "C" if pid == client else "L" if pid == leader else "F"

    def matches(event: tuple[int, str, str], role: str, wanted: str) -> bool:
        name = event[2]  # "apply 0.482": the event "apply", with its duration
        return who(event[1]) == role and (name == wanted or name.startswith(wanted + " "))

    at, points, i = window[0][0], [], 0
    for label, role, wanted in STEPS:
        while i < len(window) and not matches(window[i], role, wanted):
            i += 1
        if i == len(window):
            return  # a put whose timeline is incomplete (an election, a lost event): skipped
        points.append((label, window[i][0]))
    previous = at
    for label, t in points:
        out[label].append((t - previous) / 1e6)
        previous = t
    out["total"].append((previous - at) / 1e6)
    for _, pid, name in window:
        kind, _, took = name.partition(" ")
        if kind in ("sync", "apply") and took:
            out[f"({who(pid)} {kind} duration)"].append(float(took))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[int(q * (len(ordered) - 1))]  # noqa: E731
    return pick(0.25), pick(0.5), pick(0.75)


def table(found: dict[str, list[float]]) -> str:
    lines = [f"{'segment (ends when)':40} {'p25':>7} {'p50':>7} {'p75':>7}  puts", "-" * 70]
    for label in [s[0] for s in STEPS] + ["total"] + sorted(k for k in found if k.startswith("(")):
        if found.get(label):
            q = quartiles(found[label])
            lines.append(f"{label:40} {q[0]:7.3f} {q[1]:7.3f} {q[2]:7.3f}  {len(found[label])}")
    return "\n".join(lines)


async def trace(puts: int, seconds: float, work: Path) -> dict[str, list[float]]:
    events_dir = work / "events"
    events_dir.mkdir(parents=True)
    saved = {name: os.environ.get(name) for name in ("KVSTORE_TRACE_DIR", "PYTHONPATH")}
    os.environ["KVSTORE_TRACE_DIR"] = str(events_dir)  # the nodes inherit both
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))
    try:
        cluster = await bench.start_cluster(lib.BenchConfig.make(False, work), "trace", 1)
    finally:  # only the nodes are traced
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    client, log = str(os.getpid()), open(events_dir / f"{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115
    call = AsyncClient._call

    async def traced_call(self: AsyncClient, step: Any, timeout: float | None = None) -> Any:
        log.write(f"{time.monotonic_ns()} {client} c.send\n")
        try:
            return await call(self, step, timeout)
        finally:
            log.write(f"{time.monotonic_ns()} {client} c.recv\n")

    AsyncClient._call = traced_call  # type: ignore[method-assign]
    try:
        async with AsyncClient.from_cluster(cluster.dir, read_policy=ReadPolicy.LEADER) as kv:
            await bench.preload(kv, 0, 1000)
            for i in range(200):  # warm-up: connections, caches
                await kv.put(lib.key(i % 1000), lib.VALUE)
            deadline = time.monotonic() + seconds
            for i in range(puts):
                if time.monotonic() > deadline:
                    break
                log.write(f"{time.monotonic_ns()} {client} c.start\n")
                await kv.put(lib.key(i % 1000), lib.VALUE)
                log.write(f"{time.monotonic_ns()} {client} c.end\n")
    finally:
        AsyncClient._call = call  # type: ignore[method-assign]
        log.close()
        await asyncio.to_thread(cluster.down)
    return segments(load(events_dir), client)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--puts", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop making puts after this long")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvstore-trace-"))
    try:
        found = asyncio.run(trace(args.puts, args.seconds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(found))


if __name__ == "__main__":
    main()
