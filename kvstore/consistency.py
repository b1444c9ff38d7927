"""Read consistency: the one definition of the levels, shared by the SDK, the servicers and the shard.

`ConsistencyLevel` takes its numbers from the wire enum (`pb.Consistency`);
tests/unit/test_consistency_levels.py pins the two to each other, member for member.
`ReadConsistency` is a level plus the staleness bound a bounded read carries; `Consistency` is the
SDK's public namespace of them (`Consistency.STRONG`, `Consistency.bounded(seconds=0.5)`,
`Consistency.parse("session")`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.proto import kvstore_pb2 as pb


class ConsistencyLevel(enum.IntEnum):
    """How fresh a read must be (docs/consistency.md). An int: it goes on the wire as it is."""

    STRONG = pb.STRONG  # linearizable: a read barrier proposed after the read arrived
    SESSION = pb.SESSION  # read-your-writes: the replica has applied the client's session index
    BOUNDED = pb.BOUNDED  # the replica provably held every acknowledged write `max_staleness` ago
    EVENTUAL = pb.EVENTUAL  # whatever the replica has


@dataclass(frozen=True)
class ReadConsistency:
    level: int  # a ConsistencyLevel (a plain int from the wire compares and hashes alike)
    max_staleness: float = 0.0

    def __str__(self) -> str:
        level = ConsistencyLevel(self.level)
        return f"bounded:{self.max_staleness}s" if level == ConsistencyLevel.BOUNDED else level.name.lower()


class Consistency:
    """Per-request read consistency (see docs/consistency.md)."""

    STRONG = ReadConsistency(ConsistencyLevel.STRONG)
    SESSION = ReadConsistency(ConsistencyLevel.SESSION)
    EVENTUAL = ReadConsistency(ConsistencyLevel.EVENTUAL)

    @staticmethod
    def bounded(seconds: float) -> ReadConsistency:
        if seconds <= 0:
            raise ValueError("a staleness bound must be positive")
        return ReadConsistency(ConsistencyLevel.BOUNDED, float(seconds))

    @staticmethod
    def parse(text: str) -> ReadConsistency:
        """'strong' | 'session' | 'eventual' | 'bounded:0.5s' (CLI form)."""
        text = text.strip().lower()
        if text.startswith("bounded:"):
            return Consistency.bounded(float(text.split(":", 1)[1].rstrip("s")))
        try:
            return {
                "strong": Consistency.STRONG,
                "session": Consistency.SESSION,
                "eventual": Consistency.EVENTUAL,
            }[text]
        except KeyError:
            raise ValueError(f"unknown consistency {text!r}") from None
