"""`kvstore bench`: kvstore against ceilings measured in the same run, with the same client model.

Client model (every row): this one process, grpc.aio on uvloop, `concurrency` calls in flight
(64 by default; the bare pysyncobj ceiling uses as many synchronous caller threads), 16-byte keys,
100-byte values, batched calls of 100 keys. Every run is bounded in calls and in seconds.

Sections, in order: ceilings (LMDB, gRPC echo, bare pysyncobj), the optional etcd peer, kvstore on
1 shard and on 3 shards (3 replicas each) through the smart client and through a router process,
then growth (get latency at 10k and 1M keys, replica RSS over a sustained write run, and a py-spy
profile of the leader under that write load when py-spy is installed).

    kvstore bench [--quick] [--etcd] [--out results/bench.json]
    python loadtests/bench.py --quick --only ceilings,kv1 --concurrency 32    # development
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as lib  # noqa: E402
import ceilings as ceil  # noqa: E402

from kvstore import AsyncClient, Consistency, ReadPolicy  # noqa: E402
from kvstore.client.core import ReadConsistency  # noqa: E402
from kvstore.cluster.local import LocalCluster  # noqa: E402
from kvstore.config import RaftSettings, StorageSettings  # noqa: E402

SECTIONS = ("ceilings", "etcd", "kv1", "kv3", "growth")
READS: tuple[tuple[str, ReadConsistency], ...] = (
    ("strong", Consistency.STRONG),
    ("session", Consistency.SESSION),
    ("bounded(1s)", Consistency.bounded(1.0)),
    ("eventual", Consistency.EVENTUAL),
)
# Replica reads are spread over the shard's replicas; strong reads too (a follower serves them
# after a coalesced barrier). The router keeps its own read policy.
READ_POLICY = ReadPolicy.ROUND_ROBIN
ETCD_INSTALL_HINT = "`apt-get install etcd-server etcd-client`"


PUT_ONE = "kv put 1x3 smart, 1 in flight"


def scenario(op: str, shards: int, door: str) -> str:
    return f"kv {op} {shards}x3 {door}"


# ----- kvstore scenarios ---------------------------------------------------------------------------


async def start_cluster(config: lib.BenchConfig, name: str, shards: int) -> LocalCluster:
    cluster = LocalCluster(config.work / name)
    # Production defaults: the bench measures what a user gets from `kvstore cluster up`.
    cluster.create(shards=shards, replicas=3, raft=RaftSettings(), storage=StorageSettings())
    cluster.start_all()
    try:
        await asyncio.to_thread(cluster.wait_for_leaders, 90.0)
    except BaseException:
        await asyncio.to_thread(cluster.down)
        raise
    return cluster


async def preload(kv: AsyncClient, start: int, end: int, batch: int = 1000) -> None:
    for first in range(start, end, batch):
        await kv.put_many(
            {lib.key(i): lib.VALUE for i in range(first, min(end, first + batch))}, atomic=False
        )


def keys_by_shard(cluster: LocalCluster, keyspace: int) -> list[list[bytes]]:
    buckets = cluster.cluster_map().slots.shards_for(lib.keys(keyspace))
    return [buckets[s] for s in sorted(buckets)]


def kv_ops(
    kv: AsyncClient,
    keyspace: int,
    buckets: list[list[bytes]],
    seed: int,
    strong_kv: AsyncClient | None = None,
) -> list[tuple[str, Callable[[int], Awaitable[Any]], int, str, str]]:
    """(op name, op, keys per call, ceiling, etcd peer) for one client.

    `strong_kv` serves the strong multi_get: the client's default read policy (the leader) rather
    than `kv`'s round robin, whose follower reads each forward a barrier to the leader."""
    strong_kv = strong_kv or kv
    rng = random.Random(seed)
    rand = rng.randrange

    async def put(i: int) -> None:
        await kv.put(lib.key(rand(keyspace)), lib.VALUE)

    def get_at(level: ReadConsistency) -> Callable[[int], Awaitable[Any]]:
        async def get(i: int) -> None:
            await kv.get(lib.key(rand(keyspace)), consistency=level)

        return get

    per_shard = [lib.KeyBatches(bucket, seed + shard) for shard, bucket in enumerate(buckets)]
    anywhere = lib.KeyBatches(lib.keys(keyspace), seed)

    async def multi_put(i: int) -> None:
        # Atomic: all 100 keys on one shard; successive calls rotate over the shards.
        batch = per_shard[i % len(per_shard)][i // len(per_shard)]
        await kv.multi_put({k: lib.VALUE for k in batch})

    async def multi_get(i: int) -> None:
        await strong_kv.multi_get(anywhere[i], consistency=Consistency.STRONG)

    ops: list[tuple[str, Callable[[int], Awaitable[Any]], int, str, str]] = [
        ("put", put, 1, ceil.SYNCOBJ_SET, ceil.ETCD_PUT)
    ]
    for name, level in READS:
        peer = ceil.ETCD_GET_LINEARIZABLE if name == "strong" else ceil.ETCD_GET_SERIALIZABLE
        ops.append((f"get {name}", get_at(level), 1, ceil.ECHO_UNARY, peer))
    ops.append(("multi_put 100", multi_put, lib.BATCH, ceil.SYNCOBJ_MSET, ceil.ETCD_TXN_PUTS))
    ops.append(("multi_get 100 (strong)", multi_get, lib.BATCH, ceil.ECHO_MULTI_GET, ceil.ETCD_TXN_GETS))
    return ops


async def kvstore_suite(config: lib.BenchConfig, results: lib.Results, shards: int) -> None:
    cluster = await start_cluster(config, f"cluster-{shards}x3", shards)
    router = None
    clients: list[AsyncClient] = []
    try:
        smart = AsyncClient.from_cluster(cluster.dir, read_policy=READ_POLICY)
        clients.append(smart)
        await preload(smart, 0, config.keyspace)
        router_address = f"127.0.0.1:{lib.free_port()}"
        router = lib.spawn(
            [
                sys.executable,
                "-m",
                "kvstore",
                "router",
                "--cluster",
                str(cluster.dir),
                "--listen",
                router_address,
            ],
            config.work / f"logs/router-{shards}x3.log",
        )
        await asyncio.to_thread(lib.wait_for_port, router_address, 30.0, router)
        routed = AsyncClient(router=router_address)
        clients.append(routed)
        buckets = keys_by_shard(cluster, config.keyspace)
        # The client's default policy for strong reads: every read at the leader.
        leader_only = AsyncClient.from_cluster(cluster.dir, read_policy=ReadPolicy.LEADER)
        clients.append(leader_only)
        for door, kv in (("smart", smart), ("router", routed)):
            strong = leader_only if door == "smart" else None  # the router reads at leaders anyway
            for op_name, op, per_call, ceiling, peer in kv_ops(kv, config.keyspace, buckets, shards, strong):
                m = await ceil.measure(config, op)
                unit = "ops" if per_call == 1 else "keys"
                row = lib.Row("kvstore", scenario(op_name, shards, door), unit, per_call, m, ceiling, peer)
                results.add(row)
            if door == "smart" and shards == 1:
                # Latency, not throughput: one put at a time (etcd's peer row is measured alike).
                put_op = kv_ops(kv, config.keyspace, buckets, shards)[0][1]
                m = await ceil.measure(config, put_op, concurrency=1)
                results.add(lib.Row("kvstore", PUT_ONE, "ops", 1, m, ceil.SYNCOBJ_SET_ONE, ceil.ETCD_PUT_ONE))
            if door == "smart":
                # Strong reads again with every read at the leader, the client's default policy:
                # shows what follower barriers (round robin above) cost or save.
                op = kv_ops(leader_only, config.keyspace, buckets, shards)[1][1]
                m = await ceil.measure(config, op)
                name = scenario("get strong, leader policy", shards, door)
                results.add(
                    lib.Row("kvstore", name, "ops", 1, m, ceil.ECHO_UNARY, ceil.ETCD_GET_LINEARIZABLE)
                )
    finally:
        for kv in clients:
            with contextlib.suppress(Exception):
                await kv.close()
        lib.stop(router)
        await asyncio.to_thread(cluster.down)


# ----- growth: latency with more keys, memory over a long write run, a profile --------------------


async def load_keys(kv: AsyncClient, start: int, end: int, seconds: float) -> int:
    """multi_put batches of 1,000 keys, 4 in flight; returns how many keys were written.

    (Batches were once capped at 250 keys: pysyncobj 0.3.17 garbled entries sent in 64 KiB chunks.
    The state machine now sends every entry as one message, so big batches load fastest.)"""
    batch = 1000

    async def op(i: int) -> None:
        first = start + i * batch
        await kv.multi_put({lib.key(j): lib.VALUE for j in range(first, min(end, first + batch))})

    calls = (end - start + batch - 1) // batch
    m = await lib.drive(op, concurrency=4, max_calls=calls, max_seconds=seconds)
    if m.errors:
        print(f"  loading: {m.errors} batch(es) failed: {m.first_error}", flush=True)
    return min(end - start, m.calls * batch)


async def caught_up(cluster: LocalCluster, timeout: float = 90.0) -> None:
    """Wait until every replica has applied what its leader has committed (reads see every key)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = await asyncio.to_thread(cluster.status, 2.0)
        done = True
        for shard in shards:
            replicas = shard["replicas"]
            commit = max(r["commit_index"] for r in replicas)
            done = (
                done and shard["leader"] is not None and all(r["applied_index"] >= commit for r in replicas)
            )
        if done:
            return
        await asyncio.sleep(0.5)
    print("  warning: replicas had not caught up within the timeout", flush=True)


async def growth(config: lib.BenchConfig, results: lib.Results, profile: bool) -> None:
    cluster = await start_cluster(config, "cluster-growth", 1)
    kv = AsyncClient.from_cluster(cluster.dir, read_policy=READ_POLICY)
    try:
        small = await load_keys(kv, 0, config.growth_small, config.load_seconds)
        await caught_up(cluster)
        results.sections["rss"] = await rss_run(config, results, cluster, kv, small, profile)
        # Both latencies are measured with only the load between them: this machine's speed drifts
        # 10-20% over minutes, which would otherwise swamp what the key count changes.
        await caught_up(cluster)
        await growth_get(config, results, kv, small)
        started = time.monotonic()
        large = small + await load_keys(kv, small, config.growth_large, config.load_seconds)
        load_s = time.monotonic() - started
        print(f"  loaded {large - small:,} more keys in {load_s:.1f}s", flush=True)
        await caught_up(cluster, 180.0)
        await growth_get(config, results, kv, large)
        results.sections["growth"] = {
            "small_keys": small,
            "large_keys": large,
            "load_keys_per_s": round((large - small) / load_s, 1) if load_s > 0 else None,
            "key_count": (await asyncio.to_thread(cluster.status, 2.0))[0]["key_count"],
        }
    finally:
        with contextlib.suppress(Exception):
            await kv.close()
        await asyncio.to_thread(cluster.down)


def growth_name(keys: int) -> str:
    return f"growth get eventual @{keys:,} keys"


async def growth_get(config: lib.BenchConfig, results: lib.Results, kv: AsyncClient, keys: int) -> None:
    rand = random.Random(keys).randrange

    async def get(i: int) -> None:
        await kv.get(lib.key(rand(keys)), consistency=Consistency.EVENTUAL)

    m = await ceil.measure(config, get)
    results.add(lib.Row("growth", growth_name(keys), "ops", 1, m, ceil.ECHO_UNARY))


async def rss_run(
    config: lib.BenchConfig,
    results: lib.Results,
    cluster: LocalCluster,
    kv: AsyncClient,
    keyspace: int,
    profile: bool,
) -> dict[str, Any]:
    """Sustained single-key puts (overwrites of `keyspace` keys); replica RSS sampled throughout."""
    rand = random.Random(5).randrange
    leader = cluster.leader_of(0) or ""
    pids = {name: cluster.pid(name) for name in cluster.node_names()}

    async def put(i: int) -> None:
        await kv.put(lib.key(rand(keyspace)), lib.VALUE)

    bound = config.max_calls * 100
    print(f"  RSS run: {config.rss_warmup:.0f}s warm-up, then {config.rss_seconds:.0f}s of puts", flush=True)
    recorders = start_profile(config, pids.get(leader)) if profile else []
    await lib.drive(put, concurrency=config.concurrency, max_calls=bound, max_seconds=config.rss_warmup)
    profiles = await finish_profile(recorders)
    if profiles is not None:
        load = f"single-key puts, {config.concurrency} in flight, smart client, 1x3"
        results.sections["profile"] = {"node": leader, "role": "leader", "load": load, **profiles}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in pids}
    writer = asyncio.ensure_future(
        lib.drive(put, concurrency=config.concurrency, max_calls=bound, max_seconds=config.rss_seconds)
    )
    started = time.monotonic()
    while not writer.done():
        for name, pid in pids.items():
            if pid:
                samples[name].append({"t": round(time.monotonic() - started, 1), **lib.memory_kib(pid)})
        await asyncio.wait([writer], timeout=config.rss_interval)
    m = await writer
    results.add(lib.Row("growth", "growth sustained put (RSS run) 1x3 smart", "ops", 1, m, ceil.SYNCOBJ_SET))
    summary = summarize_rss(samples, leader)
    for name, r in summary["replicas"].items():
        print(
            f"  RSS {name}: VmRSS {r['first_kib'] // 1024} -> max {r['max_kib'] // 1024} MB "
            f"({100 * r['max_deviation_from_first']:.0f}% from first), "
            f"RssAnon {r['anon_first_kib'] // 1024} -> max {r['anon_max_kib'] // 1024} MB",
            flush=True,
        )
    return summary


def summarize_rss(samples: dict[str, list[dict[str, float]]], leader: str) -> dict[str, Any]:
    """Per replica: first/min/max VmRSS and the largest deviation from the first sample."""
    replicas = {}
    for name, rows in samples.items():
        rss = [r["VmRSS"] for r in rows if r.get("VmRSS")]
        if not rss:
            continue
        base = rss[0]
        anon = [r["RssAnon"] for r in rows if r.get("RssAnon")] or [0]
        replicas[name] = {
            "first_kib": base,
            "last_kib": rss[-1],
            "min_kib": min(rss),
            "max_kib": max(rss),
            "spread": round((max(rss) - min(rss)) / min(rss), 4),
            "max_deviation_from_first": round(max(abs(x - base) for x in rss) / base, 4),
            "anon_first_kib": rows[0].get("RssAnon"),
            "anon_last_kib": rows[-1].get("RssAnon"),
            "anon_max_kib": max(anon),
            # Anonymous memory alone (heap, the in-memory Raft log): VmRSS also counts resident pages
            # of the mmap'd LMDB file and Raft journal, which grow with the file, not with a leak.
            "anon_max_deviation_from_first": round(max(abs(x - anon[0]) for x in anon) / anon[0], 4)
            if anon[0]
            else None,
            "samples": rows,
        }
    worst = max((r["max_deviation_from_first"] for r in replicas.values()), default=None)
    anon = [
        r["anon_max_deviation_from_first"] for r in replicas.values() if r["anon_max_deviation_from_first"]
    ]
    return {
        "leader": leader,
        "worst_deviation": worst,
        "worst_anon_deviation": max(anon, default=None),
        "replicas": replicas,
    }


# ----- profile (py-spy, if installed) -------------------------------------------------------------


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_profile(config: lib.BenchConfig, pid: int | None) -> list[tuple[str, Any, Path]]:
    """Two py-spy recorders on the leader: `cpu` samples only the thread holding the GIL (where Python
    spends CPU), `wall` every non-idle thread (also shows time blocked in fsync, sends, ...)."""
    binary = py_spy()
    if binary is None or pid is None:
        print("  profile: skipped (py-spy not found; `pip install py-spy` to get one)", flush=True)
        return []
    seconds = max(1, int(min(config.profile_seconds, config.rss_warmup)))
    recorders = []
    for kind, extra in (("cpu", ["--gil"]), ("wall", [])):
        out = config.work / f"profile-{kind}.txt"
        # --nonblocking: sample without pausing the node (it must keep up with its Raft peers).
        cmd = [binary, "record", "--nonblocking", "--threads", "-r", "100", "-d", str(seconds), *extra]
        cmd += ["-f", "raw", "-o", str(out), "-p", str(pid)]
        recorders.append((kind, lib.spawn(cmd, config.work / f"logs/py-spy-{kind}.log"), out))
    return recorders


async def finish_profile(recorders: list[tuple[str, Any, Path]]) -> dict[str, Any] | None:
    found: dict[str, Any] = {}
    for kind, proc, out in recorders:
        deadline = time.monotonic() + 30.0
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        lib.stop(proc)
        if out.exists():
            found[kind] = summarize_profile(out.read_text())
        else:
            print(f"  profile: py-spy ({kind}) wrote nothing (see logs/py-spy-{kind}.log)", flush=True)
    return found or None


# Frames every stack goes through: they say nothing about where the time goes.
_BOILERPLATE = (
    "(threading.py)",
    "(<frozen runpy>)",
    "(kvstore/cli.py)",
    "(kvstore/__main__.py)",
    "(asyncio/runners.py)",
    "(uvloop/__init__.py)",
    "run (kvstore/server/node.py)",
    "_autoTickThread (pysyncobj/syncobj.py)",
)


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': aggregate by function, not by line."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})" if where else func


def summarize_profile(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed stack) output."""
    total = 0
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = ""
        while frames and frames[0].startswith(("thread ", "process ")):
            thread, frames = frames[0], frames[1:]
        total += count
        thread = thread.split(": ", 1)[-1] if thread else "?"
        threads[thread] = threads.get(thread, 0) + count
        names = [_frame_name(f) for f in frames]
        if names:
            own[names[-1]] = own.get(names[-1], 0) + count
        for name in set(names):
            if not name.endswith(_BOILERPLATE):
                inclusive[name] = inclusive.get(name, 0) + count

    def ranked(counts: dict[str, int]) -> list[dict[str, Any]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": k, "samples": v, "share": round(v / total, 4)} for k, v in items]

    return {"samples": total, "threads": ranked(threads), "self": ranked(own), "inclusive": ranked(inclusive)}


# ----- targets -------------------------------------------------------------------------------------


def targets(results: lib.Results) -> list[dict[str, Any]]:
    """The issue's targets, each judged from this run's own numbers (None: not measured)."""
    rate = results.rate_of
    out: list[dict[str, Any]] = []

    def ratio_target(name: str, num: float | None, den: float | None, goal: float, detail: str) -> None:
        value = num / den if num and den else None
        out.append(_target(name, value, goal, value is not None and value >= goal, detail, "x"))

    put = rate(scenario("put", 1, "smart"))
    ratio_target(
        "puts >= 0.7x bare pysyncobj (same concurrency)",
        put,
        rate(ceil.SYNCOBJ_SET),
        0.7,
        f"{scenario('put', 1, 'smart')} / {ceil.SYNCOBJ_SET}",
    )
    if rate(ceil.ETCD_PUT):
        ratio_target(
            "puts >= 1.0x etcd puts",
            put,
            rate(ceil.ETCD_PUT),
            1.0,
            f"{scenario('put', 1, 'smart')} / {ceil.ETCD_PUT}",
        )
    one, peer_one = results.row(PUT_ONE), results.row(ceil.ETCD_PUT_ONE)
    if one and peer_one and one.measurement.calls and peer_one.measurement.calls:
        value = one.measurement.percentile_ms(0.5) / peer_one.measurement.percentile_ms(0.5)
        detail = f"{PUT_ONE} p50 / {ceil.ETCD_PUT_ONE} p50 (both durable: fsync before acknowledging)"
        out.append(_target("put p50 at 1 in flight <= 1.5x etcd's", value, 1.5, value <= 1.5, detail, "x"))
    elif rate(ceil.ETCD_PUT):
        out.append(_target("put p50 at 1 in flight <= 1.5x etcd's", None, 1.5, False, "not measured", "x"))
    for level in ("eventual", "session"):
        ratio_target(
            f"{level} replica reads >= 0.8x unary gRPC echo",
            rate(scenario(f"get {level}", 1, "smart")),
            rate(ceil.ECHO_UNARY),
            0.8,
            f"{scenario(f'get {level}', 1, 'smart')} / {ceil.ECHO_UNARY}",
        )
    # Strong reads under either policy (round robin like the replica reads, or the client's default,
    # all at the leader): the better one counts, and the detail shows both.
    strong = {
        policy: rate(scenario(name, 1, "smart"))
        for policy, name in (("round robin", "get strong"), ("leader", "get strong, leader policy"))
    }
    best = max(strong, key=lambda p: strong[p] or 0.0)
    shown = ", ".join(f"{p}: {v:,.0f}/s" for p, v in strong.items() if v)
    ratio_target(
        "strong reads >= 0.5x replica reads",
        strong[best],
        rate(scenario("get eventual", 1, "smart")),
        0.5,
        f"get strong ({best} policy) / get eventual (round robin), 1x3 smart; strong {shown}",
    )
    for op, goal in (("multi_put 100", 100_000.0), ("multi_get 100 (strong)", 200_000.0)):
        value = rate(scenario(op, 3, "smart"))
        out.append(
            _target(
                f"{op} >= {goal:,.0f} keys/s on 3 shards",
                value,
                goal,
                value is not None and value >= goal,
                scenario(op, 3, "smart"),
                " keys/s",
            )
        )
    growth = results.sections.get("growth", {})
    small = results.row(growth_name(growth.get("small_keys", -1)))
    large = results.row(growth_name(growth.get("large_keys", -1)))
    if small and large and small.measurement.calls and large.measurement.calls:
        value = large.measurement.percentile_ms(0.5) / small.measurement.percentile_ms(0.5)
        detail = f"get p50 @{growth['large_keys']:,} keys / @{growth['small_keys']:,} keys"
        out.append(_target("get p50 at 1M keys <= 1.3x at 10k", value, 1.3, value <= 1.3, detail, "x"))
    else:
        out.append(_target("get p50 at 1M keys <= 1.3x at 10k", None, 1.3, False, "not measured", "x"))
    worst = results.sections.get("rss", {}).get("worst_deviation")
    out.append(
        _target(
            "replica RSS flat within +-20% over the write run",
            worst,
            0.2,
            worst is not None and worst <= 0.2,
            "largest |RSS - first sample| / first sample",
            "",
        )
    )
    return out


def _target(name: str, value: float | None, goal: float, met: bool, detail: str, unit: str) -> dict[str, Any]:
    verdict = "NOT MEASURED" if value is None else ("MET" if met else "NOT MET")
    return {"target": name, "value": value, "goal": goal, "verdict": verdict, "detail": detail, "unit": unit}


def print_targets(found: list[dict[str, Any]]) -> None:
    print("\nTargets (benchmark figures from this one run; noisy on a shared 2-core machine):")
    for t in found:
        value = "-" if t["value"] is None else f"{t['value']:,.3g}{t['unit']}"
        print(f"  [{t['verdict']:^12}] {t['target']}: {value}  ({t['detail']})")


# ----- the run -------------------------------------------------------------------------------------


async def run_section(name: str, results: lib.Results, body: Awaitable[Any]) -> None:
    """One failing section is reported and recorded; the others still run."""
    started = time.monotonic()
    print(f"\n== {name}", flush=True)
    try:
        await body
    except Exception as exc:
        traceback.print_exc()
        results.sections.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        print(f"  {name}: FAILED ({type(exc).__name__}: {exc})", flush=True)
    results.sections.setdefault("timings", {})[name] = round(time.monotonic() - started, 1)


async def run(config: lib.BenchConfig, options: argparse.Namespace) -> dict[str, Any]:
    results = lib.Results()
    only = set(options.only.split(",")) if options.only else set(SECTIONS)
    started = time.time()
    print(f"kvstore bench ({'quick' if config.quick else 'full'}): work dir {config.work}")
    print(
        f"client model: 1 process, grpc.aio + uvloop, {config.concurrency} calls in flight, "
        f"{lib.KEY_BYTES}-byte keys, {len(lib.VALUE)}-byte values, batches of {lib.BATCH}"
    )
    if "ceilings" in only:

        async def ceilings() -> None:
            await asyncio.to_thread(ceil.lmdb_ceilings, config, results)
            await ceil.echo_ceilings(config, results)
            await ceil.syncobj_ceilings(config, results)

        await run_section("ceilings", results, ceilings())
    if "etcd" in only:
        await run_section("etcd peer", results, etcd_section(config, results, options.etcd))
    for shards in (1, 3):
        if f"kv{shards}" in only:
            await run_section(f"kvstore {shards}x3", results, kvstore_suite(config, results, shards))
    if "growth" in only:
        await run_section("growth", results, growth(config, results, options.profile))
    return build_document(config, results, started)


def code_version() -> dict[str, Any]:
    """Which commit was measured, and whether kvstore/ had uncommitted changes."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    return {
        "commit": commit or None,
        "dirty": bool(git("status", "--porcelain", "--", "kvstore")) if commit else None,
    }


def build_document(config: lib.BenchConfig, results: lib.Results, started: float) -> dict[str, Any]:
    """Everything one run measured, as the JSON written to --out."""
    return {
        "schema": "kvstore-bench/1",
        "code": code_version(),
        "mode": "quick" if config.quick else "full",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "machine": lib.machine(),
        "client_model": {
            "processes": 1,
            "runtime": "grpc.aio + uvloop",
            "in_flight": config.concurrency,
            "key_bytes": lib.KEY_BYTES,
            "value_bytes": len(lib.VALUE),
            "batch_keys": lib.BATCH,
            "read_policy": READ_POLICY.value,
        },
        "config": config.as_dict(),
        "rows": results.as_dicts(),
        "targets": targets(results),
        "table_markdown": results.table(),
        **results.sections,
    }


async def etcd_section(config: lib.BenchConfig, results: lib.Results, wanted: bool) -> None:
    if not wanted:
        print("  etcd: not requested (run with --etcd to compare against a 3-member etcd cluster)")
        results.sections["etcd"] = {"status": "not requested"}
        return
    binary = shutil.which("etcd")
    if binary is None:
        print(f"  etcd: skipped (no etcd binary; {ETCD_INSTALL_HINT})")
        results.sections["etcd"] = {"status": "skipped", "reason": "no etcd binary on PATH"}
        return
    try:
        info = await ceil.etcd_peer(config, results, binary)
    except Exception as exc:
        print(f"  etcd: skipped ({type(exc).__name__}: {exc})")
        results.sections["etcd"] = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
        return
    results.sections["etcd"] = {"status": "ran", **info}


def print_profile(profile: dict[str, Any] | None) -> None:
    if not profile:
        return
    print(f"\nProfile of the leader ({profile['node']}) under {profile['load']}:")
    for kind in ("cpu", "wall"):
        if kind not in profile:
            continue
        p = profile[kind]
        print(
            f"  {kind} ({p['samples']} samples; {'GIL holder only' if kind == 'cpu' else 'non-idle threads'})"
        )
        for label in ("threads", "self", "inclusive"):
            entries = ", ".join(f"{100 * e['share']:.1f}% {e['function']}" for e in p[label][:8])
            print(f"    {label}: {entries}")


def main(args: argparse.Namespace) -> int:
    import uvloop

    options = argparse.Namespace(
        quick=bool(getattr(args, "quick", False)),
        etcd=bool(getattr(args, "etcd", False)),
        out=getattr(args, "out", None) or "results/bench.json",
        concurrency=getattr(args, "concurrency", None),
        only=getattr(args, "only", None),
        profile=not getattr(args, "no_profile", False),
        keep=bool(getattr(args, "keep", False)),
    )
    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-"))
    config = lib.BenchConfig.make(options.quick, work, options.concurrency)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    failed = True
    # SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C: the running scenario is cancelled
    # and its `finally` blocks stop every cluster and process it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        document = uvloop.run(run(config, options))
        print("\n" + document["table_markdown"])
        print_targets(document["targets"])
        print_profile(document.get("profile"))
        out = lib.write_json(options.out, document)
        out.with_suffix(".md").write_text(document["table_markdown"] + "\n")
        print(f"\nwrote {out} (and {out.with_suffix('.md')}) in {document['duration_seconds']:.0f}s")
        failed = bool(document.get("errors"))
    finally:
        if options.keep or failed:
            print(f"work dir kept for inspection: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--etcd", action="store_true")
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--concurrency", type=int, default=None, help="calls in flight (default 64)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--no-profile", action="store_true", help="do not run py-spy on the leader")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(_parse()))
