"""Is one key's history linearizable against a register? The search behind `checker.check_linearizable`.

Wing & Gong's search with Lowe's memoization, as Porcupine does, extended for unknown-outcome writes
(optional ops, see `prune_unknown` and `search`). Pure: ops in, a verdict with what explains it out.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from kvstore.chaos.history import Op

INF = math.inf
_CHECK_CLOCK_EVERY = 1024  # search steps between deadline checks: time.monotonic() is not free

# ---------------------------------------------------------------------------------------------------
# The register model
# ---------------------------------------------------------------------------------------------------
# Model inputs. A cas whose comparison failed changed nothing but still observed the register:
# it is checked as a read that saw "anything but `expected`".
_WRITE, _READ, _CAS, _CAS_FAILED = range(4)


@dataclass(slots=True)
class Entry:
    op: Op
    code: int
    value: str | None  # written value (_WRITE, _CAS) or read value (_READ)
    expected: str | None
    call: int
    ret: float  # INF for an unknown outcome
    optional: bool  # unknown outcome: may take effect once after `call`, or never
    wildcard: bool = False  # optional blind write of a value no op ever compares with (see prune_unknown)


def _step(state: str | None, e: Entry) -> tuple[bool, str | None]:
    """The register model: may `e` take effect on `state`, and what state follows."""
    if e.code == _WRITE:
        return True, e.value
    if e.code == _READ:
        return state == e.value, state
    if e.code == _CAS:
        return state == e.expected, e.value
    return state != e.expected, state


def to_entry(op: Op) -> Entry | None:
    """Map an op to a model input, or None when it carries no information.

    A missing return time means the outcome is unknown whatever `ok` says. Unknown reads, failed
    reads and failed writes constrain nothing (a failed cas constrains only when its comparison
    failed, not when it was refused with an error). An unknown write (or cas) becomes optional: it may take
    effect at any point after its call (return = +inf) or never; for a cas, "never" also covers
    "took effect but its comparison failed", which leaves the register unchanged.
    """
    unknown = op.ok is None or op.ret is None
    ret = INF if unknown else op.ret
    if op.kind == "get":
        return None if unknown or not op.ok else Entry(op, _READ, op.value, None, op.call, ret, False)
    if op.kind == "cas":
        if op.ok is False:
            # Refused with an error (e.g. not sent: every replica down), it compared nothing.
            refused = unknown or bool(op.error)
            return None if refused else Entry(op, _CAS_FAILED, None, op.expected, op.call, ret, False)
        return Entry(op, _CAS, op.value, op.expected, op.call, ret, unknown)
    if op.ok is False:
        return None
    return Entry(op, _WRITE, op.written, None, op.call, ret, unknown)


def prune_unknown(entries: list[Entry]) -> list[Entry]:
    """Shrink the search space left by unknown-outcome writes, without changing the verdict.

    Each optional write left in the search is a candidate at every later step, which multiplies the
    configurations to explore (a chaos run can leave dozens per key). Sound reductions, the first two
    as etcd's robustness tests do before calling Porcupine:

    * If exactly one write produces a value, an op that definitely observed that value (a read, or a
      successful cas expecting it) proves the write took effect before that op returned: the write
      becomes required, with that return time.
    * Drop an optional op whose written value nobody observed (no read returned it, no cas expected
      it) when the key has no failed cas: in any linearization using it, the stretch where the
      register held its value contains no op that looks at the register, so removing it keeps the
      rest valid. (A failed cas observes "not X", which such a write could satisfy.)
    * Otherwise mark as wildcards the optional blind writes whose value no op compares with at all:
      they are interchangeable, and the search tries one per step (see `search`).
    """
    if not any(e.optional for e in entries):
        return entries
    mentioned = {e.value for e in entries if e.code == _READ}
    mentioned |= {e.expected for e in entries if e.code == _CAS}
    compared = mentioned | {e.expected for e in entries if e.code == _CAS_FAILED}
    has_negative = any(e.code == _CAS_FAILED for e in entries)
    writers = Counter(e.value for e in entries if e.code in (_WRITE, _CAS))
    seen_by: dict[str | None, float] = {}
    for e in entries:
        if e.code == _READ or (e.code == _CAS and not e.optional):
            v = e.value if e.code == _READ else e.expected
            seen_by[v] = min(seen_by.get(v, INF), e.ret)
    kept = []
    for e in entries:
        if e.optional and not has_negative and e.value not in mentioned:
            continue
        if e.optional and e.value is not None and writers[e.value] == 1 and e.value in seen_by:
            # Not before its own call: if seen earlier, the search then reports the early observer.
            e.ret, e.optional = max(seen_by[e.value], e.call), False
        e.wildcard = e.optional and e.code == _WRITE and e.value not in compared
        kept.append(e)
    return kept


class _Node:
    """An event in the doubly linked list of the search (a call, or the matching return)."""

    __slots__ = ("entry", "bit", "is_call", "match", "prev", "next")

    def __init__(self, entry: Entry | None, bit: int, is_call: bool) -> None:
        self.entry = entry
        self.bit = bit
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _build_list(entries: list[Entry]) -> _Node:
    """Events sorted by time, calls before returns on ties (touching ops count as concurrent)."""
    events: list[tuple[float, int, _Node]] = []
    for i, e in enumerate(entries):
        call, ret = _Node(e, 1 << i, True), _Node(e, 1 << i, False)
        call.match = ret
        events.append((e.call, 0, call))
        events.append((e.ret, 1, ret))
    events.sort(key=lambda t: (t[0], t[1]))
    head = prev = _Node(None, 0, False)
    for _, _, node in events:
        prev.next, node.prev = node, prev
        prev = node
    return head


def _lift(call: _Node) -> None:
    """Unlink a call and its return; `_unlift` in reverse (LIFO) order restores them exactly."""
    for n in (call, call.match):
        n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev


def _unlift(call: _Node) -> None:
    for n in (call.match, call):
        n.prev.next = n
        if n.next is not None:
            n.next.prev = n


@dataclass
class Outcome:
    ok: bool
    timed_out: bool = False
    depth: int = 0  # length of the deepest partial linearization reached
    tail: list[Entry] = field(default_factory=list)  # its last few ops
    stuck: Entry | None = None  # the op due next there, which no remaining choice could place
    state: str | None = None  # the register state after it


def _pending(head: _Node) -> tuple[list[_Node], _Node | None]:
    """The calls before the first return in the list (the ops that may take effect next), earliest
    deadline first, and that first return (the op that must take effect before anything after it)."""
    calls = []
    node = head.next
    while node is not None and node.is_call:
        calls.append(node)
        node = node.next
    # Trying the op due soonest first finds a valid order without backtracking far more often than
    # call order does (e.g. many concurrent writes each read later); the order never changes the verdict.
    calls.sort(key=lambda n: n.entry.ret)
    return calls, node


@dataclass(slots=True)
class _Frame:
    """One choice on the search stack, with what is needed to undo it and try the next candidate."""

    candidates: list[_Node]
    next_index: int
    due: _Node | None
    chosen: _Node
    state: str | None  # register state before `chosen`
    blocked: tuple[str | None] | None  # the level's restriction (see `search`)
    wildcard_tried: bool


class _Cache:
    """Lowe's memo of visited configurations, extended with dominance for optional ops.

    A configuration is (required ops linearized, optional ops linearized, state). Having also
    linearized an optional op never helps: the same continuation works with that op left out, since
    it stays pending until +inf and never blocks anything. So a configuration is redundant when an
    earlier one had the same required set and state and a subset of its optional set.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str | None], list[int]] = {}

    def add_if_new(self, required: int, optional: int, state: str | None) -> bool:
        optionals = self._seen.setdefault((required, state), [])
        if any(o & ~optional == 0 for o in optionals):
            return False
        optionals.append(optional)
        return True


def _unblocks(before: str | None, after: str | None, candidates: list[_Node], skip: _Node) -> bool:
    """Does some other candidate fail on `before` but succeed on `after`?"""
    return any(
        n is not skip and not _step(before, n.entry)[0] and _step(after, n.entry)[0] for n in candidates
    )


def search(entries: list[Entry], deadline: float) -> Outcome:
    """Wing & Gong's search with Lowe's memoization (see `_Cache`), as in Porcupine.

    Events (calls and returns) sit in a time-ordered linked list. The candidates to take effect next
    are the calls before the first return. Take the first candidate the model allows whose resulting
    configuration is new, lift its call and return out of the list, and go on. When no candidate
    remains, undo the last choice and try its next sibling. Success comes once every required op is
    linearized (optional ops left over never took effect); an exhausted first level means failure.

    Optional ops (unknown outcome) are placed only where they matter. If a history has a
    linearization, it has one where each optional op is immediately followed by an op that fails on
    the state before it and succeeds on the state after it: take one with the fewest optional ops;
    an optional op nobody in its stretch needs could be dropped, so some op there fails on the old
    state, and the optional op can move later (its return is +inf) to just before the first such op.
    The search therefore places an optional op only if such a follower is pending (`_unblocks`), and
    then restricts the next step to those followers (`blocked` = the state before the optional op).
    Restricted configurations are not cached, since the same one reached without the restriction
    must still be explored in full. Wildcards are interchangeable once called, so one per level is
    tried.
    """
    head = _build_list(entries)
    required_left = sum(not e.optional for e in entries)
    state: str | None = None
    required = optional = 0  # bitsets of the linearized ops
    frames: list[_Frame] = []
    cache = _Cache()
    out = Outcome(ok=False)
    candidates, due = _pending(head)
    index = steps = 0
    blocked: tuple[str | None] | None = None  # (state,): the next op must fail on that state
    wildcard_tried = False
    while required_left:
        steps += 1
        if steps % _CHECK_CLOCK_EVERY == 0 and time.monotonic() > deadline:
            return Outcome(ok=False, timed_out=True)
        if index < len(candidates):
            node = candidates[index]
            index += 1
            e = node.entry
            allowed, new_state = _step(state, e)
            if not allowed or (blocked is not None and _step(blocked[0], e)[0]):
                continue
            if e.optional:
                if e.wildcard and wildcard_tried:
                    continue
                wildcard_tried |= e.wildcard  # all wildcards pass or fail `_unblocks` alike
                if not _unblocks(state, new_state, candidates, node):
                    continue
                next_blocked: tuple[str | None] | None = (state,)
            elif cache.add_if_new(required | node.bit, optional, new_state):
                next_blocked = None
            else:
                continue
            frames.append(_Frame(candidates, index, due, node, state, blocked, wildcard_tried))
            state = new_state
            if e.optional:
                optional |= node.bit
            else:
                required |= node.bit
                required_left -= 1
            _lift(node)
            candidates, due = _pending(head)
            index, blocked, wildcard_tried = 0, next_blocked, False
            continue
        if blocked is None and (out.stuck is None or len(frames) > out.depth):
            # Keep only what the explanation shows: copying the whole stack would cost O(n^2).
            out.depth, out.tail, out.state = len(frames), [f.chosen.entry for f in frames[-3:]], state
            out.stuck = due.entry if due is not None else None
        if not frames:
            return out
        frame = frames.pop()
        candidates, index, due, state = frame.candidates, frame.next_index, frame.due, frame.state
        blocked, wildcard_tried = frame.blocked, frame.wildcard_tried
        required &= ~frame.chosen.bit
        optional &= ~frame.chosen.bit
        required_left += not frame.chosen.entry.optional
        _unlift(frame.chosen)
    return Outcome(ok=True)
