"""The full power-loss cycle: writes under load, a power cut on every replica of a shard at once,
a restart, more writes; then every acknowledged write must be readable and the replicas equal.

Used by test_power_cut.py (which asserts nothing was lost) and runnable alone for several rounds,
printing what each one lost:

    .venv/bin/python -m tests.powerloss.cycle --rounds 3 --cuts 3
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvstore import Client
from kvstore.chaos.checker import check_linearizable
from kvstore.chaos.history import Op
from kvstore.config import StorageSettings
from tests.conftest import client
from tests.support.power_cluster import (
    PoweredCluster,
    cluster_on_powerloss_fs,
    eventual_get,
    replica_status,
    wait_applied_equal,
    write_under_load,
)


@dataclass
class CycleResult:
    cuts: int = 0
    acked: int = 0
    unknown: int = 0
    bytes_dropped: int = 0
    lost: list[bytes] = field(default_factory=list)  # acknowledged, then not readable
    wrong: list[bytes] = field(default_factory=list)  # readable, with another value
    diverged: dict[str, int] = field(default_factory=dict)  # replica -> keys unlike the majority
    applied: dict[str, int] = field(default_factory=dict)  # replica -> applied index at the end
    problems: list[str] = field(default_factory=list)  # no leader, no convergence, ...
    not_linearizable: list[str] = field(default_factory=list)  # keys the checker refutes
    history: list[Op] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.diverged or self.problems or self.not_linearizable)

    def summary(self) -> str:
        return (
            f"cuts={self.cuts} acked={self.acked} unknown={self.unknown} "
            f"dropped={self.bytes_dropped}B lost={len(self.lost)} wrong={len(self.wrong)} "
            f"diverged={self.diverged or 0} applied={self.applied} problems={self.problems or 0} "
            f"not_linearizable={len(self.not_linearizable)}"
            + (f" e.g. lost {self.lost[:3]}" if self.lost else "")
        )


def _load_then_cut(
    powered: PoweredCluster, kv: Client, prefix: bytes, result: CycleResult, torn_seed: int | None
) -> dict[bytes, bytes]:
    """Writers run; once some writes are acknowledged, every replica of shard 0 loses power."""
    names = powered.replicas_of(0)
    acked: dict[bytes, bytes] = {}
    outcome: dict[str, object] = {}
    stop = threading.Event()

    def load() -> None:
        outcome["acked"], outcome["unknown"] = write_under_load(
            kv, prefix, 3_000, 20, stop=stop, history=result.history
        )

    writer = threading.Thread(target=load)
    writer.start()
    try:
        # Cut mid-load, after about 2 s of writes: whatever is in flight then has no promise.
        started = time.monotonic()
        while writer.is_alive() and time.monotonic() - started < 2.0:
            time.sleep(0.1)
        reports = powered.power_cut(names, torn_seed)
    finally:
        stop.set()
        writer.join(60)
    acked.update(outcome.get("acked", {}))  # type: ignore[arg-type]
    result.unknown += int(outcome.get("unknown", 0))  # type: ignore[arg-type]
    result.bytes_dropped += sum(r.bytes_dropped for r in reports.values())
    result.cuts += 1
    return acked


def run_cycle(
    directory: Path, cuts: int = 3, torn_seed: int | None = None, durability: str = "fsync"
) -> CycleResult:
    """One cluster (1 x 3), `cuts` rounds of load + power cut + restart, then a final write phase
    and the checks. Bounded: about 30 s per cut plus the checks. `torn_seed`: torn cuts (each
    unsynced block survives or not at random, repeatably). `durability`: the nodes'
    storage.durability ("none": the control, which must lose writes)."""
    result = CycleResult()
    acked: dict[bytes, bytes] = {}
    storage = StorageSettings(durability=durability)
    with cluster_on_powerloss_fs(directory, storage=storage) as powered:
        cluster, names = powered.cluster, powered.replicas_of(0)
        for cut in range(cuts):
            with client(cluster, timeout=5.0) as kv:
                seed = None if torn_seed is None else torn_seed + 100 * cut
                acked.update(_load_then_cut(powered, kv, b"cut%d:" % cut, result, seed))
            cluster.start_all()
            try:
                cluster.wait_for_leaders(30)
            except TimeoutError as err:
                result.problems.append(f"after cut {cut + 1}: {err}")
                break
        else:
            # Writes after the last restart: new entries take log indexes that replicas whose
            # store is ahead of their (lost) log would skip.
            with client(cluster, timeout=5.0) as kv:
                after, unknown = write_under_load(
                    kv, b"after:", count=300, seconds=20, history=result.history
                )
            acked.update(after)
            result.unknown += unknown
        result.acked = len(acked)
        _check(powered, names, acked, result)
    return result


def _check(powered: PoweredCluster, names: list[str], acked: dict[bytes, bytes], result: CycleResult) -> None:
    try:
        wait_applied_equal(powered, names, timeout=30)
    except TimeoutError as err:
        result.problems.append(str(err))
    for name in names:
        status = replica_status(powered.address(name))
        result.applied[name] = status.applied_index if status else -1
        if status is None:  # down: say why, from its log (the run's directory goes away)
            log = powered.cluster.log_path(name)
            tail = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
            result.problems.append(f"{name} is down; its log ends: {' | '.join(tail)}")
    keys = sorted(acked)
    seen: dict[str, dict[bytes, bytes | None]] = {}
    for name in names:
        try:
            seen[name] = eventual_get(powered.address(name), keys)
        except Exception as err:  # a replica that does not answer is a finding, not a crash
            result.problems.append(f"{name} does not serve reads: {err}")
    if not seen:
        return
    for key in keys:
        values = [seen[n][key] for n in seen]
        majority = max(set(values), key=values.count)
        for name in seen:
            if seen[name][key] != majority:
                result.diverged[name] = result.diverged.get(name, 0) + 1
        if majority is None:
            result.lost.append(key)
        elif majority != acked[key]:
            result.wrong.append(key)
    _check_history(powered, result)
    digests = {n: hashlib.sha256(repr(sorted(seen[n].items())).encode()).hexdigest()[:12] for n in seen}
    print(f"replica digests over the acknowledged keys: {digests}")


def _check_history(powered: PoweredCluster, result: CycleResult) -> None:
    """Strong reads of every key written (acknowledged or not), then the linearizability checker
    over the whole history: with one write per key, a read must show an acknowledged write, and
    may show an unknown one."""
    keys = sorted({op.key for op in result.history})
    try:
        with client(powered.cluster, timeout=10.0) as kv:
            for start in range(0, len(keys), 200):
                chunk = keys[start : start + 200]
                call = time.monotonic_ns()
                got = kv.multi_get([k.encode() for k in chunk])
                ret = time.monotonic_ns()
                for key in chunk:
                    value = got.get(key.encode())
                    read = value.decode() if value is not None else None
                    result.history.append(Op(-1, "get", key, read, None, True, call, ret))
    except Exception as err:  # no leader to read from is a finding, not a crash
        result.problems.append(f"strong reads failed: {err}")
        return
    verdict = check_linearizable(result.history, timeout_s=30)
    result.not_linearizable = list(verdict.failed_keys)
    if verdict.timed_out:
        result.problems.append("the linearizability check ran out of time")


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh clusters, one after another")
    parser.add_argument("--cuts", type=int, default=3, help="power cuts per cluster")
    parser.add_argument(
        "--torn", type=int, metavar="SEED", help="torn cuts: keep a random part of unsynced blocks"
    )
    parser.add_argument(
        "--durability", choices=("fsync", "none"), default="fsync", help='"none": the control run'
    )
    args = parser.parse_args()
    failed = 0
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="powerloss-") as tmp:
            torn = None if args.torn is None else args.torn + 1000 * round_
            result = run_cycle(Path(tmp) / "c", cuts=args.cuts, torn_seed=torn, durability=args.durability)
        failed += not result.ok
        print(f"round {round_ + 1}: {'OK' if result.ok else 'LOSS'} {result.summary()}", flush=True)
    print(f"{failed} of {args.rounds} rounds lost acknowledged writes or diverged")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
