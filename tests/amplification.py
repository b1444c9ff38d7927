"""The memory-amplification attempts of issue 12, and a probe of a node's memory while one runs.

Shared by tests/cluster/test_bounds.py (which asserts the answers and the growth) and by a before/after
measurement: `python -m tests.amplification` starts a fresh 1x3 cluster per attempt, runs it
against the leader and prints the leader's RSS before, its peak during and its RSS after. It uses
only raw gRPC and `LocalCluster`, so the same file measures an older checkout too. A watchdog
SIGKILLs the leader if it passes `cap_bytes` (the unfixed code grows without bound).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.cluster.local import LocalCluster
from kvstore.config import grpc_message_options
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc

MiB = 1 << 20
BIG_KEY = b"amp:big"
BIG_VALUE = b"v" * MiB  # the largest legal value
SCAN_PREFIX = b"amp:scan:"
SCAN_VALUES = 60  # 60 MiB: under the old 64 MiB message limit, so the old code builds it all
# Raw channels accept anything: the attempt is the node's answer, not what a client limits.
CHANNEL_OPTIONS = grpc_message_options(1 << 30)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0]) * 1024
    return out


class RssProbe:
    """The node's RSS before and after a block, and its peak during it (sampled every 10 ms, and
    VmHWM when it rose: then the peak happened during the block). Kills the node past `cap`."""

    def __init__(self, pid: int, cap_bytes: int = 3 << 30) -> None:
        self.pid = pid
        self.cap = cap_bytes
        self.killed = False
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> RssProbe:
        before = memory(self.pid)
        self.rss_before, self._hwm_before = before["VmRSS"], before["VmHWM"]
        self._sampled = self.rss_before
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            try:
                rss = memory(self.pid)["VmRSS"]
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self._sampled = max(self._sampled, rss)
            if rss > self.cap and not self.killed:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            after = memory(self.pid)
            self.rss_after = after["VmRSS"]
            hwm = after["VmHWM"]
        except (FileNotFoundError, ProcessLookupError, KeyError):
            self.rss_after, hwm = 0, 0
        self.peak = max(self._sampled, hwm if hwm > self._hwm_before else 0)

    @property
    def peak_growth(self) -> int:
        return self.peak - self.rss_before

    def summary(self) -> str:
        mb = 1e6
        killed = f" KILLED by the probe past {self.cap / mb:.0f} MB" if self.killed else ""
        return (
            f"RSS before {self.rss_before / mb:.0f} MB, peak {self.peak / mb:.0f} MB "
            f"(+{self.peak_growth / mb:.0f} MB), after {self.rss_after / mb:.0f} MB{killed}"
        )


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    response_bytes: int
    note: str = ""


def _call(method: Callable[..., object], request: object, timeout: float) -> tuple[Outcome, object]:
    started = time.monotonic()
    try:
        response = method(request, timeout=timeout)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", time.monotonic() - started, 0), None
    size = response.ByteSize()  # type: ignore[attr-defined]
    return Outcome(grpc.StatusCode.OK, "", time.monotonic() - started, size), response


def multi_get_duplicates(stub: pb_grpc.KVStub, count: int = 5000, timeout: float = 30.0) -> Outcome:
    """One MultiGet naming the same 1 MiB key `count` times."""
    outcome, response = _call(stub.MultiGet, pb.MultiGetRequest(keys=[BIG_KEY] * count), timeout)
    if response is not None:
        outcome.note = f"{len(response.keys)} keys answered"  # type: ignore[attr-defined]
    return outcome


def batch_gets(stub: pb_grpc.KVStub, count: int = 10_000, timeout: float = 30.0) -> Outcome:
    """One Batch of `count` gets of the 1 MiB key."""
    request = pb.BatchRequest(ops=[pb.BatchOp(get=pb.GetRequest(key=BIG_KEY))] * count)
    outcome, response = _call(stub.Batch, request, timeout)
    if response is not None:
        results = response.results  # type: ignore[attr-defined]
        served = sum(1 for r in results if r.WhichOneof("result") == "get")
        outcome.note = f"{served} gets served, {len(results) - served} answered with an error"
    return outcome


def batch_failed_cas(stub: pb_grpc.KVStub, count: int = 2000, timeout: float = 30.0) -> Outcome:
    """One Batch of `count` compare-and-sets that fail against the 1 MiB value (each failure
    answers with the current value)."""
    ops = [
        pb.BatchOp(compare_and_set=pb.CompareAndSetRequest(key=BIG_KEY, value=b"x", expected_revision=1))
        for _ in range(count)
    ]
    outcome, response = _call(stub.Batch, pb.BatchRequest(ops=ops), timeout)
    if response is not None:
        results = response.results  # type: ignore[attr-defined]
        served = sum(1 for r in results if r.WhichOneof("result") == "compare_and_set")
        outcome.note = f"{served} answered with the value, {len(results) - served} with an error"
    return outcome


def scan_large(stub: pb_grpc.KVStub, timeout: float = 30.0) -> Outcome:
    """One Scan (limit 10,000) over `SCAN_VALUES` values of 1 MiB."""
    request = pb.ScanRequest(prefix=SCAN_PREFIX, limit=10_000)
    outcome, response = _call(stub.Scan, request, timeout)
    if response is not None:
        outcome.note = (
            f"page of {len(response.kvs)} records, "  # type: ignore[attr-defined]
            f"continuation {'set' if response.continuation else 'empty'}"  # type: ignore[attr-defined]
        )
    return outcome


ATTEMPTS: dict[str, Callable[[pb_grpc.KVStub], Outcome]] = {
    "MultiGet, one 1 MiB key named 5,000 times": multi_get_duplicates,
    "Batch of 10,000 gets of a 1 MiB key": batch_gets,
    f"Scan (limit 10,000) over {SCAN_VALUES} values of 1 MiB": scan_large,
    "Batch of 2,000 failed CAS on a 1 MiB value": batch_failed_cas,
}


def load_data(stub: pb_grpc.KVStub, scan_values: int = SCAN_VALUES) -> None:
    stub.Put(pb.PutRequest(key=BIG_KEY, value=BIG_VALUE, request_id=os.urandom(24)), timeout=30)
    for i in range(scan_values):
        key = SCAN_PREFIX + b"%03d" % i
        stub.Put(pb.PutRequest(key=key, value=BIG_VALUE, request_id=os.urandom(24)), timeout=30)


def leader(cluster: LocalCluster) -> tuple[str, int, str]:
    """(name, pid, gRPC address) of shard 0's leader, once there is one."""
    deadline = time.monotonic() + 30
    while True:
        name = cluster.leader_of(0)
        pid = cluster.pid(name) if name else None
        if name and pid:
            return name, pid, cluster.cluster_map().replica(name)[1].address
        if time.monotonic() > deadline:
            raise TimeoutError("no leader")
        time.sleep(0.2)


def main() -> None:
    """Each attempt on a fresh cluster (an unfixed leader may be killed by the probe)."""
    for title, attempt in ATTEMPTS.items():
        with tempfile.TemporaryDirectory(prefix="kvstore-amp-") as tmp:
            cluster = LocalCluster(Path(tmp) / "c")
            cluster.create(shards=1, replicas=3)
            cluster.start_all()
            try:
                cluster.wait_for_leaders(60)
                _, pid, address = leader(cluster)
                with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                    stub = pb_grpc.KVStub(channel)
                    load_data(stub, SCAN_VALUES if "Scan" in title else 0)
                    time.sleep(1.0)  # let the apply and its allocations settle
                    with RssProbe(pid) as probe:
                        outcome = attempt(stub)
                print(
                    f"{title}: {outcome.code.name} in {outcome.seconds:.2f}s, answer "
                    f"{outcome.response_bytes / 1e6:.1f} MB ({outcome.note or outcome.details[:80]}); "
                    f"{probe.summary()}",
                    flush=True,
                )
            finally:
                cluster.down()


if __name__ == "__main__":
    sys.exit(main())
