"""Tests for kvstore.routing.ring: balance, minimal movement, hash tags, determinism, partitioning.

The balance/movement tests route 1M deterministic keys. Each key is hashed once to its slot
(``slot_of``) and routed with ``Ring.shard_for_slot``; ``test_shard_for_is_slot_then_route`` pins
that this is exactly what ``shard_for`` does, so the fast path tests the real mapping.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.routing.ring import (
    RING_SIZE,
    SLOT_COUNT,
    Ring,
    key_hash,
    probe_hashes,
    routing_key,
    slot_of,
    slot_point,
    slots_of,
)
from kvstore.routing.slot_table import SlotTable

N_KEYS = 1_000_000


SEED = 20240601


@pytest.fixture(scope="module")
def key_slots() -> list[int]:
    rng = random.Random(SEED)
    return [slot_of(rng.randbytes(16)) for _ in range(N_KEYS)]


@pytest.fixture(scope="module")
def owners8(key_slots: list[int]) -> list[int]:
    ring = Ring(range(8), vnodes_per_shard=256)
    return [ring.shard_for_slot(s) for s in key_slots]


def _max_over_mean(owners: Sequence[int], n_shards: int) -> float:
    counts = Counter(owners)
    assert set(counts) <= set(range(n_shards))
    return max(counts.values()) / (len(owners) / n_shards)


def test_balance_8_shards_1m_keys(owners8: list[int]) -> None:
    ratio = _max_over_mean(owners8, 8)
    print(f"8 shards x 256 vnodes, 1M keys: max/mean = {ratio:.4f}")
    assert ratio <= 1.10


@pytest.mark.parametrize("n_shards", [3, 5, 8, 16])
def test_balance_other_shard_counts_200k_keys(key_slots: list[int], n_shards: int) -> None:
    ring = Ring(range(n_shards))
    ratio = _max_over_mean([ring.shard_for_slot(s) for s in key_slots[:200_000]], n_shards)
    print(f"{n_shards} shards, 200k keys: max/mean = {ratio:.4f}")
    assert ratio <= 1.15


def test_ownership_matches_sampled_load(owners8: list[int]) -> None:
    # The analytic per-shard fractions must agree with 1M sampled keys to within sampling noise
    # (binomial std at p=1/8, n=1M is ~3.3e-4; allow ~5 std).
    expected = Ring(range(8)).ownership()
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-9)
    counts = Counter(owners8)
    for shard, fraction in expected.items():
        assert counts[shard] / N_KEYS == pytest.approx(fraction, abs=1.7e-3)


def test_exact_balance_holds_across_shard_counts() -> None:
    # Noise-free check of the scheme for every shard count 2..32 (ownership() counts every slot).
    worst = {}
    for n in range(2, 33):
        worst[n] = max(Ring(range(n)).ownership().values()) * n
    print("exact max/mean by shard count:", {n: round(r, 3) for n, r in worst.items()})
    assert max(worst.values()) <= 1.10


def test_single_probe_ownership_is_arc_length() -> None:
    # With probes=1 the ring is the classic successor ring: a shard owns the arcs that end at its
    # points. Computed here independently from vnode_points(); slots quantise each arc to whole
    # slots, so a shard's share may be off by up to one slot per arc.
    ring = Ring([2, 5, 11], vnodes_per_shard=32, probes=1)
    points = sorted((p, s) for s in ring.shard_ids for p in ring.vnode_points(s))
    arcs = Counter[int]()
    prev = points[-1][0] - RING_SIZE
    for p, s in points:
        arcs[s] += p - prev
        prev = p
    for shard, fraction in ring.ownership().items():
        assert fraction == pytest.approx(arcs[shard] / RING_SIZE, abs=32 / SLOT_COUNT)


def test_adding_ninth_shard_moves_about_one_ninth_only_to_it(
    key_slots: list[int], owners8: list[int]
) -> None:
    ring9 = Ring(range(8)).with_shard(8)
    moved_to = Counter(
        after
        for s, before in zip(key_slots, owners8, strict=True)
        if (after := ring9.shard_for_slot(s)) != before
    )
    fraction = sum(moved_to.values()) / N_KEYS
    print(f"adding shard 8: moved {fraction:.4f} of keys (1/9 = {1 / 9:.4f})")
    assert set(moved_to) == {8}
    assert 0.8 / 9 <= fraction <= 1.2 / 9


def test_with_shard_keeps_existing_points_and_config() -> None:
    ring = Ring([0, 1, 2], vnodes_per_shard=64, probes=2)
    grown = ring.with_shard(7)
    assert grown == Ring([0, 1, 2, 7], vnodes_per_shard=64, probes=2)
    for s in ring.shard_ids:
        assert grown.vnode_points(s) == ring.vnode_points(s)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.sets(st.integers(0, 10_000), min_size=1, max_size=5),
    new=st.integers(0, 10_000),
    vnodes=st.integers(1, 16),
    probes=st.integers(1, 4),
    keys=st.lists(st.binary(max_size=24), min_size=1, max_size=50),
)
def test_keys_only_ever_move_to_the_added_shard(
    ids: set[int], new: int, vnodes: int, probes: int, keys: list[bytes]
) -> None:
    if new in ids:
        new = max(ids) + 1
    before = Ring(ids, vnodes, probes)
    after = before.with_shard(new)
    for key in keys:
        assert after.shard_for(key) in (before.shard_for(key), new)


def _redis_tag(key: bytes) -> bytes:
    """Independent oracle: Redis Cluster's rule written as a regex."""
    m = re.match(rb"[^{]*\{([^}]+)\}", key)
    return m.group(1) if m else key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"", b""),
        (b"plain", b"plain"),
        (b"{", b"{"),
        (b"}", b"}"),
        (b"{}", b"{}"),
        (b"}{", b"}{"),
        (b"{}x", b"{}x"),
        (b"{}{a}", b"{}{a}"),  # only the first '{' counts; its tag is empty, so hash the whole key
        (b"{ab", b"{ab"),
        (b"{a}", b"a"),
        (b"{user:42}:name", b"user:42"),
        (b"user:{42}", b"42"),  # tag at the end
        (b"a{b}c{d}", b"b"),  # first tag wins
        (b"{{a}}", b"{a"),  # nested: first '{' to the first '}' after it
        (b"x}{y}", b"y"),  # a '}' before the first '{' is ignored
        (b"\xff{\xe4\xb8\xad}\x00", b"\xe4\xb8\xad"),  # non-ASCII bytes
        (b"{\x00}", b"\x00"),
    ],
)
def test_routing_key_edge_cases(key: bytes, expected: bytes) -> None:
    assert routing_key(key) == expected
    assert _redis_tag(key) == expected  # keeps the oracle itself honest


@given(st.binary(max_size=40))
def test_routing_key_matches_redis_rule(key: bytes) -> None:
    assert routing_key(key) == _redis_tag(key)


RING8 = Ring(range(8))


_no_open = st.binary(max_size=12).filter(lambda b: b"{" not in b)


_tag = st.binary(min_size=1, max_size=12).filter(lambda b: b"}" not in b)


@given(tag=_tag, parts=st.lists(st.tuples(_no_open, st.binary(max_size=12)), min_size=2, max_size=5))
def test_keys_sharing_a_tag_share_a_shard(tag: bytes, parts: list[tuple[bytes, bytes]]) -> None:
    keys = [prefix + b"{" + tag + b"}" + suffix for prefix, suffix in parts]
    assert {routing_key(k) for k in keys} == {tag}
    assert {RING8.shard_for(k) for k in keys} == {RING8.shard_for(tag)}
    assert len(SlotTable.from_ring(RING8).shards_for(keys)) == 1


def test_tag_groups_spread_over_shards() -> None:
    # Tags must not collapse routing: different tags still spread over all shards.
    shards = {RING8.shard_for(b"{user:%d}:name" % i) for i in range(400)}
    assert shards == set(range(8))


def test_key_hash_is_blake2b_64_big_endian() -> None:
    for data in (b"", b"hello", bytes(range(256))):
        assert key_hash(data) == int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    # Golden value (RFC 7693 BLAKE2b, 8-byte digest): guards against silent algorithm changes.
    assert key_hash(b"hello") == 12085107955937391741


def test_placement_golden_values() -> None:
    # Placement is a persistent contract: if these change, existing data would be looked up on the
    # wrong shard. Change them only together with a data-migration plan.
    ring = Ring(range(8))
    assert ring.vnode_points(0)[:2] == [15770187708444666702, 13365080852966793814]
    assert [slot_of(k) for k in (b"", b"a", b"user:42", b"{user:42}:x")] == [0, 48707, 3462, 3462]
    assert [ring.shard_for(k) for k in (b"", b"a", b"user:42", b"\xff\x00")] == [2, 2, 2, 7]


def test_same_ring_regardless_of_input_order() -> None:
    a, b = Ring(range(8)), Ring([5, 3, 7, 0, 2, 6, 1, 4])
    assert a == b and hash(a) == hash(b)
    assert b.shard_ids == tuple(range(8))
    keys = [b"k%d" % i for i in range(5000)]
    assert [a.shard_for(k) for k in keys] == [b.shard_for(k) for k in keys]
    assert a.ownership() == b.ownership()


def test_shard_for_is_slot_then_route() -> None:
    for i in range(2000):
        key = b"{t%d}x" % (i % 50) if i % 3 == 0 else b"key-%d" % i
        assert slot_of(key) == zlib.crc32(routing_key(key)) & 0xFFFF
        assert RING8.shard_for(key) == RING8.shard_for_slot(slot_of(key))
    keys = [b"{t%d}x" % i if i % 3 == 0 else b"key-%d" % i for i in range(200)]
    assert slots_of(keys) == [slot_of(k) for k in keys]


def test_slots_spread_sequential_keys() -> None:
    # CRC-32 is linear, so check it does not cluster the keys people actually write.
    for pattern in (b"key-%d", b"user:%08d"):
        slots = Counter(slot_of(pattern % i) for i in range(N_KEYS))
        assert len(slots) == SLOT_COUNT  # every slot used (random keys: ~15 per slot)
        assert max(slots.values()) < 3 * N_KEYS / SLOT_COUNT  # seen: 30 of a mean 15


_rings = st.builds(
    Ring,
    shard_ids=st.sets(st.integers(0, 2**63 - 1), min_size=1, max_size=6),
    vnodes_per_shard=st.integers(1, 16),
    probes=st.integers(1, 4),
)


def _brute_force_owner(ring: Ring, key: bytes) -> tuple[int, int, int]:
    """Oracle: the key's slot is its routing key's CRC-32 mod 2**16; over every probe of the slot's point
    and every vnode, the smallest clockwise distance wins.

    Ties break by probe order, then by (point, shard, vnode index) -- the documented rule.
    Returns (shard, vnode index, winning probe).
    """
    vnodes = sorted((p, s, i) for s in ring.shard_ids for i, p in enumerate(ring.vnode_points(s)))
    candidates = []
    slot = zlib.crc32(routing_key(key)) % SLOT_COUNT
    for j, probe in enumerate(probe_hashes(slot * (RING_SIZE // SLOT_COUNT), ring.probes)):
        dist, _, shard, index = min(((p - probe) % RING_SIZE, p, s, i) for p, s, i in vnodes)
        candidates.append((dist, j, shard, index))
    dist, j, shard, index = min(candidates)
    return shard, index, j


@settings(max_examples=60, deadline=None)
@given(ring=_rings, keys=st.lists(st.binary(max_size=20), max_size=20))
def test_shard_for_matches_brute_force_and_explain(ring: Ring, keys: list[bytes]) -> None:
    for key in keys:
        shard = ring.shard_for(key)
        assert shard in ring.shard_ids
        info = ring.explain(key)
        assert (info["shard"], info["vnode_owner_index"], info["winning_probe"]) == _brute_force_owner(
            ring, key
        )
        assert info["shard"] == shard
        assert info["key"] == key and info["routing_key"] == routing_key(key)
        assert info["slot"] == slot_of(key) and info["probes"][0] == slot_point(info["slot"])
        assert info["vnode_point"] == ring.vnode_points(shard)[info["vnode_owner_index"]]


@settings(max_examples=60, deadline=None)
@given(ring=_rings, keys=st.lists(st.binary(max_size=8), max_size=60))
def test_shards_for_partitions_input_preserving_order(ring: Ring, keys: list[bytes]) -> None:
    groups = SlotTable.from_ring(ring).shards_for(keys)
    assert set(groups) <= set(ring.shard_ids)
    assert all(groups.values())  # no empty groups
    assert sorted(k for g in groups.values() for k in g) == sorted(keys)  # a partition, duplicates kept
    for shard, group in groups.items():
        assert group == [k for k in keys if ring.shard_for(k) == shard]


@settings(max_examples=60, deadline=None)
@given(ring=_rings, keys=st.lists(st.binary(max_size=8), max_size=8))
def test_all_on_is_every_key_on_that_shard(ring: Ring, keys: list[bytes]) -> None:
    for shard in ring.shard_ids:
        assert SlotTable.from_ring(ring).all_on(shard, keys) == all(ring.shard_for(k) == shard for k in keys)


def test_shards_for_accepts_iterators() -> None:
    keys = [b"a", b"b", b"{a}1", b"c", b"{a}2"]
    groups = SlotTable.from_ring(RING8).shards_for(iter(keys))
    assert sorted(k for g in groups.values() for k in g) == sorted(keys)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([],), {}, "at least one shard"),
        (([1],), {"vnodes_per_shard": 0}, "vnodes_per_shard"),
        (([1],), {"vnodes_per_shard": -3}, "vnodes_per_shard"),
        (([1],), {"probes": 0}, "probes"),
        (([1, 2, 1],), {}, "duplicate"),
        (([-1],), {}, "shard id"),
        ((["1"],), {}, "shard id"),
    ],
)
def test_invalid_rings_raise_clear_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ring(*args, **kwargs)


def test_membership_errors() -> None:
    ring = Ring([1, 2])
    with pytest.raises(ValueError, match="already in the ring"):
        ring.with_shard(2)
    with pytest.raises(ValueError, match="not in the ring"):
        ring.vnode_points(3)


def test_eq_and_repr() -> None:
    ring = Ring([3, 1], vnodes_per_shard=8, probes=2)
    assert repr(ring) == "Ring(shard_ids=(1, 3), vnodes_per_shard=8, probes=2)"
    assert eval(repr(ring), {"Ring": Ring}) == ring
    assert ring != Ring([1, 3], vnodes_per_shard=9, probes=2)
    assert ring != Ring([1, 3], vnodes_per_shard=8, probes=3)
    assert ring != Ring([1, 3, 4], vnodes_per_shard=8, probes=2)
    assert ring != (1, 3)
    assert ring.vnodes_per_shard == 8 and len(ring.vnode_points(1)) == 8


def test_cluster_maps_record_their_placement_and_refuse_another() -> None:
    import json

    from kvstore.errors import KvError
    from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo
    from kvstore.routing.ring import PLACEMENT

    cluster_map = ClusterMap(3, (ShardInfo(0, (ReplicaInfo("s0r0", "127.0.0.1:1", "127.0.0.1:2"),)),))
    saved = json.loads(cluster_map.to_json())
    assert saved["placement"] == PLACEMENT
    assert ClusterMap.from_json(json.dumps(saved)) == cluster_map
    for placement in (None, "blake2b-ring"):  # a map from before slots has no placement at all
        if placement is None:
            del saved["placement"]
        else:
            saved["placement"] = placement
        old = ClusterMap.from_json(json.dumps(saved))
        assert old.shard(0).replicas[0].name == "s0r0"  # still readable: can be stopped and removed
        with pytest.raises(KvError, match="wrong shards"):
            old.ring  # noqa: B018 (but never used to route a key)
        with pytest.raises(KvError, match="wrong shards"):
            old.shard_for(b"k")
