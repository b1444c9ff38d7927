"""Read consistency: the one definition of the levels, shared by the SDK, the servicers and the shard.

`ConsistencyLevel` takes its numbers from the wire enum (`pb.Consistency`);
tests/unit/test_consistency_levels.py pins the two to each other, member for member.
`ReadConsistency` is a level plus the staleness bound a bounded read carries; `Consistency` is the
SDK's public namespace of them (`Consistency.STRONG`, `Consistency.bounded(seconds=0.5)`,
`Consistency.parse("session")`).
"""

from __future__ import annotations

import enum
import math
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

    FORMS = "strong, session, eventual, bounded:SECONDS (e.g. bounded:0.5s; also bounded0.5)"

    @staticmethod
    def parse(text: str) -> ReadConsistency:
        """A level from its name: 'strong', 'session', 'eventual' or 'bounded:0.5s' (the canonical
        form, what `str()` of a level gives); 'bounded:0.5', 'bounded0.5' and 'bounded0.5s' are
        accepted too. Anything else: ValueError listing the valid forms."""
        spelled = text.strip().lower()
        if spelled.startswith("bounded"):
            bound = spelled[len("bounded") :].removeprefix(":").removesuffix("s")
            try:
                seconds = float(bound)
            except ValueError:
                seconds = float("nan")
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(
                    f"consistency {text!r}: a bounded read needs a positive number of seconds; "
                    f"valid forms: {Consistency.FORMS}"
                )
            return Consistency.bounded(seconds)
        try:
            return {
                "strong": Consistency.STRONG,
                "session": Consistency.SESSION,
                "eventual": Consistency.EVENTUAL,
            }[spelled]
        except KeyError:
            raise ValueError(f"unknown consistency {text!r}; valid forms: {Consistency.FORMS}") from None

    @staticmethod
    def coerce(value: ReadConsistency | str) -> ReadConsistency:
        """What an SDK argument may be: a `ReadConsistency` (`Consistency.STRONG`, ...) or its name."""
        if isinstance(value, ReadConsistency):
            return value
        if isinstance(value, str):
            return Consistency.parse(value)
        raise TypeError(
            f"consistency must be a Consistency level or its name, not {type(value).__name__}; "
            f"valid forms: Consistency.STRONG, Consistency.bounded(seconds), ... or {Consistency.FORMS}"
        )
