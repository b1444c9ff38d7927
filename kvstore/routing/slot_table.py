"""Who owns each slot: the table that routes keys (issue 16, "placement is data").

A key hashes to one of 65,536 slots (`ring.slot_of`); the slot table says which shard owns each
slot. The ring *proposes* placement: a cluster is born with the ring's, and every slot the table
says nothing about is where the ring puts it. What the table stores is where ownership differs
from the ring (slots moved since): `overrides`, ranges `(first, last, shard)`, inclusive, in slot
order, never overlapping. A map without any routes exactly as its ring did, so every existing
cluster keeps its placement.

Why overrides rather than the whole table: the ring spreads a shard's slots in runs of a few
slots (a 3-shard ring is ~34,000 runs), so the whole table as ranges would be ~0.5 MB of map,
fetched by every client on every wrong-shard answer; a move of a slot range is one override.

Routing is on the hot path of every batched call (the client splits by shard, a node checks it
owns every key), so the table is a flat list indexed by slot, as the ring's cache is, filled
lazily from the ring (which routes a slot the first time it is asked).

Pure: no I/O. Overrides from outside (a map file, a node's answer) are checked, never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvstore.routing.ring import SLOT_COUNT, Ring, slot_of, slots_of

SlotRange = tuple[int, int, int]  # (first slot, last slot, shard), inclusive


class SlotTable:
    """Immutable slot -> shard table: a ring's placement plus overrides; `moved` makes a new one."""

    __slots__ = ("_owners", "_ring", "_shards")

    def __init__(self, ring: Ring, owners: list[int] | None = None, shards: Iterable[int] = ()) -> None:
        self._ring = ring
        # owners[slot] = shard, or -1: the ring's (filled on first use)
        self._owners = owners if owners is not None else [-1] * SLOT_COUNT
        # The shards slots may be given to: the map's (a shard just added is not in the ring yet).
        self._shards = frozenset(shards) | frozenset(ring.shard_ids)

    @classmethod
    def from_ring(cls, ring: Ring) -> SlotTable:
        """The ring's placement: what every cluster starts with."""
        return cls(ring)

    @classmethod
    def from_overrides(
        cls, ring: Ring, overrides: Iterable[Sequence[Any]], shards: Iterable[int] = ()
    ) -> SlotTable:
        """The ring's placement with `overrides` applied. Raises ValueError unless they are
        (first, last, shard) integers within the slots, in order without overlapping, each shard
        one of `shards` or the ring's."""
        known = set(shards) | set(ring.shard_ids)
        owners = [-1] * SLOT_COUNT
        after = 0  # the first slot the next range may start at
        for number, item in enumerate(overrides):
            if number >= SLOT_COUNT:
                raise ValueError(f"more than {SLOT_COUNT} slot ranges")
            if not isinstance(item, list | tuple) or len(item) != 3:
                raise ValueError(f"slot range {number} is not [first, last, shard]: {str(item)[:80]}")
            first, last, shard = item
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last, shard)):
                raise ValueError(f"slot range {number} holds a non-integer: {str(item)[:80]}")
            if not 0 <= first <= last < SLOT_COUNT:
                raise ValueError(f"slot range {number} ({first}-{last}) is not within 0-{SLOT_COUNT - 1}")
            if first < after:
                raise ValueError(
                    f"slot range {number} starts at slot {first}, before the end of the one before it "
                    "(ranges are in slot order and do not overlap)"
                )
            if shard not in known:
                raise ValueError(f"slot range {number} names shard {shard}, which is not in the map")
            owners[first : last + 1] = [shard] * (last - first + 1)
            after = last + 1
        return cls(ring, owners, known)

    def overrides(self) -> list[SlotRange]:
        """The stored form: as few ranges as cover every slot whose owner is not the ring's (a
        range may run across slots where the ring agrees with it)."""
        out: list[SlotRange] = []
        run: list[int] | None = None  # [first, last slot that needs it, shard]
        for slot in range(SLOT_COUNT):
            owner, ring_owner = self.shard_for_slot(slot), self._ring.shard_for_slot(slot)
            if run is not None and owner == run[2]:
                if owner != ring_owner:
                    run[1] = slot
                continue  # where the ring agrees, the run may bridge; trimmed at its end
            if run is not None:
                out.append((run[0], run[1], run[2]))
                run = None
            if owner != ring_owner:
                run = [slot, slot, owner]
        if run is not None:
            out.append((run[0], run[1], run[2]))
        return out

    # -- lookup -------------------------------------------------------------------------------------

    def shard_for_slot(self, slot: int) -> int:
        owner = self._owners[slot]
        if owner < 0:
            owner = self._owners[slot] = self._ring.shard_for_slot(slot)
        return owner

    def shard_for(self, key: bytes) -> int:
        return self.shard_for_slot(slot_of(key))

    def shards_for(self, keys: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Group keys by shard; order within each group is the input order (duplicates kept)."""
        keys = list(keys)
        groups: dict[int, list[bytes]] = {}
        owners = self._owners
        for key, slot in zip(keys, slots_of(keys), strict=True):
            shard = owners[slot]
            if shard < 0:
                shard = self.shard_for_slot(slot)
            group = groups.get(shard)
            if group is None:
                groups[shard] = [key]
            else:
                group.append(key)
        return groups

    def all_on(self, shard: int, keys: Iterable[bytes]) -> bool:
        """Whether every key belongs to `shard` (a node's ownership check, once per request)."""
        slots, owners = slots_of(keys), self._owners
        seen = {owners[slot] for slot in slots}
        if -1 in seen:  # some slot not routed yet
            seen = {self.shard_for_slot(slot) for slot in slots}
        return seen <= {shard}

    def slot_counts(self) -> dict[int, int]:
        """How many slots each shard owns (shards owning none are left out)."""
        counts: dict[int, int] = {}
        for slot in range(SLOT_COUNT):
            shard = self.shard_for_slot(slot)
            counts[shard] = counts.get(shard, 0) + 1
        return counts

    # -- change -------------------------------------------------------------------------------------

    def moved(self, first: int, last: int, to: int) -> SlotTable:
        """A new table in which `to` owns slots first..last (inclusive)."""
        return self.moved_all([(first, last, to)])

    def moved_all(self, moves: Iterable[SlotRange]) -> SlotTable:
        """A new table in which each (first, last, shard) of `moves` owns those slots (one copy of
        the table, however many ranges: a new shard's share is thousands of them)."""
        owners = list(self._owners)
        for first, last, to in moves:
            if not 0 <= first <= last < SLOT_COUNT:
                raise ValueError(f"slots {first}-{last} are not within 0-{SLOT_COUNT - 1}")
            if to not in self._shards:
                raise ValueError(f"shard {to} is not one of {sorted(self._shards)}")
            owners[first : last + 1] = [to] * (last - first + 1)
        return SlotTable(self._ring, owners, self._shards)

    def proposal_for(self, ring_with_new_shard: Ring, new_shard: int) -> list[SlotRange]:
        """The slots a new shard should take: those the ring, with it added, gives it (~1/(N+1) of
        them; the ring moves a slot only to an added shard). As ranges of (first, last, new_shard);
        each range may span several current owners."""
        if new_shard not in ring_with_new_shard.shard_ids:
            raise ValueError(f"shard {new_shard} is not in the ring {ring_with_new_shard.shard_ids}")
        taken = [s for s in range(SLOT_COUNT) if ring_with_new_shard.shard_for_slot(s) == new_shard]
        out: list[SlotRange] = []
        for slot in taken:
            if out and out[-1][1] == slot - 1:
                out[-1] = (out[-1][0], slot, new_shard)
            else:
                out.append((slot, slot, new_shard))
        return [r for r in out if any(self.shard_for_slot(s) != new_shard for s in range(r[0], r[1] + 1))]

    # -- value semantics ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotTable):
            return NotImplemented
        return all(self.shard_for_slot(s) == other.shard_for_slot(s) for s in range(SLOT_COUNT))

    __hash__ = None  # type: ignore[assignment]  # mutable cache inside; compared by content

    def __repr__(self) -> str:
        return f"SlotTable({self._ring!r}, {len(self.overrides())} override ranges)"


def ranges_overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> bool:
    """Whether two sorted lists of disjoint (first, last) ranges share a slot (one merge pass)."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False
