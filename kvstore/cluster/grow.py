"""Adding a shard to a running local cluster (`kvstore cluster add-shard`).

1. The map gains the shard, owning nothing (a compare-and-set in the metadata group): the ring's
   shards stay the ones it had (`ring_shards`), so adding the shard moves no key by itself.
2. Its replicas are configured like the others (a Raft secret of its own, free ports) and started.
3. The ring, with the new shard in it, proposes the slots it takes: ~1/(N+1) of them, only from
   the others to it (`SlotTable.proposal_for`). They move with the slot-move protocol
   (kvstore/meta/mover.py), one move per source shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.cluster.processes import free_ports
from kvstore.cluster.topology import PORTS_PER_REPLICA
from kvstore.config import NodeConfig
from kvstore.meta.mover import Mover, plan_ranges
from kvstore.meta.store import MapStore, MoveRecord
from kvstore.routing.cluster_map import ClusterMap, ShardInfo
from kvstore.routing.ring import Ring

if TYPE_CHECKING:
    from kvstore.cluster.local import LocalCluster


async def add_shard(
    cluster: LocalCluster,
    replicas: int | None = None,
    rate: float = 0.0,
    say: Callable[[str], None] = lambda _: None,
    timeout: float = 60.0,
) -> tuple[int, list[MoveRecord]]:
    """Add a shard of `replicas` (default: as many as the others have) and move its share of the
    slots to it; (its id, the moves made)."""
    token = cluster.admin_token()
    store = MapStore(cluster.cluster_map(), admin_token=token)
    try:
        current, _ = await store.read()
        if current is None:
            raise errors.Unavailable("the metadata group holds no cluster map yet")
        new_id = max(s.id for s in current.shards) + 1
        count = replicas or len(current.shards[0].replicas)
        info, configs = _plan_replicas(cluster, current, new_id, count)
        ring_shards = current.ring_shards or tuple(s.id for s in current.shards)
        added = await store.change(
            lambda m: dataclasses.replace(
                m, epoch=m.epoch + 1, shards=(*m.shards, info), ring_shards=m.ring_shards or ring_shards
            )
        )
        added.save(cluster.map_path)  # the new nodes start from it
        say(f"shard {new_id}: in the map (epoch {added.epoch}), owning no slot yet")
        for config in configs:
            cluster.write_node_config(config)
        names = [r.name for r in info.replicas]
        for name in names:
            cluster.start(name)
        cluster.wait_until_serving(names, timeout)
        say(f"shard {new_id}: {', '.join(names)} serving")
    finally:
        await store.close()
    proposal = added.slots.proposal_for(Ring([*ring_shards, new_id], added.vnodes_per_shard), new_id)
    by_source: dict[int, list[tuple[int, int]]] = {}
    for first, last, _ in proposal:
        for run_first, run_last, source in plan_ranges(added, first, last, new_id):
            by_source.setdefault(source, []).append((run_first, run_last))
    moved = sum(b - a + 1 for ranges in by_source.values() for a, b in ranges)
    say(f"shard {new_id}: taking {moved} slots ({moved / 65536:.1%}) from shards {sorted(by_source)}")
    mover = Mover(added, token, say=say)
    try:
        moves = await mover.move_ranges({s: sorted(r) for s, r in by_source.items()}, new_id, rate)
    finally:
        await mover.close()
    cluster.current_map()
    return new_id, moves


def _plan_replicas(
    cluster: LocalCluster, current: ClusterMap, shard: int, count: int
) -> tuple[ShardInfo, list[NodeConfig]]:
    """The new shard's replicas (s<shard>r<i>, free ports, the first shard's zones in turn) and
    their configs, made like an existing data node's, with a Raft secret of their own."""
    like = cluster.node_config(current.shards[0].replicas[0].name)
    ports = [p for p in free_ports(PORTS_PER_REPLICA * count + 8) if p not in cluster.reserved_ports]
    secret = "" if like.raft.insecure else str(cluster.write_shard_secret(shard))
    zones_of_first = [r.zone for r in current.shards[0].replicas]
    names = [f"s{shard}r{r}" for r in range(count)]
    zones = [zones_of_first[r % len(zones_of_first)] for r in range(count)]
    replicas, configs = cluster.plan_group(
        like, shard, names, zones, ports[: PORTS_PER_REPLICA * count], secret
    )
    return ShardInfo(shard, replicas), configs
