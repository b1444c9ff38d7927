"""`kvstore chaos`: a cluster behind fault proxies, concurrent clients recording a history, nemeses
injected at random times, then every checker over the history.

The run, in order:
1. start a cluster whose replicas advertise fault proxies (kvstore.chaos.proxy) for their Raft ports;
2. start the workload: per shard, a few strong clients (put/get/delete/CAS on a handful of keys
   with unique values, one request in flight each), a session client and a bounded-staleness
   reader, each recording every op with call/return times (`time.monotonic_ns()`); timeouts and
   lost connections are recorded as outcome unknown;
3. inject faults chosen from the nemeses (SIGKILL + restart, SIGSTOP/SIGCONT, partitions, link
   delay) at seeded random times, healing each after a while; with `power_cuts`, every other
   fault is a power cut (kvstore.chaos.power), often while the fault before it still holds;
4. heal everything, stop the workload, read every key strongly, wait for replicas to converge;
5. check: linearizability of strong ops, session guarantees, bounded staleness, no acknowledged
   write lost, convergence (same applied index and same data on every replica of a shard), and
   write the report (kvstore.chaos.report).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.chaos import checker
from kvstore.chaos.convergence import wait_converged
from kvstore.chaos.history import History, Op
from kvstore.chaos.power import CUT_KINDS, CutPlanner, PowerSupply
from kvstore.chaos.proxy import ProxyCluster
from kvstore.chaos.report import ChaosReport, outcomes, write_report
from kvstore.chaos.reshard import Resharder
from kvstore.client.core import Consistency, ReadPolicy
from kvstore.client.sync import Client
from kvstore.cluster.local import LocalCluster
from kvstore.config import RaftSettings, ServerSettings, StorageSettings
from kvstore.proto import kvstore_pb2 as pb

NEMESES = ("kill", "pause", "partition", "delay")
# Not in the default set: `reshard` (kvstore/chaos/reshard.py) moves slots all through the run,
# beside whichever of the others are chosen; its cluster has a metadata group.
ALL_NEMESES = (*NEMESES, "reshard")
BOUND_SECONDS = 1.0


@dataclass
class ChaosOptions:
    shards: int = 2
    replicas: int = 3
    duration: float = 60.0
    nemeses: tuple[str, ...] = NEMESES
    seed: int = 1
    out: Path = Path("results/chaos")
    strong_clients_per_shard: int = 3
    keys_per_shard: int = 4
    op_timeout: float = 3.0
    fault_gap: tuple[float, float] = (2.0, 5.0)  # quiet time before each fault
    fault_length: tuple[float, float] = (1.5, 4.0)
    leader_bias: float = 0.6  # chance that kill/pause/partition picks a shard leader as its victim
    # How long a cut-off leader keeps believing it leads (pysyncobj's own default is 30 s).
    leader_fallback_timeout: float = 2.5
    unsafe_local_strong_reads: bool = False  # the planted bug (see ServerSettings)
    storage: StorageSettings | None = None  # durability "none": a control run, which must lose
    # Power cuts (kvstore.chaos.power): with power_cuts > 0 (and a power supply, which puts the
    # data directories on storage that can lose power), faults alternate between a nemesis and a
    # cut, and the run ends after that many cuts (or at `duration`, whichever comes first).
    power: PowerSupply | None = None
    power_cuts: int = 0
    cut_kinds: tuple[str, ...] = CUT_KINDS
    power_off: tuple[float, float] = (0.2, 1.5)  # how long the cut replicas stay down
    overlap: float = 0.5  # chance that a cut falls while the nemesis before it still holds
    torn_cuts: bool = False  # each unsynced block survives a cut or not (seeded)
    progress: Callable[[str], None] | None = None  # told of each fault as it is injected


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float = 0.0
    dropped: int = 0  # a power cut: bytes its victims' disks never received


class ChaosRun:
    def __init__(self, options: ChaosOptions) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.history = History()
        self.faults: list[Fault] = []
        self.stop = threading.Event()
        self.proxies: ProxyCluster | None = None
        self.cluster: LocalCluster | None = None
        self.t0 = time.monotonic()
        self.fault_phase = options.duration  # what it lasted (a run with power cuts ends sooner)
        self.resharding = "reshard" in options.nemeses
        self.faulting = tuple(n for n in options.nemeses if n != "reshard")  # struck one at a time
        self.resharder: Resharder | None = None

    # ----- setup ---------------------------------------------------------------------------

    def _start_cluster(self) -> LocalCluster:
        cluster_dir = self.o.out / "cluster"
        shutil.rmtree(cluster_dir, ignore_errors=True)
        cluster = LocalCluster(cluster_dir)

        def via_proxies(binds: dict[str, str]) -> dict[str, str]:
            for _ in range(10):
                # create() wrote the shards' secrets already: the proxies read who dials with them.
                proxies = ProxyCluster(binds, secret_files=cluster.secret_files)
                addresses = proxies.start()
                if not {int(a.rsplit(":", 1)[1]) for a in addresses.values()} & cluster.reserved_ports:
                    self.proxies = proxies
                    return addresses
                proxies.stop()  # a proxy took a port a node is about to bind: try again
            raise RuntimeError("could not place fault proxies away from the nodes' ports")

        cluster.create(
            shards=self.o.shards,
            replicas=self.o.replicas,
            meta_replicas=3 if self.resharding else 0,
            raft=RaftSettings(
                min_timeout=0.8,
                max_timeout=1.6,
                leader_fallback_timeout=self.o.leader_fallback_timeout,
                connection_retry=0.3,
            ),
            server=ServerSettings(unsafe_local_strong_reads=self.o.unsafe_local_strong_reads),
            advertise_for=via_proxies,
            storage=self.o.storage,
        )
        self.cluster = cluster
        if self.o.power is not None:
            self.o.power.attach(cluster)
        cluster.start_all()
        cluster.wait_for_leaders(60)
        return cluster

    def _keys(self, cluster: LocalCluster) -> dict[int, list[bytes]]:
        """A few keys per shard (found by probing the slot table), so every shard sees contention."""
        ring = cluster.cluster_map().slots
        keys: dict[int, list[bytes]] = {s: [] for s in range(self.o.shards)}
        for i in range(100_000):
            key = b"chaos:%d" % i
            shard = ring.shard_for(key)
            if len(keys[shard]) < self.o.keys_per_shard:
                keys[shard].append(key)
            if all(len(v) == self.o.keys_per_shard for v in keys.values()):
                break
        return keys

    # ----- run -----------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        if self.o.power_cuts and self.o.power is None:
            raise ValueError("power cuts need a power supply (kvstore.chaos.power.PowerSupply)")
        self.o.out.mkdir(parents=True, exist_ok=True)
        try:
            cluster = self._start_cluster()
            keys = self._keys(cluster)
            threads = self._start_workload(cluster, keys)
            started = time.monotonic()
            if self.resharding:
                every_key = [k for shard_keys in keys.values() for k in shard_keys]
                self.resharder = Resharder(cluster, every_key, self.rng, self._record)
                self.resharder.start()
            self._nemesis_loop(cluster, started + self.o.duration)
            self.fault_phase = time.monotonic() - started
            self._heal_all(cluster)
            if self.resharder is not None:
                self.resharder.stop()  # every move it began is done before the final reads
            time.sleep(2.0)  # let the workload see the healed cluster
            self.stop.set()
            for t in threads:
                t.join(self.o.op_timeout * 5)
            final = self._final_reads(cluster, keys)
            convergence = wait_converged(cluster)
            return self._check(final, convergence)
        finally:
            self.stop.set()
            if self.cluster is not None:
                self.cluster.down()
            if self.proxies is not None:
                self.proxies.stop()
            if self.o.power is not None:
                self.o.power.detach()

    def _start_workload(self, cluster: LocalCluster, keys: dict[int, list[bytes]]) -> list[threading.Thread]:
        threads = []
        client_id = 0
        for shard, shard_keys in keys.items():
            roles = ["strong"] * self.o.strong_clients_per_shard
            # The session and bounded checks compare revisions, which grow per key only while the
            # key stays in one shard's log: not across a move (checker.py). Strong ops are checked
            # by value (linearizability), which holds across moves.
            roles += [] if self.resharding else ["session", "bounded"]
            for role in roles:
                seed = self.rng.randrange(1 << 30)
                t = threading.Thread(
                    target=self._client_loop, args=(client_id, role, shard, shard_keys, seed), daemon=True
                )
                threads.append(t)
                client_id += 1
        for t in threads:
            t.start()
        return threads

    def _client_loop(self, client_id: int, role: str, shard: int, keys: list[bytes], seed: int) -> None:
        rng = random.Random(seed)
        consistency = {
            "strong": Consistency.STRONG,
            "session": Consistency.SESSION,
            "bounded": Consistency.bounded(BOUND_SECONDS),
        }[role]
        policy = ReadPolicy.FOLLOWERS_ONLY if role == "bounded" else ReadPolicy.ROUND_ROBIN
        assert self.cluster is not None
        kv = Client.from_cluster(
            self.cluster.dir, timeout=self.o.op_timeout, consistency=consistency, read_policy=policy
        )
        seen: dict[bytes, tuple[str | None, int]] = {}  # key -> last (value, revision) this client saw
        seq = 0
        try:
            while not self.stop.is_set():
                key = rng.choice(keys)
                seq += 1
                value = f"c{client_id}-{seq}"
                roll = rng.random()
                if role == "bounded" or roll < 0.45:
                    kind = "get"
                elif roll < 0.75 or role == "session":
                    kind = "put"
                elif roll < 0.85:
                    kind = "delete"
                elif self.resharding:
                    # A moved key takes the target's revisions, so a compare-and-set against a
                    # revision read before a move fails though nobody wrote: safe, but outside
                    # the value register the checker models (docs/architecture.md, "Moving slots").
                    kind = "put"
                else:
                    kind = "cas"
                self.history.append(self._one_op(kv, client_id, role, shard, kind, key, value, seen))
        finally:
            kv.close()

    def _one_op(
        self,
        kv: Client,
        client_id: int,
        role: str,
        shard: int,
        kind: str,
        key: bytes,
        value: str,
        seen: dict[bytes, tuple[str | None, int]],
    ) -> Op:
        k = key.decode()
        expected, expected_revision = seen.get(key, (None, 0))
        op = Op(
            client=client_id,
            kind=kind,
            key=k,
            value=value if kind in ("put", "cas") else None,
            expected=expected if kind == "cas" else None,
            ok=None,
            call=time.monotonic_ns(),
            ret=None,
            consistency=role,
            shard=shard,
            session=f"client-{client_id}" if role == "session" else "",
            staleness_bound=BOUND_SECONDS if role == "bounded" else 0.0,
        )
        try:
            if kind == "get":
                item = kv.get_item(key)
                op.value = item.value.decode() if item else None
                op.revision = item.revision if item else 0
                seen[key] = (op.value, op.revision)
            elif kind == "put":
                op.revision = kv.put(key, value.encode())
                seen[key] = (value, op.revision)
            elif kind == "delete":
                response = kv.send(pb.DeleteRequest(keys=[key]))  # the delete's revision too
                op.revision = response.header.revision
                seen[key] = (None, 0)
            else:
                result = kv.compare_and_set(key, value.encode(), expected_revision=expected_revision)
                if not result.succeeded:
                    op.ok, op.ret = False, time.monotonic_ns()
                    current = result.current
                    seen[key] = (current.value.decode(), current.revision) if current else (None, 0)
                    return op
                op.revision = result.revision
                seen[key] = (value, op.revision)
            op.ok, op.ret = True, time.monotonic_ns()
        except (errors.UnknownOutcome, errors.SessionExpired) as err:
            # SessionExpired: this attempt applied nothing, but an earlier attempt may have.
            op.ok, op.ret, op.error = None, None, _describe(err)
        except errors.KvError as err:
            # A read that failed says nothing; a write that failed cleanly did not take effect.
            op.error = _describe(err)
            if kind == "get":
                op.ok, op.ret = None, None
            else:
                op.ok, op.ret = False, time.monotonic_ns()
        return op

    # ----- nemeses -------------------------------------------------------------------------

    def _nemesis_loop(self, cluster: LocalCluster, until: float) -> None:
        if self.o.power_cuts:
            self._power_loop(cluster, until)
            return
        while True:
            gap = self.rng.uniform(*self.o.fault_gap)
            length = self.rng.uniform(*self.o.fault_length)
            if time.monotonic() + gap + length + 1.0 > until or not self.faulting:
                break
            time.sleep(gap)
            kind = self.rng.choice(self.faulting)
            fault = self._inject(cluster, kind)
            time.sleep(length)
            self._heal(cluster, fault)
        time.sleep(max(0.0, until - time.monotonic()))

    def _power_loop(self, cluster: LocalCluster, until: float) -> None:
        """A nemesis, then a power cut (with probability `overlap` while that nemesis still holds,
        healed after the cut's restart), until `power_cuts` cuts are done or `until`."""
        planner = CutPlanner(self.rng, self.o.cut_kinds, self.o.leader_bias)
        cuts = 0
        while cuts < self.o.power_cuts and time.monotonic() < until:
            held = None
            if self.faulting:
                time.sleep(self.rng.uniform(*self.o.fault_gap))
                held = self._inject(cluster, self.rng.choice(self.faulting))
                time.sleep(self.rng.uniform(*self.o.fault_length))
                if self.rng.random() >= self.o.overlap:
                    self._heal(cluster, held)
                    held = None
            time.sleep(self.rng.uniform(*self.o.fault_gap) / (2 if held else 1))
            self._power_cut(cluster, planner)
            cuts += 1
            if held is not None:
                time.sleep(self.rng.uniform(*self.o.fault_length) / 2)
                self._heal(cluster, held)
        time.sleep(min(self.o.fault_gap[1], max(0.0, until - time.monotonic())))

    def _power_cut(self, cluster: LocalCluster, planner: CutPlanner) -> None:
        """Cut the power of a set of replicas at once, keep it off a moment, restart them."""
        assert self.o.power is not None
        kind = planner.next_kind()
        names = planner.victims(cluster, kind)
        torn_seed = self.rng.randrange(1 << 30) if self.o.torn_cuts else None
        fault = Fault(f"powercut-{kind}", ",".join(names), time.monotonic() - self.t0)
        self.faults.append(fault)
        fault.dropped = self.o.power.cut(names, torn_seed)
        self._note(fault, f" (dropped {fault.dropped} unsynced bytes)")
        time.sleep(self.rng.uniform(*self.o.power_off))
        for name in names:
            if cluster.pid(name) is None:  # a node killed by a nemesis that still holds: back too
                cluster.start(name)
        fault.end = time.monotonic() - self.t0

    def _victim(self, cluster: LocalCluster, prefer_leader: bool) -> str:
        meta = [r.name for r in cluster.cluster_map().meta]
        if meta and self.rng.random() < 0.25:  # the metadata group, mid-move
            return self.rng.choice(meta)
        shard = self.rng.randrange(self.o.shards)
        replicas = [r.name for r in cluster.cluster_map().shard(shard).replicas]
        if prefer_leader and self.rng.random() < self.o.leader_bias:
            leader = cluster.leader_of(shard)
            if leader:
                return leader
        return self.rng.choice(replicas)

    def _inject(self, cluster: LocalCluster, kind: str) -> Fault:
        assert self.proxies is not None
        now = time.monotonic() - self.t0
        if kind == "kill":
            victim = self._victim(cluster, prefer_leader=True)
            cluster.kill(victim, "KILL")
        elif kind == "pause":
            victim = self._victim(cluster, prefer_leader=True)
            cluster.kill(victim, "STOP")
        elif kind == "partition":
            victim = self._victim(cluster, prefer_leader=True)
            if cluster.cluster_map().is_meta_replica(victim):  # not behind a proxy: a pause cuts it off
                kind = "pause"
                cluster.kill(victim, "STOP")
            else:
                self.proxies.controller.isolate(victim)
        elif kind == "delay":
            victim = "*"
            self.proxies.controller.delay(None, None, self.rng.uniform(0.05, 0.2))
        else:
            raise ValueError(f"unknown nemesis {kind!r} (choose from {', '.join(NEMESES)})")
        fault = Fault(kind, victim, now)
        self.faults.append(fault)
        self._note(fault)
        return fault

    def _record(self, kind: str, target: str, start: float, end: float) -> None:
        """A fault that happened on its own thread (a slot move), logged as it ended."""
        fault = Fault(kind, target, start - self.t0, end - self.t0)
        self.faults.append(fault)
        self._note(fault)

    def _note(self, fault: Fault, detail: str = "") -> None:
        if self.o.progress is not None:
            self.o.progress(f"{fault.start:7.1f} s  {fault.kind} {fault.target}{detail}")

    def _heal(self, cluster: LocalCluster, fault: Fault) -> None:
        assert self.proxies is not None
        if fault.kind == "kill":
            if cluster.pid(fault.target) is None:  # a power cut since may have restarted it
                cluster.start(fault.target)
        elif fault.kind == "pause":
            with contextlib.suppress(RuntimeError):  # a power cut since killed it (and restarted it)
                cluster.kill(fault.target, "CONT")
        else:
            self.proxies.controller.heal()
        fault.end = time.monotonic() - self.t0

    def _heal_all(self, cluster: LocalCluster) -> None:
        assert self.proxies is not None
        self.proxies.controller.heal()
        for name in cluster.all_node_names():
            pid = cluster.pid(name)
            if pid is None:
                cluster.start(name)
            else:
                with contextlib.suppress(RuntimeError):
                    cluster.kill(name, "CONT")
        cluster.wait_for_leaders(60)

    # ----- after the run -------------------------------------------------------------------

    def _final_reads(self, cluster: LocalCluster, keys: dict[int, list[bytes]]) -> dict[str, str | None]:
        final: dict[str, str | None] = {}
        with Client.from_cluster(cluster.dir, timeout=30.0) as kv:
            for shard_keys in keys.values():
                for key in shard_keys:
                    got = kv.get(key)
                    final[key.decode()] = got.decode() if got is not None else None
        return final

    def _check(self, final: dict[str, str | None], convergence: dict[str, Any]) -> ChaosReport:
        ops = list(self.history)
        lin = checker.check_linearizable(ops, timeout_s=60.0)
        anomalies = lin.anomalies()
        anomalies += checker.check_sessions(ops)
        anomalies += checker.check_bounded(ops)
        lost = checker.check_no_lost_writes(final, ops, timeout_s=60.0)
        anomalies += lost
        if not convergence["converged"]:
            anomalies.append(checker.Anomaly("divergence", "*", json.dumps(convergence["replicas"])))
        report = ChaosReport(
            seed=self.o.seed,
            duration=self.fault_phase,
            ops_recorded=len(ops),
            ops_checked=lin.checked,
            indeterminate=sum(1 for op in ops if op.ok is None and op.kind != "get"),
            faults=dict(Counter(f.kind for f in self.faults)),
            anomalies=checker.summarize(anomalies),
            lost_writes=sum(1 for a in lost if a.kind == "lost-write"),
            converged=convergence["converged"],
            convergence=convergence,
            linearizable=lin.ok,
            explanation=lin.explanation if not lin.ok else "",
            fault_log=[asdict(f) for f in self.faults],
            outcomes=outcomes(ops),
            elapsed=time.monotonic() - self.t0,
        )
        write_report(self.o.out, report, self.history, anomalies)
        return report


def _describe(err: errors.KvError) -> str:
    """What a failed op's history line says of its error (which the checkers trust as given)."""
    return f"{type(err).__name__}{'' if err.from_server else ' (transport)'}: {err}"[:300]
