"""A shard's claims on slot ranges that move in or out: ownership as entries in its own log.

The cluster map says which shard owns a slot, and every node follows it within a second; but two
replicas of one shard may hold different epochs for a moment, and a leader change must never make
them disagree on whether a write to a moving slot was taken. So each step of a move that changes
what a shard accepts is an entry in *that shard's* Raft log (a `claim` op: kvstore/replication/
commands.py), and every replica applies it at the same index (docs/architecture.md, "Moving
slots"). A claim names the move, the slot range, this shard's side and the phase:

- out (the source): `logging` (writes still taken, each logged for the destination: storage's
  change log), `fenced` (writes and fresh reads refused: `Moving`, retried by clients), `gone`
  (the destination owns it from `epoch`: `WrongShard`), `aborted` (no effect).
- in (the destination): `importing` (only the move's import entries write it; clients refused),
  `serving` (owned from `epoch`, whatever an older map says), `aborted` (no effect).

For a slot, the newest claim that is not `aborted` decides; with none, the map does. Writes are
checked against claims when applied (`write_refusal`), so a write proposed before a fence but
ordered after it is refused, never taken and missed by the final catch-up.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvstore import errors
from kvstore.routing.ring import SLOT_COUNT
from kvstore.routing.slot_table import ranges_overlap

Ranges = tuple[tuple[int, int], ...]  # (first, last) slot ranges, inclusive, sorted, apart
# Ranges one move may claim: the ring places slots one by one, so a new shard's share of a
# 3-shard cluster is ~8,000 separate ranges; 65,536 is every slot apart.
MAX_RANGES = 65_536

OUT_PHASES = ("logging", "fenced", "gone", "aborted")
IN_PHASES = ("importing", "serving", "aborted")


def check_ranges(ranges: Any) -> Ranges:
    """`ranges` as sorted, disjoint (first, last) pairs within the slots; ValueError otherwise."""
    try:
        checked = tuple((int(a), int(b)) for a, b in ranges)
    except (TypeError, ValueError):
        raise ValueError("slot ranges must be (first, last) pairs of slots") from None
    if not 0 < len(checked) <= MAX_RANGES:
        raise ValueError(f"a move claims 1 to {MAX_RANGES} slot ranges, not {len(checked)}")
    previous = -1
    for first, last in checked:
        if not previous < first <= last < SLOT_COUNT:
            raise ValueError(f"slot ranges must be sorted, apart, within 0-{SLOT_COUNT - 1}: {first}-{last}")
        previous = last
    return checked


def in_ranges(ranges: Ranges, slot: int) -> bool:
    i = bisect.bisect_right(ranges, (slot, SLOT_COUNT)) - 1
    return i >= 0 and ranges[i][0] <= slot <= ranges[i][1]


@dataclass(frozen=True)
class Claim:
    move: int  # the move's id (from the metadata group: increasing)
    ranges: Ranges
    side: str  # "out" or "in"
    phase: str
    epoch: int = 0  # gone / serving: the map epoch from which the destination owns the ranges
    imported_through: int = 0  # in: the source revision whose changes are all applied here

    def check(self) -> None:
        phases = OUT_PHASES if self.side == "out" else IN_PHASES if self.side == "in" else ()
        if not phases:
            raise ValueError(f"a claim's side is 'out' or 'in', not {self.side!r}")
        if self.phase not in phases:
            raise ValueError(f"a claim {self.side} is {', '.join(phases)}, not {self.phase!r}")
        if self.move < 1:
            raise ValueError(f"a move's id is positive, not {self.move}")
        check_ranges(self.ranges)

    def covers(self, slot: int) -> bool:
        return in_ranges(self.ranges, slot)

    def overlaps(self, other: Claim) -> bool:
        return ranges_overlap(self.ranges, other.ranges)


@dataclass(frozen=True)
class Verdict:
    """What the claims say of a request's slots: OWNED, NONE (the map decides), or a refusal."""

    state: str  # "owned", "none", "moving", "gone"
    epoch: int = 0


OWNED = Verdict("owned")
NONE = Verdict("none")


class SlotClaims:
    """The claims a shard holds (newest move last). Immutable: a change makes a new one."""

    def __init__(self, claims: tuple[Claim, ...] = ()) -> None:
        self.claims = claims
        self._live = tuple(
            c for c in sorted(claims, key=lambda c: c.move, reverse=True) if c.phase != "aborted"
        )

    def __bool__(self) -> bool:
        return bool(self._live)

    # ----- stored form -----

    def to_blob(self) -> bytes:
        return json.dumps([asdict(c) for c in self.claims]).encode() if self.claims else b""

    @classmethod
    def from_blob(cls, blob: bytes) -> SlotClaims:
        if not blob:
            return cls()
        claims = []
        for c in json.loads(blob):
            c["ranges"] = tuple(tuple(r) for r in c["ranges"])
            claims.append(Claim(**c))
        return cls(tuple(claims))

    def with_claim(self, claim: Claim) -> SlotClaims:
        """These claims with `claim` set (replacing the same move's claim on the same side)."""
        claim.check()
        kept = tuple(c for c in self.claims if (c.move, c.side) != (claim.move, claim.side))
        return SlotClaims(kept + (claim,))

    def find(self, move: int, side: str) -> Claim | None:
        return next((c for c in self.claims if (c.move, c.side) == (move, side)), None)

    def with_imported(self, move: int, through: int) -> SlotClaims:
        claim = self.find(move, "in")
        assert claim is not None
        return self.with_claim(replace(claim, imported_through=max(claim.imported_through, through)))

    # ----- what they allow -----

    def verdict(self, slots: Any) -> Verdict:
        """The verdict for a request touching `slots`: a refusal if any slot's claim refuses;
        OWNED if claims say this shard holds every one of them; else NONE (the map decides)."""
        owned = unclaimed = 0
        for slot in slots:
            claim = next((c for c in self._live if c.covers(slot)), None)
            if claim is None:
                unclaimed += 1
            elif claim.phase in ("fenced", "importing"):
                return Verdict("moving")
            elif claim.phase == "gone":
                return Verdict("gone", claim.epoch)
            else:  # logging, serving: this shard holds it
                owned += 1
        return OWNED if owned and not unclaimed else NONE

    def holds_for_scan(self, slot: int) -> bool:
        """Whether a scan here lists a key of `slot`: not while it is being imported (the source
        still answers for it) nor once it has gone (the target does), so that a key is listed
        by one shard at a time. A fenced slot is listed by its source: it holds the final state."""
        claim = next((c for c in self._live if c.covers(slot)), None)
        return claim is None or claim.phase not in ("importing", "gone")

    def write_refusal(self, slots: Any) -> errors.KvError | None:
        """Why a write to `slots` must not apply here (checked as it applies), or None."""
        verdict = self.verdict(slots)
        if verdict.state == "moving":
            return errors.Moving("the slots of this write are moving between shards: try again shortly")
        if verdict.state == "gone":
            return errors.WrongShard(epoch=verdict.epoch)
        return None

    def exporting(self) -> tuple[tuple[int, Ranges], ...]:
        """(move, ranges) of every claim whose writes the change log records."""
        return tuple((c.move, c.ranges) for c in self._live if c.side == "out" and c.phase == "logging")
