"""Slot moves, measured (issue 16, item 9): the unthrottled move rate against the same run's
multi_put rate, and the foreground p99 during a throttled move against the p99 before it.

On a 3 shards x 3 replicas cluster (with its metadata group), in one run:
1. preload: `multi_put` of 100 keys per call, 64 in flight: its rate (keys/s) is the ceiling;
2. move all of shard 0's slots in 0-32767 to shard 1, unthrottled: keys moved / seconds;
3. a foreground load (puts and strong gets of one key each, 8 in flight) for a while: its p99;
4. the same load while the range moves back, throttled to a quarter of step 2's rate: its p99.
Ratios are printed (absolute numbers drift on a shared 2-core machine; ratios hold).

    python loadtests/move_bench.py [--keys 100000] [--seconds 10] [--out results/move_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kvstore import AsyncClient
from kvstore.cluster.local import LocalCluster
from kvstore.config import RaftSettings, StorageSettings
from kvstore.meta.mover import Mover, plan_moves

VALUE = b"v" * 100


async def preload(kv: AsyncClient, keys: list[bytes]) -> float:
    """multi_put 100 keys of one shard a call (as the bench's multi_put rows), 64 in flight; keys/s."""
    table = (await kv.cluster_map()).slots
    by_shard: dict[int, list[bytes]] = {}
    for key in keys:
        by_shard.setdefault(table.shard_for(key), []).append(key)
    batches = [ks[i : i + 100] for ks in by_shard.values() for i in range(0, len(ks), 100)]
    queue = list(batches)
    began = time.monotonic()

    async def worker() -> None:
        while queue:
            batch = queue.pop()
            await kv.multi_put({k: VALUE for k in batch})

    await asyncio.gather(*(worker() for _ in range(64)))
    return len(keys) / (time.monotonic() - began)


async def foreground(kv: AsyncClient, keys: list[bytes], stop: asyncio.Event, limit: float) -> list[float]:
    """Puts and strong gets of one key, 8 in flight, until `stop` or `limit` seconds; latencies."""
    latencies: list[float] = []
    rng = random.Random(3)
    deadline = time.monotonic() + limit

    async def worker() -> None:
        while not stop.is_set() and time.monotonic() < deadline and len(latencies) < 500_000:
            key = rng.choice(keys)
            began = time.monotonic()
            if rng.random() < 0.5:
                await kv.put(key, VALUE)
            else:
                await kv.get(key)
            latencies.append(time.monotonic() - began)

    await asyncio.gather(*(worker() for _ in range(8)))
    return latencies


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99)] if ordered else float("nan")


async def move(cluster: LocalCluster, source: int, target: int, rate: float) -> tuple[int, float]:
    """Move all of `source`'s slots in 0-32767 to `target`; (keys moved, seconds)."""
    mover = Mover(cluster.cluster_map(), cluster.admin_token())
    try:
        current, _ = await mover.store.read()
        assert current is not None
        ranges = {s: r for s, r in plan_moves(current, 0, 32767, target).items() if s == source}
        began = time.monotonic()
        moves = await mover.move_ranges(ranges, target, rate)
        return sum(m.keys_copied for m in moves), time.monotonic() - began
    finally:
        await mover.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kvstore-move-bench-"))
    cluster = LocalCluster(root / "c")
    cluster.create(shards=3, replicas=3, meta_replicas=3, raft=RaftSettings(), storage=StorageSettings())
    cluster.start_all()
    try:
        cluster.wait_until_serving(timeout=60)
        await asyncio.sleep(1.0)  # the metadata group seeds the map
        keys = [b"mb:%012d" % i for i in range(args.keys)]
        async with AsyncClient.from_cluster(cluster.dir, timeout=30) as kv:
            mput_rate = await preload(kv, keys)
            moved, seconds = await move(cluster, 0, 1, 0.0)
            move_rate = moved / seconds
            stop = asyncio.Event()
            before = await foreground(kv, keys, stop, args.seconds)
            throttled = move_rate / 4
            task = asyncio.ensure_future(foreground(kv, keys, stop, 600))
            moved_back, back_seconds = await move(cluster, 1, 0, throttled)
            stop.set()
            during = await task
        result = {
            "keys": args.keys,
            "multi_put_keys_per_s": round(mput_rate),
            "move_keys": moved,
            "move_seconds": round(seconds, 2),
            "move_keys_per_s": round(move_rate),
            "move_vs_multi_put": round(move_rate / mput_rate, 2),
            "throttle_keys_per_s": round(throttled),
            "throttled_move_keys": moved_back,
            "throttled_move_seconds": round(back_seconds, 2),
            "p99_before_ms": round(p99(before) * 1000, 1),
            "p99_during_ms": round(p99(during) * 1000, 1),
            "p99_during_vs_before": round(p99(during) / p99(before), 2),
            "ops_before": len(before),
            "ops_during": len(during),
        }
        return result
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="results/move_bench.json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    print(
        f"move rate {result['move_keys_per_s']} keys/s = {result['move_vs_multi_put']}x multi_put 100 "
        f"(target >= 0.5x); p99 during a move throttled to {result['throttle_keys_per_s']} keys/s = "
        f"{result['p99_during_vs_before']}x before (target <= 2x)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
