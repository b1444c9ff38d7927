"""Which replicas the chaos runner's power cuts hit (kvstore/chaos/power.py): the kinds' mix over a
run, and each kind's victims."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from kvstore.chaos.power import CUT_KINDS, CutPlanner


@dataclass
class _Replica:
    name: str


@dataclass
class _Shard:
    id: int
    replicas: tuple[_Replica, ...]


@dataclass
class _Map:
    shards: tuple[_Shard, ...]


class _Cluster:
    """What the planner asks of a LocalCluster: 2 shards x 3, leaders s0r1 and s1r2."""

    def __init__(self) -> None:
        self.map = _Map(tuple(_Shard(s, tuple(_Replica(f"s{s}r{r}") for r in range(3))) for s in range(2)))

    def node_names(self) -> list[str]:
        return [r.name for s in self.map.shards for r in s.replicas]

    def cluster_map(self) -> _Map:
        return self.map

    def leader_of(self, shard: int) -> str:
        return ("s0r1", "s1r2")[shard]


def test_twenty_cuts_are_eight_shards_and_four_of_each_other_kind() -> None:
    def order(seed: int) -> list[str]:
        planner = CutPlanner(random.Random(seed))
        return [planner.next_kind() for _ in range(20)]

    assert Counter(order(1)) == {"shard": 8, "majority": 4, "replica": 4, "all": 4}
    assert order(1) == order(1), "the same seed, the same cuts"
    assert order(1) != order(2), "the order is shuffled by the seed"


def test_each_kind_hits_its_replicas() -> None:
    cluster = _Cluster()
    planner = CutPlanner(random.Random(3), leader_bias=1.0)
    assert planner.victims(cluster, "all") == cluster.node_names()  # type: ignore[arg-type]
    for _ in range(20):
        shard = planner.victims(cluster, "shard")  # type: ignore[arg-type]
        assert shard in (["s0r0", "s0r1", "s0r2"], ["s1r0", "s1r1", "s1r2"])
        majority = planner.victims(cluster, "majority")  # type: ignore[arg-type]
        assert len(majority) == 2 and len({n[:2] for n in majority}) == 1
        assert {"s0r1", "s1r2"} & set(majority), "the leader is among a majority cut"
        assert planner.victims(cluster, "replica") in (["s0r1"], ["s1r2"])  # type: ignore[arg-type]


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown power-cut kinds"):
        CutPlanner(random.Random(1), kinds=("shard", "rack"))
    assert set(CUT_KINDS) == {"shard", "majority", "replica", "all"}
