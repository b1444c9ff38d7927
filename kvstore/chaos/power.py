"""The power-cut nemesis of `kvstore chaos`: SIGKILL a set of replicas at once and drop whatever
their disks never received (everything written since the last fsync), then restart them.

The runner knows nothing of how a disk loses data: it is given a `PowerSupply`, which puts every
replica's data directory on storage that can lose power before the nodes start, and cuts it.
The tests' one (tests/support/power_cluster.py, `FusePower`) mounts the power-loss FUSE
filesystem of tests/support/powerloss_fs.py on each data directory; `python -m
tests.powerloss.long_run` drives a long run with it.

Which replicas lose power, in seeded round-robin over `CUT_KINDS` so a run of N cuts has a known
mix: every replica of one shard (the case the durable log exists for), a majority of one shard
(its leader among them when known: the one survivor must not be the only holder of a commit), a
single replica (most often the leader), or every node of every shard (one host, one outage).
"""

from __future__ import annotations

import random
from typing import Protocol

from kvstore.cluster.local import LocalCluster

# "shard" twice: whole-shard cuts are the case the issue names, so they are the most frequent.
CUT_KINDS = ("shard", "majority", "replica", "all", "shard")


class PowerSupply(Protocol):
    def attach(self, cluster: LocalCluster) -> None:
        """Put every replica's data directory on storage that a cut can revert (before any node
        of `cluster` starts)."""

    def cut(self, names: list[str], torn_seed: int | None = None) -> int:
        """SIGKILL every replica in `names` (all dead before any disk is touched), then drop each
        one's unsynced data; returns the bytes dropped."""

    def detach(self) -> None:
        """Undo `attach` once every node has stopped (also after a failure)."""


class CutPlanner:
    """Chooses each cut's kind (seeded round-robin: every `len(kinds)` cuts hold each kind once,
    in shuffled order) and its victims."""

    def __init__(
        self, rng: random.Random, kinds: tuple[str, ...] = CUT_KINDS, leader_bias: float = 0.6
    ) -> None:
        unknown = set(kinds) - set(CUT_KINDS)
        if unknown or not kinds:
            raise ValueError(
                f"unknown power-cut kinds {sorted(unknown)}; choose from {sorted(set(CUT_KINDS))}"
            )
        self.rng = rng
        self.kinds = kinds
        self.leader_bias = leader_bias
        self._pending: list[str] = []

    def next_kind(self) -> str:
        if not self._pending:
            self._pending = list(self.kinds)
            self.rng.shuffle(self._pending)
        return self._pending.pop()

    def victims(self, cluster: LocalCluster, kind: str) -> list[str]:
        if kind == "all":
            return cluster.node_names()
        shards = cluster.cluster_map().shards
        shard = shards[self.rng.randrange(len(shards))]
        replicas = [r.name for r in shard.replicas]
        if kind == "shard":
            return replicas
        leader = cluster.leader_of(shard.id) if self.rng.random() < self.leader_bias else None
        others = [r for r in replicas if r != leader]
        self.rng.shuffle(others)
        first = [leader] if leader else []
        if kind == "replica":
            return (first + others)[:1]
        majority = len(replicas) // 2 + 1
        return sorted((first + others)[:majority])
