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

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from kvstore import errors
from kvstore.client.aio import AsyncClient
from kvstore.client.factory import make_core
from kvstore.routing.cluster_map import ClusterMap
from kvstore.routing.slot_table import ranges_overlap

MAP_KEY = b"kvstore/cluster-map"
MOVE_PREFIX = b"kvstore/moves/"  # + the move id, 12 digits: one record per move (MoveRecord)
NEXT_MOVE_KEY = b"kvstore/next-move-id"
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

    def __init__(
        self, cluster_map: ClusterMap, timeout: float = DEFAULT_TIMEOUT, admin_token: str = ""
    ) -> None:
        """`admin_token`: the cluster's admin secret, which changes need (reads do not)."""
        core = make_core(None, None, cluster_map.meta_map(), "strong", "leader", None, timeout, "")
        if admin_token:
            core.extra_metadata = ((errors.ADMIN_TOKEN_KEY, admin_token),)
        self.client = AsyncClient(_core=core, pipelining=False)
        self.cluster_id = cluster_map.cluster_id

    async def close(self) -> None:
        await self.client.close()

    async def read(
        self, timeout: float | None = None, unless_revision: int = 0
    ) -> tuple[ClusterMap | None, int]:
        """The newest map and its revision in the group (None, 0 before it was seeded). With
        `unless_revision`: (None, that revision) when the map is still that version, not decoded
        again (a map with thousands of moved ranges takes milliseconds to build: every node
        polls twice a second)."""
        item = await self.client.get_item(MAP_KEY, timeout=timeout)
        if item is None:
            return None, 0
        if unless_revision and item.revision == unless_revision:
            return None, item.revision
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


@dataclass
class MoveRecord:
    """One slot range's move from `source` to `target`: what a coordinator resumes from."""

    id: int
    ranges: list[tuple[int, int]]  # (first, last) slot ranges, sorted and apart
    source: int
    target: int
    # planned, copying, catching_up, fenced, flipped, cleaning, done; aborted; paused (any phase
    # before flipped, kept in `resume_phase`)
    phase: str = "planned"
    rate: float = 0.0  # keys/s, 0: unthrottled
    keys_copied: int = 0
    changes_applied: int = 0
    keys_dropped: int = 0
    epoch: int = 0  # the map epoch from which the target owns the range (once flipped)
    error: str = ""  # why the last attempt stopped, if it failed
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float = 0.0

    @property
    def key(self) -> bytes:
        return MOVE_PREFIX + b"%012d" % self.id

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> MoveRecord:
        try:
            data = json.loads(value)
            data["ranges"] = [tuple(r) for r in data["ranges"]]
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise errors.KvError(
                f"the metadata group holds a move record that cannot be read: {exc}"
            ) from None

    @property
    def finished_phase(self) -> bool:
        return self.phase in ("done", "aborted")

    @property
    def slot_count(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def overlaps(self, ranges: list[tuple[int, int]]) -> bool:
        return ranges_overlap(self.ranges, ranges)

    def describe(self) -> str:
        """e.g. "slots 0-99,200-299 (200 slots)"."""
        shown = ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.ranges[:4])
        more = f",... ({len(self.ranges)} ranges" if len(self.ranges) > 4 else " ("
        return f"slots {shown}{more}{', ' if more.endswith('ranges') else ''}{self.slot_count} slots)"


class MoveRecords:
    """The move records in the metadata group: created with a fresh id, changed by compare-and-set."""

    def __init__(self, store: MapStore) -> None:
        self.client = store.client

    async def new_id(self) -> int:
        while True:
            item = await self.client.get_item(NEXT_MOVE_KEY)
            current = int(item.value) if item else 0
            result = await self.client.compare_and_set(
                NEXT_MOVE_KEY, b"%d" % (current + 1), expected_revision=item.revision if item else 0
            )
            if result.succeeded:
                return current + 1

    async def create(self, record: MoveRecord) -> int:
        """Store a new record; its revision."""
        result = await self.client.compare_and_set(record.key, record.encode(), expected_revision=0)
        if not result.succeeded:
            raise errors.MapConflict(f"move {record.id} already exists")
        assert result.revision is not None
        return result.revision

    async def read(self, move_id: int) -> tuple[MoveRecord, int]:
        item = await self.client.get_item(MOVE_PREFIX + b"%012d" % move_id)
        if item is None:
            raise errors.InvalidArgument(f"there is no move {move_id}")
        return MoveRecord.decode(item.value), item.revision

    async def save(self, record: MoveRecord, revision: int) -> int:
        """Write `record` over the version at `revision`; its new revision. `MapConflict` if
        another coordinator changed it meanwhile (two must never drive one move)."""
        record.updated = time.time()
        result = await self.client.compare_and_set(record.key, record.encode(), expected_revision=revision)
        if not result.succeeded:
            raise errors.MapConflict(f"move {record.id} was changed by another coordinator")
        assert result.revision is not None
        return result.revision

    async def all(self) -> list[MoveRecord]:
        records: list[MoveRecord] = []
        continuation = b""
        while True:
            page = await self.client.scan(prefix=MOVE_PREFIX, limit=1000, continuation=continuation)
            records += [MoveRecord.decode(item.value) for item in page]
            if not page.continuation:
                return records
            continuation = page.continuation
