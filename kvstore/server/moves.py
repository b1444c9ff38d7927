"""The server side of a slot move's steps (Admin.MoveClaim, ExportKeys, ExportChanges,
ImportChanges, DropMoved), for the move's coordinator (kvstore/meta/mover.py).

Each checks its request (the shard it names, the move's claim here, bounded pages), then goes
through the `Shard` like any request: a claim, an import or a drop is a write (a log entry, at the
leader); an export is a strong read. What the claims mean: kvstore/replication/slot_claims.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.consistency import ConsistencyLevel
from kvstore.proto import kvstore_pb2 as pb
from kvstore.replication import commands
from kvstore.replication.slot_claims import IN_PHASES, OUT_PHASES, Claim, check_ranges
from kvstore.replication.views import Record
from kvstore.routing.ring import slot_of
from kvstore.server import validation as check

if TYPE_CHECKING:
    from kvstore.server.node import NodeContext

MAX_PAGE = 10_000  # keys or changes per export or drop call


def _check_common(ctx: NodeContext, shard: int, move: int) -> None:
    if shard != ctx.config.shard:
        raise errors.InvalidArgument(f"this node serves shard {ctx.config.shard}, not shard {shard}")
    if not 0 < move < 1 << 63:
        raise errors.InvalidArgument(f"move must be a positive id, not {move}")


def _limit(limit: int) -> int:
    if not 0 < limit <= MAX_PAGE:
        raise errors.InvalidArgument(f"limit must be 1 to {MAX_PAGE}, not {limit}")
    return limit


def _claim(ctx: NodeContext, move: int, side: str) -> Claim:
    claim = ctx.shard.claims.find(move, side)
    if claim is None or claim.phase == "aborted":
        what = "moving out" if side == "out" else "moving in"
        raise errors.InvalidArgument(f"shard {ctx.config.shard} has no live claim {what} for move {move}")
    return claim


async def move_claim(ctx: NodeContext, request: pb.MoveClaimRequest) -> pb.MoveClaimResponse:
    _check_common(ctx, request.shard, request.move)
    phases = OUT_PHASES if request.side == "out" else IN_PHASES if request.side == "in" else ()
    if request.phase not in phases:
        raise errors.InvalidArgument(
            f"side must be 'out' or 'in', and phase one of its phases (out: {', '.join(OUT_PHASES)}; "
            f"in: {', '.join(IN_PHASES)}), not {request.side!r} {request.phase!r}"
        )
    try:
        ranges = check_ranges((r.first, r.last) for r in request.ranges)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    op = commands.claim(request.move, ranges, request.side, request.phase, request.epoch)
    revision, _ = await ctx.shard.write(op)
    claim = ctx.shard.claims.find(request.move, "in")
    through = claim.imported_through if claim is not None and request.side == "in" else 0
    return pb.MoveClaimResponse(header=ctx.header(revision), imported_through=through)


async def export_keys(ctx: NodeContext, request: pb.ExportKeysRequest) -> pb.ExportKeysResponse:
    _check_common(ctx, request.shard, request.move)
    limit = _limit(request.limit)
    claim = _claim(ctx, request.move, "out")
    after = (request.after_slot, request.after_key) if request.resume else None
    if after is not None and not claim.covers(after[0]):
        raise errors.InvalidArgument(f"after_slot {after[0]} is outside move {request.move}'s slots")
    view = await ctx.shard.fresh_view(ConsistencyLevel.STRONG)
    _claim(ctx, request.move, "out")  # still moving out once fresh (not aborted meanwhile)
    budget = ctx.config.limits.max_response_bytes
    records: list[Record] = []
    following: tuple[int, bytes] | None = None
    applied = 0
    for first, last in claim.ranges:  # the ranges from the one `after` is in, while the page has room
        if after is not None and last < after[0]:
            continue
        # An empty after_key: from the start of the range after_slot begins (`_next_range_start`).
        start = after if after is not None and after[1] and first <= after[0] else None
        page, following, applied = view.slot_keys(first, last, start, limit - len(records), budget)
        records += page
        budget -= sum(len(r.key) + len(r.value) for r in page)
        if following is not None or len(records) >= limit or budget <= 0:
            if following is None:  # this range is done, the page is full: the next one from its start
                following = _next_range_start(claim.ranges, last)
            break
    response = pb.ExportKeysResponse(
        header=ctx.header(applied),
        keys=[r.key for r in records],
        values=[r.value for r in records],
        done=following is None,
    )
    if following is not None:
        response.next_slot, response.next_key = following
    return response


def _next_range_start(ranges: tuple[tuple[int, int], ...], last: int) -> tuple[int, bytes] | None:
    """Where a page resumes once the range ending at `last` is done: the next range's start (as a
    position before its first key), or None if it was the last range."""
    following = [first for first, _ in ranges if first > last]
    return (following[0], b"") if following else None


async def export_changes(ctx: NodeContext, request: pb.ExportChangesRequest) -> pb.ExportChangesResponse:
    _check_common(ctx, request.shard, request.move)
    limit = _limit(request.limit)
    _claim(ctx, request.move, "out")
    view = await ctx.shard.fresh_view(ConsistencyLevel.STRONG)
    budget = ctx.config.limits.max_response_bytes
    changes, applied = view.changes(request.move, request.after_revision, limit, budget)
    return pb.ExportChangesResponse(
        header=ctx.header(applied),
        keys=[c.key for c in changes],
        values=[c.value or b"" for c in changes],
        deleted=[c.value is None for c in changes],
        revisions=[c.revision for c in changes],
    )


async def import_changes(ctx: NodeContext, request: pb.ImportChangesRequest) -> pb.ImportChangesResponse:
    _check_common(ctx, request.shard, request.move)
    limits = ctx.config.limits
    claim = _claim(ctx, request.move, "in")
    keys, values = list(request.keys), list(request.values)
    if len(request.deleted) != len(keys) or len(values) != len(keys):
        raise errors.InvalidArgument("keys, values and deleted must pair up")
    if keys:
        check.check_pairs(keys, values, limits)
        outside = [k for k in keys if not claim.covers(slot_of(k))]
        if outside:
            raise errors.InvalidArgument(f"{len(outside)} key(s) are outside move {request.move}'s slots")
    changes = [(k, None if gone else v) for k, v, gone in zip(keys, values, request.deleted, strict=True)]
    revision, _ = await ctx.shard.write(commands.import_changes(request.move, changes, request.through))
    now = ctx.shard.claims.find(request.move, "in")
    return pb.ImportChangesResponse(
        header=ctx.header(revision), imported_through=now.imported_through if now is not None else 0
    )


async def drop_moved(ctx: NodeContext, request: pb.DropMovedRequest) -> pb.DropMovedResponse:
    _check_common(ctx, request.shard, request.move)
    limit = _limit(request.limit)
    revision, (keys, changes) = await ctx.shard.write(commands.drop_moved(request.move, limit))
    return pb.DropMovedResponse(header=ctx.header(revision), keys=keys, changes=changes)
