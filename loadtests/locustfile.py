"""Locust load test for kvstore: drives a cluster through the SDK and reports every call to Locust.

    locust -f loadtests/locustfile.py --host .kvstore/demo --web-host 127.0.0.1   # web UI on :8089
    locust -f loadtests/locustfile.py --host router://127.0.0.1:7400 \\
        --headless -u 24 -r 24 -t 60s --csv results/run --html results/run.html

--host is a cluster directory (smart client: map read from DIR/cluster.json), `router://ADDR` or a
bare `HOST:PORT` (thin client through a router), or `nodes://A,B,C` (smart client, map fetched
from any of those nodes). Every call is reported as request_type "<op>:<consistency>" (get:strong,
get:session, put:strong, ...), name "<op>", with the key's shard in the request context.

Workload knobs (--kv-*, also in the web UI's start form) are described in loadtests/README.md.
Two extras that need a cluster directory as --host: a fault schedule (--kv-kill-leader-at/
--kv-restart-after/--kv-kill-shard) and a JSON report (--kv-report) with per-second and per-shard
counts and what each fault cost. Both run in local (single-process) mode only.
"""

from __future__ import annotations

# Locust patches the standard library for gevent when it is imported; grpc must then be told to
# use gevent too, before any channel exists, or every user blocks the others inside a gRPC call.
from gevent import monkey

monkey.patch_all()

import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import argparse  # noqa: E402
import bisect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import locust.stats  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402
from locust.event import EventHook  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import LocalRunner, WorkerRunner  # noqa: E402

from kvstore import Client, Consistency, ReadPolicy  # noqa: E402
from kvstore.client.core import ReadConsistency  # noqa: E402
from kvstore.cluster.local import LocalCluster  # noqa: E402

log = logging.getLogger("kvstore.locust")

# Flush --csv files every second (Locust's default is 10 s) so a progress line can follow them.
locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1

WRITE_OPS = ("put", "put_many")

# Fired once per fault cycle with `record=` (the dict also written to --kv-report under "faults").
events.kv_fault = EventHook()  # type: ignore[attr-defined]


# ----- command line (also shown in the web UI) --------------------------------------------------


def parse_mix(text: str) -> list[tuple[str, ReadConsistency, float]]:
    """'strong=1,session=2,bounded:0.5s=1' -> [(label, level, weight)]: LEVEL[=WEIGHT], comma-separated.

    LEVEL is any form `Consistency.parse` accepts (strong, session, eventual, bounded:0.5s, ...)
    and the label is `str(level)`, the one spelling the CLI and the SDK print (`bounded:0.5s`).
    `=` separates the weight because a level may itself hold a colon. A missing weight is 1."""
    mix = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, has_weight, weight_text = part.partition("=")
        try:
            level = Consistency.parse(name)
        except ValueError as err:
            raise ValueError(f"consistency mix {text!r}: {err}; {MIX_SYNTAX}") from None
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"consistency mix {text!r}: bad weight in {part!r}; {MIX_SYNTAX}")
        mix.append((str(level), level, weight))
    if not mix or sum(w for *_, w in mix) <= 0:
        raise ValueError(f"consistency mix {text!r}: no level with a positive weight; {MIX_SYNTAX}")
    return mix


MIX_SYNTAX = "write LEVEL=WEIGHT pairs, e.g. strong=1,session=1,eventual=1,bounded:0.5s=1"


def _mix_option(text: str) -> str:
    """argparse type: a bad mix is a usage error at start-up, not an exception in every user."""
    try:
        parse_mix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text  # kept a string: the web UI edits options as text and converts by the default's type


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    """Locust's documented registration: `parser` is Locust's own parser, whose `add_argument`
    takes `include_in_web_ui` (an argparse group's `add_argument` does not, and the options would
    not reach the web UI). Web UI edits arrive in `environment.parsed_options`, converted to the
    type of each option's default, so every default below has the option's type."""

    def option(*args: Any, **kwargs: Any) -> None:
        parser.add_argument(*args, include_in_web_ui=True, **kwargs)

    option("--kv-read-ratio", type=float, default=0.8, help="share of operations that read")
    option(
        "--kv-consistency-mix",
        type=_mix_option,
        default="strong=1",
        help="read levels and weights, LEVEL=WEIGHT: e.g. strong=1,session=1,eventual=1,bounded:0.5s=1",
    )
    option("--kv-keyspace", type=int, default=10_000, help="number of distinct keys")
    option("--kv-distribution", default="uniform", choices=["uniform", "zipf"], help="key popularity")
    option("--kv-zipf-s", type=float, default=1.1, help="Zipf exponent (hotter when larger)")
    option("--kv-value-size", type=int, default=100, help="bytes per value")
    option("--kv-batch-size", type=int, default=1, help="keys per operation (>1: multi_get / put_many)")
    option(
        "--kv-read-policy",
        default="leader",
        choices=[p.value for p in ReadPolicy],
        help="which replica serves reads that need not go to the leader",
    )
    option("--kv-timeout", type=float, default=10.0, help="client deadline per operation (s)")
    option("--kv-think-time", type=float, default=0.0, help="pause between operations (s)")
    option("--kv-preload", action="store_true", default=False, help="write every key once before the test")
    option("--kv-shape", default="none", choices=["none", *SHAPES], help="load shape")
    option("--kv-kill-leader-at", type=float, default=-1.0, help="SIGKILL a shard leader at T s (-1: never)")
    option("--kv-restart-after", type=float, default=5.0, help="restart it D s after the kill")
    option("--kv-kill-shard", type=int, default=0, help="the shard whose leader is killed")
    option("--kv-report", default="", help="write a JSON report here (local mode)")


# ----- workload ------------------------------------------------------------------------------


class KeyChooser:
    """Key ids in [0, keyspace): uniform, or Zipfian (rank i has weight 1/(i+1)^s)."""

    def __init__(self, keyspace: int, distribution: str, s: float) -> None:
        self.keyspace = max(1, keyspace)
        self.cdf: list[float] = []
        if distribution == "zipf":
            total = 0.0
            for i in range(self.keyspace):
                total += 1.0 / (i + 1) ** s
                self.cdf.append(total)

    def one(self) -> int:
        if not self.cdf:
            return random.randrange(self.keyspace)
        return min(bisect.bisect_left(self.cdf, random.random() * self.cdf[-1]), self.keyspace - 1)

    def many(self, count: int) -> list[int]:
        count = min(count, self.keyspace)
        if not self.cdf:
            return random.sample(range(self.keyspace), count)
        chosen: dict[int, None] = {}
        for _ in range(count * 20):  # hot keys repeat: draw until enough distinct ones (bounded)
            chosen[self.one()] = None
            if len(chosen) == count:
                break
        return list(chosen)


def key_of(i: int) -> bytes:
    return b"lt:%08d" % i


def make_client(host: str, **kwargs: Any) -> Client:
    """--host: a cluster directory, router://ADDR, nodes://A,B,C, or HOST:PORT (a router)."""
    if not host:
        raise ValueError("give --host: a cluster directory, router://ADDR or nodes://A,B,C")
    if host.startswith("router://"):
        return Client(router=host[len("router://") :], **kwargs)
    if host.startswith("nodes://"):
        return Client(host[len("nodes://") :].split(","), **kwargs)
    if Path(host).is_dir():
        return Client.from_cluster(host, **kwargs)
    return Client(router=host, **kwargs)


class KvUser(User):
    """One simulated application: its own client (and so its own session token)."""

    def wait_time(self) -> float:
        return self.environment.parsed_options.kv_think_time

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        try:  # the command line checked it; a web UI edit arrives unchecked
            self.mix = parse_mix(opts.kv_consistency_mix)
        except ValueError as err:
            log.error("%s", err)
            self.mix = []  # the first task stops the user (from on_start Locust logs a traceback)
            return
        self.keys = _chooser(opts)
        self.kv = make_client(self.host, read_policy=ReadPolicy(opts.kv_read_policy), timeout=opts.kv_timeout)
        self.value = os.urandom(max(0, opts.kv_value_size))

    def on_stop(self) -> None:
        kv = getattr(self, "kv", None)  # None: on_start stopped the user before it made a client
        if kv is not None:
            kv.close()

    @task
    def operate(self) -> None:
        if not self.mix:
            raise StopUser()
        batch = max(1, self.opts.kv_batch_size)
        ids = [self.keys.one()] if batch == 1 else self.keys.many(batch)
        keys = [key_of(i) for i in ids]
        if random.random() < self.opts.kv_read_ratio:
            label, level, _ = random.choices(self.mix, weights=[w for *_, w in self.mix])[0]
            self._call("get" if batch == 1 else "multi_get", label, keys, lambda: self._read(keys, level))
        else:
            self._call("put" if batch == 1 else "put_many", "strong", keys, lambda: self._write(keys))

    def _read(self, keys: list[bytes], level: ReadConsistency) -> int:
        """Bytes read."""
        if len(keys) == 1:
            return len(self.kv.get(keys[0], consistency=level) or b"")
        return sum(len(v) for v in self.kv.multi_get(keys, consistency=level).values())

    def _write(self, keys: list[bytes]) -> int:
        """Bytes written (put_many is not atomic across shards: one write per shard)."""
        if len(keys) == 1:
            self.kv.put(keys[0], self.value)
        else:
            self.kv.put_many(dict.fromkeys(keys, self.value), atomic=False)
        return len(keys) * len(self.value)

    def _call(self, op: str, consistency: str, keys: list[bytes], fn: Any) -> None:
        shard = self._shard(keys)
        started = time.perf_counter()
        size, exc = 0, None
        try:
            size = int(fn())
        except Exception as err:  # every failure is reported to Locust, never raised into it
            exc = err
        self.environment.events.request.fire(
            request_type=f"{op}:{consistency}",
            name=op,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=size,
            exception=exc,
            context={"shard": shard},
        )

    def _shard(self, keys: list[bytes]) -> int:
        """The keys' shard, -1 when they span shards or the client has no map (router mode)."""
        cluster_map = self.kv.core.cluster_map
        if cluster_map is None:
            return -1
        shards = {cluster_map.slots.shard_for(k) for k in keys}
        return shards.pop() if len(shards) == 1 else -1


_CHOOSERS: dict[tuple[int, str, float], KeyChooser] = {}


def _chooser(opts: Any) -> KeyChooser:
    """One per process: a Zipf CDF over a large key space is worth building once."""
    spec = (opts.kv_keyspace, opts.kv_distribution, opts.kv_zipf_s)
    if spec not in _CHOOSERS:
        _CHOOSERS[spec] = KeyChooser(*spec)
    return _CHOOSERS[spec]


# ----- shapes (--kv-shape; they read -u, -r and -t) --------------------------------------------


class _KvShape(LoadTestShape):
    abstract = True
    use_common_options = True

    def params(self) -> tuple[int, float, float | None]:
        opts = self.runner.environment.parsed_options
        users = max(1, int(opts.num_users or 1))
        return users, float(opts.spawn_rate or users), opts.run_time or None

    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = self.params()
        now = self.get_run_time()
        if run_time is not None and now >= run_time:
            return None
        return self.at(now, users, rate, run_time)

    def at(self, now: float, users: int, rate: float, run_time: float | None) -> tuple[int, float]:
        raise NotImplementedError


class SteadyShape(_KvShape):
    """-u users from the start (spawned at -r per second) for -t."""

    def at(self, now: float, users: int, rate: float, run_time: float | None) -> tuple[int, float]:
        return users, rate


class RampShape(_KvShape):
    """From one user up to -u over the first 60% of -t (60 s without -t), then hold."""

    def at(self, now: float, users: int, rate: float, run_time: float | None) -> tuple[int, float]:
        ramp = 0.6 * run_time if run_time else 60.0
        return max(1, min(users, math.ceil(users * now / ramp))), max(rate, users / ramp)


class SpikeShape(_KvShape):
    """A quarter of -u, all -u users between 40% and 60% of -t (20-30 s without -t), then a quarter."""

    def at(self, now: float, users: int, rate: float, run_time: float | None) -> tuple[int, float]:
        span = run_time or 50.0
        in_spike = 0.4 * span <= now < 0.6 * span
        return (users if in_spike else max(1, users // 4)), float(max(rate, users))


SHAPES = {"steady": SteadyShape, "ramp": RampShape, "spike": SpikeShape}


@events.init.add_listener
def _choose_shape(environment: Any, **_: Any) -> None:
    """Locust would run the first shape class it finds; --kv-shape picks one (or none)."""
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, WorkerRunner):
        return
    shape = SHAPES.get(opts.kv_shape)
    environment.shape_class = shape() if shape else None
    if environment.shape_class is not None:
        environment.shape_class.runner = environment.runner


# ----- what every call cost, per second and per shard ---------------------------------------------


@dataclass
class Tracker:
    started: float = field(default_factory=time.time)
    seconds: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    shard_ok: Counter[int] = field(default_factory=Counter)
    shard_fail: Counter[int] = field(default_factory=Counter)
    shard_errors: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[tuple[float, int]] = field(default_factory=list)  # (completed at, shard)
    writes_ok: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    faults: list[dict[str, Any]] = field(default_factory=list)

    def record(self, request_type: str, response_time: float, exception: Any, shard: int) -> None:
        now = time.time()
        bucket = self.seconds[int(now)]
        if exception is None:
            bucket[0] += 1
            self.shard_ok[shard] += 1
            if request_type.split(":")[0] in WRITE_OPS:
                self.writes_ok[shard].append((now - response_time / 1000.0, now))
        else:
            bucket[1] += 1
            self.shard_fail[shard] += 1
            self.shard_errors[shard][getattr(exception, "kind", type(exception).__name__)] += 1
            self.failures.append((now, shard))

    def first_write_after(self, shard: int, moment: float) -> float | None:
        """Completion of the first successful write on `shard` that was issued at or after `moment`."""
        ends = [end for start, end in self.writes_ok.get(shard, []) if start >= moment]
        return min(ends) if ends else None

    def report(self, finished: float) -> dict[str, Any]:
        for fault in self.faults:
            self._cost(fault, finished)
        seconds = sorted(self.seconds)
        span = range(seconds[0], seconds[-1] + 1) if seconds else range(0)
        failed = sum(1 for s in span if self.seconds.get(s, [0, 0])[1])
        shards = sorted(set(self.shard_ok) | set(self.shard_fail))
        return {
            "started": self.started,
            "finished": finished,
            "requests": sum(ok + fail for ok, fail in self.seconds.values()),
            "failures": sum(fail for _, fail in self.seconds.values()),
            "seconds": [[s, *self.seconds.get(s, [0, 0])] for s in span],
            "seconds_total": len(span),
            "seconds_with_failures": failed,
            "availability": (len(span) - failed) / len(span) if span else None,
            "shards": {
                str(s): {
                    "ok": self.shard_ok[s],
                    "failed": self.shard_fail[s],
                    "errors": dict(self.shard_errors.get(s, {})),
                }
                for s in shards
            },
            "faults": self.faults,
        }

    def _cost(self, fault: dict[str, Any], finished: float) -> None:
        """What a kill cost: time to the first successful write issued after it, errors per shard."""
        killed = fault["killed_at"]
        resumed = self.first_write_after(fault["shard"], killed)
        fault["writes_resumed_after_seconds"] = None if resumed is None else round(resumed - killed, 3)
        window_end = fault.get("rejoined_at") or fault.get("restarted_at") or finished
        window_end = max(window_end, resumed or 0.0)
        fault["window"] = [killed, window_end]
        errors_by_shard: Counter[int] = Counter(s for t, s in self.failures if killed <= t <= window_end)
        fault["errors_in_window_by_shard"] = {str(s): n for s, n in sorted(errors_by_shard.items())}
        others = sum(n for s, n in errors_by_shard.items() if s != fault["shard"])
        fault["errors_confined_to_shard"] = others == 0
        fault["recovered"] = resumed is not None and bool(fault.get("new_leader"))


TRACKER = Tracker()


@events.request.add_listener
def _on_request(request_type: str, response_time: float, exception: Any = None, **kwargs: Any) -> None:
    context = kwargs.get("context") or {}
    TRACKER.record(request_type, response_time, exception, int(context.get("shard", -1)))


# ----- preload, fault schedule and report -------------------------------------------------------

_fault_greenlet: gevent.Greenlet | None = None


def _is_local(environment: Any) -> bool:
    return isinstance(environment.runner, LocalRunner)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    global TRACKER, _fault_greenlet
    opts = environment.parsed_options
    if opts.kv_preload and not isinstance(environment.runner, WorkerRunner):
        _preload(environment.host, opts)
    TRACKER = Tracker()
    if not _is_local(environment) or opts.kv_kill_leader_at < 0:
        return
    if not environment.host or not (Path(environment.host) / "cluster.json").exists():
        log.warning("fault schedule ignored: --host must be a local cluster directory")
        return
    cluster = LocalCluster(environment.host)
    if opts.kv_kill_shard not in {s.id for s in cluster.cluster_map().shards}:
        log.error("fault schedule ignored: the cluster has no shard %d", opts.kv_kill_shard)
        return
    _fault_greenlet = gevent.spawn(_fault_cycle, environment, cluster, TRACKER)


def _preload(host: str, opts: Any) -> None:
    value = os.urandom(max(0, opts.kv_value_size))
    started = time.monotonic()
    with make_client(host, timeout=30.0) as kv:
        for first in range(0, opts.kv_keyspace, 500):
            kv.put_many(
                {key_of(i): value for i in range(first, min(first + 500, opts.kv_keyspace))}, atomic=False
            )
    log.info("preloaded %d keys in %.1fs", opts.kv_keyspace, time.monotonic() - started)


def _fault_cycle(environment: Any, cluster: LocalCluster, tracker: Tracker) -> None:
    """Kill shard S's leader at T, start it again at T+D, and time the election and the rejoin."""
    opts = environment.parsed_options
    t0 = time.monotonic()
    gevent.sleep(opts.kv_kill_leader_at)
    shard = opts.kv_kill_shard
    victim = cluster.leader_of(shard)
    if victim is None:
        log.error("fault skipped: shard %d has no leader at T=%.1fs", shard, opts.kv_kill_leader_at)
        return
    fault: dict[str, Any] = {"shard": shard, "node": victim, "signal": "KILL"}
    cluster.kill(victim, "KILL")
    fault["killed_at"] = time.time()
    tracker.faults.append(fault)
    log.warning("fault: SIGKILL %s (leader of shard %d)", victim, shard)
    _write_report(opts, tracker)
    restart_at = t0 + opts.kv_kill_leader_at + opts.kv_restart_after
    new_leader = _wait_for(lambda: _other_leader(cluster, shard, victim), restart_at - time.monotonic())
    if new_leader:
        fault["new_leader"] = new_leader
        fault["election_seconds"] = round(time.time() - fault["killed_at"], 3)
        log.warning("fault: %s leads shard %d after %.2fs", new_leader, shard, fault["election_seconds"])
        _write_report(opts, tracker)
    gevent.sleep(max(0.0, restart_at - time.monotonic()))
    _restart(cluster, fault)
    if not fault.get("new_leader"):  # the election outlasted the restart delay
        fault["new_leader"] = _wait_for(lambda: cluster.leader_of(shard), 30.0)
        if fault["new_leader"]:
            fault["election_seconds"] = round(time.time() - fault["killed_at"], 3)
    _write_report(opts, tracker)
    if _wait_for(lambda: _caught_up(cluster, shard, victim), 60.0):
        fault["rejoined_at"] = time.time()
        fault["rejoin_seconds"] = round(fault["rejoined_at"] - fault["restarted_at"], 3)
        log.warning("fault: %s rejoined shard %d in %.2fs", victim, shard, fault["rejoin_seconds"])
    _write_report(opts, tracker)
    environment.events.kv_fault.fire(record=fault)


def _restart(cluster: LocalCluster, fault: dict[str, Any]) -> None:
    if "restarted_at" in fault:
        return
    fault["restarted_at"] = time.time()
    cluster.start(fault["node"])
    log.warning("fault: restarted %s", fault["node"])


def _other_leader(cluster: LocalCluster, shard: int, not_name: str) -> str | None:
    leader = cluster.leader_of(shard)
    return leader if leader and leader != not_name else None


def _caught_up(cluster: LocalCluster, shard: int, name: str) -> bool:
    """The restarted replica follows, and has applied what the leader had committed."""
    status = next(s for s in cluster.status(timeout=0.5) if s["shard"] == shard)
    replicas = {r["node"]: r for r in status["replicas"]}
    leader = replicas.get(status["leader"] or "")
    node = replicas[name]
    return bool(
        leader and node["role"] == "follower" and node["applied_index"] >= leader["commit_index"] - 50
    )


def _wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            value = predicate()
        except Exception as err:  # a node mid-restart can answer oddly; keep polling
            log.debug("poll failed: %s", err)
            value = None
        if value or time.monotonic() >= deadline:
            return value
        gevent.sleep(interval)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    global _fault_greenlet
    if _fault_greenlet is not None:
        _fault_greenlet.kill(block=True, timeout=5)
        _fault_greenlet = None
        # Never leave the cluster short of a replica because the run ended before the restart.
        for fault in TRACKER.faults:
            if "restarted_at" not in fault and environment.host:
                _restart(LocalCluster(environment.host), fault)
    if _is_local(environment):
        _write_report(environment.parsed_options, TRACKER)


def _write_report(opts: Any, tracker: Tracker) -> None:
    if not opts.kv_report:
        return
    path = Path(opts.kv_report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tracker.report(time.time()), indent=1))
    tmp.replace(path)  # readers (the demo's progress line) never see half a file
