"""grpc.health.v1 on nodes and routers: SERVING on a healthy cluster (main port and the plaintext
health port), NOT_SERVING on a node whose applies are frozen or whose Raft tick thread is stalled
while its gRPC server still answers, back to SERVING when it recovers; `cluster status` and
`kvstore health` show it. The stuck nodes are real node processes made stuck through the
fault-injection signals (ServerSettings.fault_injection_signals), never a SIGSTOP (a stopped
process cannot answer a probe at all)."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from kvstore.replication.liveness import ReplicaLiveness
from kvstore.server.health import NodeHealth

SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _FakeMachine:
    def __init__(self) -> None:
        self.raftLastApplied = 0
        self.raftCommitIndex = 0
        self.callbacks: list[Any] = []

    def addOnTickCallback(self, callback: Any) -> None:  # noqa: N802 (pysyncobj's name)
        self.callbacks.append(callback)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _liveness() -> tuple[ReplicaLiveness, _FakeMachine, _Clock]:
    machine, clock = _FakeMachine(), _Clock()
    return ReplicaLiveness(machine, 5.0, clock), machine, clock


def _tick(machine: _FakeMachine, clock: _Clock, seconds: float, applied: int, commit: int) -> None:
    """Tick every 0.1 s for `seconds` with these indexes."""
    for _ in range(round(seconds * 10)):
        clock.now += 0.1
        machine.raftLastApplied, machine.raftCommitIndex = applied, commit
        for callback in machine.callbacks:
            callback()


def test_liveness_starting_then_healthy_while_ticking_and_applying() -> None:
    liveness, machine, clock = _liveness()
    assert liveness.problem(True) == "starting: raft tick thread has not ticked yet"
    clock.now += 6
    assert "has not completed its first tick in 6.0s" in str(liveness.problem(True))
    _tick(machine, clock, 10, applied=7, commit=7)  # caught up, nothing to apply: idle is fine
    assert liveness.problem(True) is None
    for i in range(100):  # behind, but moving
        _tick(machine, clock, 0.1, applied=8 + i, commit=200)
    assert liveness.problem(True) is None
    assert liveness.problem(False) == "raft tick thread is not running"


def test_liveness_sees_a_stalled_tick_thread() -> None:
    liveness, machine, clock = _liveness()
    _tick(machine, clock, 1, applied=3, commit=3)
    clock.now += 4.9
    assert liveness.problem(True) is None
    clock.now += 0.2
    assert "raft tick thread stalled: no tick for 5.1s" in str(liveness.problem(True))
    _tick(machine, clock, 0.1, applied=3, commit=3)
    assert liveness.problem(True) is None


def test_liveness_sees_applies_stuck_even_if_rolled_back_and_retried_every_tick() -> None:
    liveness, machine, clock = _liveness()
    _tick(machine, clock, 1, applied=3, commit=3)
    _tick(machine, clock, 4.9, applied=3, commit=9)  # committed entries wait, applied does not move
    assert liveness.problem(True) is None
    _tick(machine, clock, 0.3, applied=3, commit=9)
    assert "applies stuck: applied index 3 has not moved for 5.2s while the commit index is 9" in str(
        liveness.problem(True)
    )
    # An entry applied and rolled back on every tick (a storage error) counts as progress once.
    for _ in range(30):
        _tick(machine, clock, 0.1, applied=4, commit=9)
        _tick(machine, clock, 0.1, applied=3, commit=9)
    assert "applies stuck" in str(liveness.problem(True))
    _tick(machine, clock, 0.1, applied=9, commit=9)
    assert liveness.problem(True) is None


class _FakeShard:
    def __init__(self) -> None:
        self.stuck_reason: str | None = None
        self.storage: str | None = None

    def stuck(self) -> str | None:
        return self.stuck_reason

    def health(self) -> tuple[bool, str]:
        problem = self.stuck_reason or self.storage
        return problem is None, problem or ""


async def test_liveness_service_leaves_storage_out() -> None:
    shard = _FakeShard()
    node_health = NodeHealth(shard, interval=60)
    await node_health.update()

    async def statuses() -> dict[str, int]:
        out = {}
        for service in ("", "kvstore.v2.KV", "liveness"):
            request = health_pb2.HealthCheckRequest(service=service)
            out[service] = (await node_health.servicer.Check(request, None)).status
        return out

    assert await statuses() == {"": SERVING, "kvstore.v2.KV": SERVING, "liveness": SERVING}
    assert node_health.text == "serving"
    shard.storage = "disk full"  # unready, but a restart would not help: still live
    await node_health.update()
    assert await statuses() == {"": NOT_SERVING, "kvstore.v2.KV": NOT_SERVING, "liveness": SERVING}
    assert node_health.text == "not_serving: disk full"
    shard.stuck_reason = "applies stuck"
    await node_health.update()
    assert await statuses() == {"": NOT_SERVING, "kvstore.v2.KV": NOT_SERVING, "liveness": NOT_SERVING}
    shard.stuck_reason = shard.storage = None
    await node_health.update()
    assert await statuses() == {"": SERVING, "kvstore.v2.KV": SERVING, "liveness": SERVING}
    await node_health.shutdown()
    assert set((await statuses()).values()) == {NOT_SERVING}
