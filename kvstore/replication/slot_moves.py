"""Applying slot moves: a mixin of `ShardStateMachine` (tick thread) for the move ops and the
claims they change (kvstore/replication/slot_claims.py says what claims mean).

- `claim`: set this shard's claim on a move (the phases only move forward, or to `aborted`; the
  same phase again is a no-op, so a coordinator that resumes may repeat any step).
- `import`: the destination writes a batch of the source's changes, in order, only while it is
  importing that move and only inside its range; it records the source revision they reach.
- `dropmoved`: deletes a bounded number of keys of a range that moved away (or of an aborted
  import) and of the move's change log. Repeated until it drops nothing.

Every other write is checked against the claims as it applies (`claims_refusal`). Claims are
published to readers (`claims`) only once the batch that changed them is committed: a reader
never sees a destination "serving" before the imports before it are readable.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvstore.replication import commands
from kvstore.replication.slot_claims import Claim, SlotClaims, check_ranges
from kvstore.routing.ring import slot_of
from kvstore.storage.engine import Storage

# Allowed phase changes (a phase to itself is always allowed: a repeated step).
_NEXT = {
    None: ("logging", "importing", "aborted"),
    "logging": ("fenced", "aborted"),
    "fenced": ("gone", "aborted"),
    "importing": ("serving", "aborted"),
    "gone": (),
    "serving": (),
    "aborted": (),
}


class SlotMoves:
    _storage: Storage

    def _init_slot_moves(self) -> None:
        self.claims = SlotClaims.from_blob(self._storage.claims_blob())  # published: committed
        self._claims_in_batch = self.claims
        self._storage.set_exporting(self.claims.exporting())

    def _publish_claims(self) -> None:
        """The batch is committed: readers may see its claims."""
        self.claims = self._claims_in_batch

    def _reload_claims(self) -> None:
        """After a rollback or a snapshot install: the claims are what storage has committed."""
        self._claims_in_batch = SlotClaims.from_blob(self._storage.claims_blob())
        self.claims = self._claims_in_batch
        self._storage.set_exporting(self.claims.exporting())

    def claims_refusal(self, op: commands.Op) -> commands.Refused | None:
        """Why a client write must not apply under the claims as of this entry (None: it may)."""
        claims = self._claims_in_batch
        if not claims or op[0] in commands.MOVE_OPS:
            return None
        refusal = claims.write_refusal(map(slot_of, commands.touched_keys(op)))
        if refusal is None:
            return None
        return commands.Refused(refusal.kind, refusal.message, getattr(refusal, "epoch", 0))

    def apply_move_op(self, revision: int, op: commands.Op) -> Any:
        kind = op[0]
        if kind == commands.CLAIM:
            return self._apply_claim(op)
        if kind == commands.IMPORT:
            return self._apply_import(revision, op)
        if kind == commands.DROP_MOVED:
            return self._apply_drop(op)
        raise commands.OpRefused(f"unknown move op {kind!r}")

    def _set_claims(self, claims: SlotClaims) -> None:
        self._storage.set_claims_blob(claims.to_blob())
        self._claims_in_batch = claims
        self._storage.set_exporting(claims.exporting())

    def _apply_claim(self, op: commands.Op) -> None:
        if len(op) != 6:
            raise commands.OpRefused("malformed claim")
        _, move, ranges, side, phase, epoch = op
        try:
            claim = Claim(int(move), check_ranges(ranges), str(side), str(phase), int(epoch))
            claim.check()
        except (TypeError, ValueError) as exc:
            raise commands.OpRefused(f"bad claim: {exc}") from None
        claims = self._claims_in_batch
        current = claims.find(claim.move, claim.side)
        if current is not None:
            if current.ranges != claim.ranges:
                raise commands.OpRefused(f"move {claim.move} claims other slots here")
            if current.phase == claim.phase:
                return None  # a repeated step
            claim = replace(current, phase=claim.phase, epoch=claim.epoch or current.epoch)
        if claim.phase not in _NEXT[current.phase if current else None]:
            was = current.phase if current else "nothing"
            raise commands.OpRefused(
                f"move {claim.move} ({claim.side}) cannot go from {was} to {claim.phase}"
            )
        self._set_claims(claims.with_claim(claim))
        return None

    def _apply_import(self, revision: int, op: commands.Op) -> int:
        if len(op) != 4:
            raise commands.OpRefused("malformed import")
        _, move, changes, through = op
        claims = self._claims_in_batch
        claim = claims.find(move, "in")
        if claim is None or claim.phase != "importing":
            raise commands.OpRefused(f"this shard is not importing move {move}")
        for key, _ in changes:
            if not claim.covers(slot_of(key)):
                raise commands.OpRefused(f"a key of move {move}'s import is outside its slots")
        storage = self._storage
        for key, value in changes:
            if value is None:
                storage.delete(key, revision)
            else:
                storage.put(key, value, revision)
        if through > claim.imported_through:
            self._set_claims(claims.with_imported(move, through))
        return len(changes)

    def _apply_drop(self, op: commands.Op) -> tuple[int, int]:
        if len(op) != 3 or not isinstance(op[2], int) or op[2] < 1:
            raise commands.OpRefused("malformed drop")
        _, move, limit = op
        claims = self._claims_in_batch
        out, into = claims.find(move, "out"), claims.find(move, "in")
        mine = out or into
        if mine is not None and any(
            c.move > move and c.phase != "aborted" and c.overlaps(mine) for c in claims.claims
        ):
            raise commands.OpRefused(f"a later move claims slots of move {move}: its keys are not dropped")
        keys = 0
        dropping = out if out is not None and out.phase == "gone" else into
        if dropping is not None and (dropping is out or dropping.phase == "aborted"):
            for first, last in dropping.ranges:
                keys += self._storage.drop_slot_range(first, last, limit - keys)
                if keys >= limit:
                    break
        elif out is None and into is None:
            raise commands.OpRefused(f"this shard has no part in move {move}")
        changes = (
            self._storage.drop_changes(move, limit)
            if out is not None and out.phase in ("gone", "aborted")
            else 0
        )
        return keys, changes
