"""Placement is data (issue 16, item 1): the map's slot table routes keys; a map without one routes
as its ring did; a table moved by `with_slots_moved` survives the map file and the wire; a table
from outside is checked; the ring proposes what a new shard takes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo
from kvstore.routing.ring import SLOT_COUNT, Ring, slot_of
from kvstore.routing.slot_table import SlotTable


def _map(shards: int = 3, **fields: object) -> ClusterMap:
    infos = tuple(
        ShardInfo(s, (ReplicaInfo(f"s{s}r0", f"127.0.0.1:{7000 + s}", f"127.0.0.1:{8000 + s}"),))
        for s in range(shards)
    )
    return ClusterMap(1, infos, 64, **fields)  # type: ignore[arg-type]


def test_a_map_without_a_table_routes_every_slot_as_its_ring_and_stores_none() -> None:
    cluster_map = _map()
    ring = cluster_map.ring
    assert all(cluster_map.slots.shard_for_slot(s) == ring.shard_for_slot(s) for s in range(SLOT_COUNT))
    assert "slots" not in json.loads(cluster_map.to_json())
    assert len(cluster_map.to_proto().slots) == 0
    again = ClusterMap.from_proto(cluster_map.to_proto())
    assert again.slot_ranges == () and again.slots == cluster_map.slots
    assert sum(cluster_map.slots.slot_counts().values()) == SLOT_COUNT
    assert cluster_map.slots.overrides() == []


def test_moved_slots_route_to_their_new_owner_in_the_next_epoch_and_survive_file_and_wire() -> None:
    before = _map()
    first, last = 1000, 1999
    target = next(s for s in range(3) if s != before.slots.shard_for_slot(first))
    after = before.with_slots_moved((first, last, target))
    assert after.epoch == before.epoch + 1
    for slot in range(SLOT_COUNT):
        expected = target if first <= slot <= last else before.slots.shard_for_slot(slot)
        assert after.slots.shard_for_slot(slot) == expected
    key = next(b"k%d" % i for i in range(100_000) if first <= slot_of(b"k%d" % i) <= last)
    assert after.shard_for(key).id == target
    assert after.slots.all_on(target, [key]) and not before.slots.all_on(target, [key])
    # Stored as what differs from the ring: one range (a ring-born table would be ~34,000), and
    # identical after the map file and the wire.
    assert len(after.slot_ranges) == 1 and after.slot_ranges[0][0] == first
    for again in (ClusterMap.from_json(after.to_json()), ClusterMap.from_proto(after.to_proto())):
        assert again.slot_ranges == after.slot_ranges and again.slots == after.slots
        assert again.epoch == after.epoch
    with pytest.raises(errors.UnknownShard):
        before.with_slots_moved((0, 10, 7))


@pytest.mark.parametrize(
    ("ranges", "why"),
    [
        ([[0, SLOT_COUNT, 0]], "not within"),
        ([[5, 1, 0]], "not within"),
        ([[-1, 3, 0]], "not within"),
        ([[0, SLOT_COUNT - 1, 9]], "names shard 9"),
        ([[0, SLOT_COUNT - 1, True]], "non-integer"),
        ([[0, "x", 1]], "non-integer"),
        ([[0, 10]], "not \\[first, last, shard\\]"),
        ([[0, 100, 0], [50, 200, 1]], "before the end of the one before it"),
        ([[10, 20, 0], [5, 6, 1]], "before the end of the one before it"),
    ],
)
def test_a_bad_table_from_outside_is_refused_with_the_reason(ranges: list[list[object]], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        SlotTable.from_overrides(Ring([0, 1, 2], 16), ranges)
    text = json.loads(_map().to_json())
    text["slots"] = ranges
    with pytest.raises(errors.KvError, match="bad slot table|must be a list of"):
        ClusterMap.from_json(json.dumps(text))


def test_a_table_of_the_wrong_shape_in_a_map_file_is_refused() -> None:
    text = json.loads(_map().to_json())
    text["slots"] = {"0": 1}
    with pytest.raises(errors.KvError, match="list of"):
        ClusterMap.from_json(json.dumps(text))


def test_a_map_of_another_key_placement_is_refused_even_with_a_table() -> None:
    table = tuple(_map().with_slots_moved((0, 9, 1)).slot_ranges)
    with pytest.raises(errors.KvError, match="placement"):
        _map(placement="md5-ring", slot_ranges=table)


def test_a_shard_added_to_the_map_owns_nothing_until_the_slots_the_ring_proposes_move_to_it() -> None:
    born = _map(3)
    grown = dataclasses.replace(_map(4), ring_shards=(0, 1, 2))  # shard 3 joined the map, not the ring
    assert grown.slots == born.slots and 3 not in grown.slots.slot_counts()
    again = ClusterMap.from_json(grown.to_json())
    assert again.ring_shards == (0, 1, 2) and ClusterMap.from_proto(grown.to_proto()).ring_shards == (0, 1, 2)
    proposal = grown.slots.proposal_for(born.ring.with_shard(3), 3)
    moved = sum(last - first + 1 for first, last, _ in proposal)
    assert abs(moved / SLOT_COUNT - 1 / 4) < 0.03  # about 1/(N+1)
    grown = grown.with_slots_moved(*proposal)
    # Exactly the ring's placement with the new shard: only slots it took moved, none between old shards.
    assert grown.slots == SlotTable.from_ring(born.ring.with_shard(3))
    with pytest.raises(errors.KvError, match="ring shards \\[7\\]"):
        dataclasses.replace(born, ring_shards=(0, 7))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, SLOT_COUNT - 1), st.integers(0, 300), st.integers(0, 2)), max_size=6)
)
def test_any_sequence_of_moves_matches_a_plain_list(moves: list[tuple[int, int, int]]) -> None:
    ring = Ring([0, 1, 2], 16)
    table = SlotTable.from_ring(ring)
    model = [ring.shard_for_slot(s) for s in range(SLOT_COUNT)]
    for first, length, to in moves:
        last = min(SLOT_COUNT - 1, first + length)
        table = table.moved(first, last, to)
        model[first : last + 1] = [to] * (last - first + 1)
    assert [table.shard_for_slot(s) for s in range(SLOT_COUNT)] == model
    again = SlotTable.from_overrides(ring, table.overrides())
    assert again == table and again.overrides() == table.overrides()
    assert len(table.overrides()) <= 3 * len(moves)  # a move adds at most a range and splits one
    assert sum(table.slot_counts().values()) == SLOT_COUNT


def test_a_map_with_a_bad_ring_is_refused_as_a_kv_error() -> None:
    text = json.loads(_map().to_json())
    text["ring_shards"] = [0, 0, 1]
    with pytest.raises(errors.KvError, match="bad ring"):
        ClusterMap.from_json(json.dumps(text))
