"""The metadata group's store: the newest cluster map, changed only by compare-and-set.

The metadata group is a kvstore Raft group of its own (the map's `meta` replicas, serving as shard
`META_SHARD` by `ClusterMap.meta_map()`): its own processes, its own LMDB, the same durable log as
any shard. The map is one key, `MAP_KEY`, holding its JSON. A change reads it (a strong read),
makes the next map and writes it with compare-and-set on the revision it read, so two
coordinators racing cannot both win, and the epoch only ever goes up by one per change (as
TiKV's placement driver and CockroachDB's meta ranges are the one place placement is decided).

`cluster.json` is where nodes and clients start from, never the authority: the first replica of
the group to lead seeds the store from it (`seed`), and whoever changes the map writes the file
afterwards as a cache. If the group loses quorum, reads and changes here fail (`Unavailable`,
`Timeout`); the shards go on serving under the map they hold.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore import errors
from kvstore.client.aio import AsyncClient
from kvstore.client.factory import make_core
from kvstore.routing.cluster_map import ClusterMap

MAP_KEY = b"kvstore/cluster-map"
DEFAULT_TIMEOUT = 5.0


def encode(cluster_map: ClusterMap) -> bytes:
    return cluster_map.to_json().encode()


def decode(value: bytes) -> ClusterMap:
    try:
        return ClusterMap.from_json(value.decode())
    except (ValueError, KeyError, TypeError) as exc:  # written by hand, or by another version
        raise errors.KvError(f"the metadata group holds a cluster map that cannot be read: {exc}") from None


class MapStore:
    """Read and change the map held by `cluster_map`'s metadata group, from an asyncio loop.

    Built from any map of the cluster (its `meta` names the group); owns its own `AsyncClient`."""

    def __init__(self, cluster_map: ClusterMap, timeout: float = DEFAULT_TIMEOUT) -> None:
        core = make_core(None, None, cluster_map.meta_map(), "strong", "leader", None, timeout, "")
        self.client = AsyncClient(_core=core, pipelining=False)
        self.cluster_id = cluster_map.cluster_id

    async def close(self) -> None:
        await self.client.close()

    async def read(self, timeout: float | None = None) -> tuple[ClusterMap | None, int]:
        """The newest map and its revision in the group (None, 0 before it was seeded)."""
        item = await self.client.get_item(MAP_KEY, timeout=timeout)
        if item is None:
            return None, 0
        stored = decode(item.value)
        if stored.cluster_id != self.cluster_id:
            raise errors.ClusterMismatch(
                f"the metadata group holds a map of cluster {stored.cluster_id!r}, not {self.cluster_id!r}"
            )
        return stored, item.revision

    async def seed(self, cluster_map: ClusterMap) -> bool:
        """Store `cluster_map` if the group holds none yet; True if this call stored it."""
        result = await self.client.compare_and_set(MAP_KEY, encode(cluster_map), expected_revision=0)
        return result.succeeded

    async def change(self, make_next: Callable[[ClusterMap], ClusterMap]) -> ClusterMap:
        """Read the map, write `make_next(map)` if nothing changed it meanwhile; the map written.

        `make_next` must return the next epoch (one more) of the same cluster. Raises
        `errors.MapConflict` if another change landed between the read and the write (read again and
        decide again: what was planned may no longer hold)."""
        current, revision = await self.read()
        if current is None:
            raise errors.Unavailable("the metadata group holds no cluster map yet (it is still starting)")
        proposed = make_next(current)
        if proposed.epoch != current.epoch + 1 or proposed.cluster_id != current.cluster_id:
            raise errors.InvalidArgument(
                f"a map change must make epoch {current.epoch + 1} of cluster {current.cluster_id!r}, "
                f"not epoch {proposed.epoch} of {proposed.cluster_id!r}"
            )
        result = await self.client.compare_and_set(MAP_KEY, encode(proposed), expected_revision=revision)
        if not result.succeeded:
            raise errors.MapConflict(
                f"the cluster map changed while epoch {proposed.epoch} was being written"
            )
        return proposed
