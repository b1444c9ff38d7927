"""Recorded client operations (a history) for the consistency checkers, stored as JSON lines.

Each client records one `Op` per request: its call time, its return time and what it saw. Times are
`time.monotonic_ns()`, which is comparable across processes on one host, so histories recorded by
several client processes can be merged and checked together.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("put", "get", "delete", "cas")
CONSISTENCIES = ("strong", "session", "bounded", "eventual")


@dataclass
class Op:
    """One client request and its outcome.

    `ok` is three-valued on purpose: False means the request definitely had no effect (a clean
    rejection, or a compare-and-swap whose comparison failed), None means the client cannot know
    (timeout, lost connection): such a write may still commit later, so it must never be recorded as
    failed. A failed compare-and-swap with no `error` is one whose comparison failed: it saw another
    value than `expected`; with an `error` it was refused (no leader, not sent) and saw nothing.
    """

    client: int  # one request in flight per client
    kind: str  # "put" | "get" | "delete" | "cas"
    key: str
    value: str | None  # put/cas: value written; get: value read (None = not found)
    expected: str | None  # cas only: the value expected (None = the key must not exist)
    ok: bool | None  # True = took effect / answered, False = definitely no effect, None = unknown
    call: int  # time.monotonic_ns() when the request was sent
    ret: int | None  # time.monotonic_ns() at the answer; None when the outcome is unknown
    consistency: str = "strong"  # "strong" | "session" | "bounded" | "eventual"
    revision: int = 0  # write: its log index; read: the key's revision; 0 when not reported
    shard: int = 0
    session: str = ""  # session identity for the session-guarantee checks
    staleness_bound: float = 0.0  # bounded reads: the allowed staleness, in seconds
    error: str = ""  # a failed or unknown op: the client's error (a refused cas observed nothing)

    def __post_init__(self) -> None:
        # Fail when recording, not later in a checker that would silently ignore a typo.
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if self.consistency not in CONSISTENCIES:
            raise ValueError(f"unknown consistency {self.consistency!r}")

    @property
    def is_write(self) -> bool:
        return self.kind in ("put", "delete", "cas")

    @property
    def written(self) -> str | None:
        """The value this op writes if it takes effect (a delete writes "absent", i.e. None)."""
        return None if self.kind == "delete" else self.value


@dataclass
class History:
    """A list of ops in recording order, with JSON-lines persistence.

    `append` is a plain `list.append`, which is atomic under the GIL, so client threads may share one
    History.
    """

    ops: list[Op] = field(default_factory=list)

    def append(self, op: Op) -> None:
        self.ops.append(op)

    def extend(self, ops: Iterable[Op]) -> None:
        self.ops.extend(ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, index: int) -> Op:
        return self.ops[index]

    def by_key(self) -> dict[str, list[Op]]:
        """Ops grouped by key, each group in recording order."""
        groups: dict[str, list[Op]] = {}
        for op in self.ops:
            groups.setdefault(op.key, []).append(op)
        return groups

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for op in self.ops:
                f.write(json.dumps(asdict(op), separators=(",", ":")) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> History:
        with open(path, encoding="utf-8") as f:
            return cls([Op(**json.loads(line)) for line in f if line.strip()])
