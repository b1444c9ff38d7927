"""A shard's side of slot moves without Raft (issue 16, item 3): claims and the phases they may
take, writes checked against claims as they apply, the source's change log (outcomes in order,
whole revisions per page), imports only while importing and only inside the range, drops only of
what moved away, and claims published to readers only once their batch is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import errors
from kvstore.replication import commands
from kvstore.replication.slot_claims import Claim, SlotClaims
from kvstore.replication.slot_moves import SlotMoves
from kvstore.routing.ring import slot_of
from kvstore.storage.engine import Storage


class Replica(SlotMoves):
    """The mixin over a real store, applying ops as the state machine does (one batch per call)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._init_slot_moves()
        self.index = 0

    def apply(self, op: commands.Op, commit: bool = True) -> object:
        self.index += 1
        if op[0] in commands.MOVE_OPS:
            result = self.apply_move_op(self.index, op)
        else:
            result = self.claims_refusal(op) or commands.apply_op(self._storage, self.index, op)
        self._storage.set_applied(self.index)
        if commit:
            self._storage.commit()
            self._publish_claims()
        return result


def _keys_in(first: int, last: int, count: int, tag: bytes = b"k") -> list[bytes]:
    keys = [tag + b"%d" % i for i in range(20_000)]
    return [k for k in keys if first <= slot_of(k) <= last][:count]


@pytest.fixture
def replica(tmp_path: Path) -> Replica:
    return Replica(Storage(tmp_path / "s", map_size=64 << 20, fsync=False))


RANGE = (0, 8191)


def test_claims_move_forward_only_and_repeat_harmlessly(replica: Replica) -> None:
    replica.apply(commands.claim(1, [RANGE], "out", "logging"))
    replica.apply(commands.claim(1, [RANGE], "out", "logging"))  # a coordinator's repeated step
    replica.apply(commands.claim(1, [RANGE], "out", "fenced"))
    for bad in (
        commands.claim(1, [RANGE], "out", "logging"),  # backwards
        commands.claim(1, [(0, 99)], "out", "gone"),  # another range for the same move
        commands.claim(2, [RANGE], "out", "gone"),  # skipping phases
        commands.claim(3, [RANGE], "in", "nonsense"),
        commands.claim(0, [RANGE], "in", "importing"),
    ):
        with pytest.raises(commands.OpRefused):
            replica.apply(bad)
    replica.apply(commands.claim(1, [RANGE], "out", "gone", 7))
    assert replica.claims.find(1, "out") == Claim(1, (RANGE,), "out", "gone", 7)
    # Kept in the store: a restarted replica (or one given a snapshot) has them.
    assert SlotClaims.from_blob(replica._storage.claims_blob()).find(1, "out") == Claim(
        1, (RANGE,), "out", "gone", 7
    )


def test_the_source_logs_writes_to_the_range_and_refuses_them_once_fenced(replica: Replica) -> None:
    inside, outside = _keys_in(*RANGE, 3), _keys_in(20_000, 65_535, 1)
    replica.apply(commands.put(inside[0], b"before"))  # before the move: not logged
    replica.apply(commands.claim(1, [RANGE], "out", "logging"))
    replica.apply(commands.put(inside[0], b"v1"))
    replica.apply(commands.multi_put([(inside[1], b"v2"), (inside[2], b"v3")]))
    replica.apply(commands.put(outside[0], b"elsewhere"))
    replica.apply(commands.delete([inside[1]]))
    changes, applied = replica._storage.changes(1, 0, 100, 1 << 20)
    assert [(c.key, c.value) for c in changes] == [
        (inside[0], b"v1"),
        (inside[1], b"v2"),
        (inside[2], b"v3"),
        (inside[1], None),
    ]
    assert applied == replica.index
    # Pages end on whole revisions, and resume after one: the multi-put is never split.
    first, _ = replica._storage.changes(1, 0, 2, 1 << 20)
    assert [c.key for c in first] == [inside[0], inside[1], inside[2]]
    rest, _ = replica._storage.changes(1, first[-1].revision, 2, 1 << 20)
    assert [(c.key, c.value) for c in rest] == [(inside[1], None)]

    replica.apply(commands.claim(1, [RANGE], "out", "fenced"))
    refused = replica.apply(commands.put(inside[0], b"after the fence"))
    assert isinstance(refused, commands.Refused) and isinstance(refused.error(), errors.Moving)
    assert replica._storage.get(inside[0]).value == b"v1"  # nothing written
    assert replica.apply(commands.put(outside[0], b"still fine")) is None
    replica.apply(commands.claim(1, [RANGE], "out", "gone", 9))
    gone = replica.apply(commands.delete([inside[0]]))
    assert isinstance(gone, commands.Refused)
    assert isinstance(gone.error(), errors.WrongShard) and gone.error().epoch == 9


def test_the_target_takes_only_its_moves_imports_until_it_serves(replica: Replica) -> None:
    keys = _keys_in(*RANGE, 3)
    with pytest.raises(commands.OpRefused, match="not importing"):
        replica.apply(commands.import_changes(5, [(keys[0], b"x")], 0))
    replica.apply(commands.claim(5, [RANGE], "in", "importing"))
    refused = replica.apply(commands.put(keys[0], b"a client's"))
    assert isinstance(refused, commands.Refused) and refused.kind == errors.Moving.kind
    with pytest.raises(commands.OpRefused, match="outside"):
        replica.apply(commands.import_changes(5, [(_keys_in(30_000, 65_535, 1)[0], b"x")], 0))
    replica.apply(commands.import_changes(5, [(keys[0], b"copied"), (keys[1], b"copied")], 0))
    replica.apply(commands.import_changes(5, [(keys[1], None), (keys[2], b"new"), (keys[0], b"newer")], 41))
    assert replica.claims.find(5, "in").imported_through == 41
    replica.apply(commands.import_changes(5, [], 17))  # an older round again: the mark stays
    assert replica.claims.find(5, "in").imported_through == 41
    assert [replica._storage.get(k) and replica._storage.get(k).value for k in keys] == [
        b"newer",
        None,
        b"new",
    ]
    replica.apply(commands.claim(5, [RANGE], "in", "serving", 3))
    assert replica.claims.verdict([slot_of(keys[0])]).state == "owned"
    assert replica.apply(commands.put(keys[0], b"a client's")) is None


def test_an_aborted_import_is_dropped_and_a_gone_range_cleaned_a_page_at_a_time(tmp_path: Path) -> None:
    target = Replica(Storage(tmp_path / "t", map_size=64 << 20, fsync=False))
    keys = _keys_in(*RANGE, 25)
    target.apply(commands.claim(8, [RANGE], "in", "importing"))
    target.apply(commands.import_changes(8, [(k, b"v") for k in keys], 0))
    target.apply(commands.claim(8, [RANGE], "in", "aborted"))
    assert not target.claims  # aborted claims say nothing
    dropped = [target.apply(commands.drop_moved(8, 10)) for _ in range(4)]
    assert dropped == [(10, 0), (10, 0), (5, 0), (0, 0)]
    assert target._storage.key_count() == 0

    source = Replica(Storage(tmp_path / "s", map_size=64 << 20, fsync=False))
    other = _keys_in(30_000, 65_535, 2)
    source.apply(commands.multi_put([(k, b"v") for k in keys + other]))
    source.apply(commands.claim(9, [RANGE], "out", "logging"))
    source.apply(commands.put(keys[0], b"logged"))
    with pytest.raises(commands.OpRefused):  # not before the range is gone: it still owns it
        source.apply(commands.drop_moved(9, 0))
    source.apply(commands.claim(9, [RANGE], "out", "fenced"))
    source.apply(commands.claim(9, [RANGE], "out", "gone", 4))
    assert source.apply(commands.drop_moved(9, 100)) == (25, 1)
    assert source.apply(commands.drop_moved(9, 100)) == (0, 0)
    assert source._storage.key_count() == len(other)


def test_a_claim_may_hold_many_ranges_and_only_those(tmp_path: Path) -> None:
    replica = Replica(Storage(tmp_path / "m", map_size=64 << 20, fsync=False))
    ranges = [(10, 19), (100, 100), (40_000, 40_999)]
    replica.apply(commands.claim(4, ranges, "out", "logging"))
    replica.apply(commands.claim(4, ranges, "out", "fenced"))
    assert [replica.claims.verdict([s]).state for s in (9, 10, 19, 20, 100, 101, 40_500, 41_000)] == [
        "none",
        "moving",
        "moving",
        "none",
        "moving",
        "none",
        "moving",
        "none",
    ]
    for bad in ([(5, 1)], [(10, 20), (15, 30)], [(0, 65_536)], []):  # reversed, overlapping, outside, none
        with pytest.raises(commands.OpRefused):
            replica.apply(commands.claim(6, bad, "out", "logging"))


def test_claims_reach_readers_only_once_committed(replica: Replica) -> None:
    replica.apply(commands.claim(2, [RANGE], "out", "logging"), commit=False)
    assert not replica.claims  # readers still see the committed (empty) claims
    assert replica.claims_refusal(commands.put(_keys_in(*RANGE, 1)[0], b"x")) is None
    replica._storage.abort()  # the batch is rolled back...
    replica._reload_claims()
    assert not replica.claims and not replica._claims_in_batch  # ...and so are its claims
    replica.apply(commands.claim(2, [RANGE], "out", "logging"))
    assert replica.claims.find(2, "out") is not None


def test_export_pages_walk_many_ranges_listing_each_key_once(tmp_path: Path) -> None:
    """Admin.ExportKeys over a claim of thousands of one-slot ranges (a new shard's share), in
    pages that end inside a range and at a range's end (resuming from the next range's start,
    with an empty after_key, which LMDB cannot position on): every key once, nothing else."""
    import asyncio
    import types

    from kvstore.config import Limits
    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.replication.views import ReadView
    from kvstore.server import moves

    storage = Storage(tmp_path / "x", map_size=256 << 20, fsync=False)
    keys = [b"mb:%08d" % i for i in range(30_000)]
    storage.put_many(tuple((k, b"v" * 100) for k in keys), 5)
    storage.set_applied(5)
    storage.commit()
    ranges = tuple((s, s) for s in sorted({slot_of(k) for k in keys} - {0})[::3])
    claims = SlotClaims((Claim(1, ranges, "out", "logging"),))

    async def fresh_view(level: object) -> ReadView:
        return ReadView(storage)

    ctx = types.SimpleNamespace(
        config=types.SimpleNamespace(shard=0, limits=Limits()),
        shard=types.SimpleNamespace(claims=claims, fresh_view=fresh_view),
        header=lambda applied: pb.ResponseHeader(revision=applied),
    )

    async def export_all() -> tuple[list[bytes], int]:
        listed: list[bytes] = []
        request = pb.ExportKeysRequest(shard=0, move=1, limit=700)
        for pages in range(1, 1000):
            answer = await moves.export_keys(ctx, request)  # type: ignore[arg-type]
            listed += answer.keys
            if answer.done:
                return listed, pages
            request = pb.ExportKeysRequest(
                shard=0,
                move=1,
                limit=700,
                resume=True,
                after_slot=answer.next_slot,
                after_key=answer.next_key,
            )
        raise AssertionError("no end")

    listed, pages = asyncio.run(export_all())
    wanted = [k for k in keys if claims.claims[0].covers(slot_of(k))]
    assert sorted(listed) == sorted(wanted) and len(set(listed)) == len(listed)
    assert pages > 5
