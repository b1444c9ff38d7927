"""Consistency checkers for recorded histories.

* `check_linearizable`: strong ops, one register per key, checked with the Wing & Gong search plus
  Lowe's memoization, partitioned by key (P-compositionality), as Porcupine does.
* `check_sessions`: read-your-writes and monotonic reads for session-consistency ops.
* `check_bounded`: bounded-staleness reads reflect every write acknowledged more than the bound ago.
* `check_no_lost_writes`: after healing, each key's final value is one a linearization could end with.

Revision-based checks (sessions, bounded) rely on the revisions the server reports: a write's log
index and a read's key revision, which grow together because a key lives in one shard and one log.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvstore.chaos.history import Op

INF = math.inf
_CHECK_CLOCK_EVERY = 1024  # search steps between deadline checks: time.monotonic() is not free


@dataclass
class Anomaly:
    """One consistency violation (or an inconclusive check), with the ops that show it."""

    kind: str  # "not-linearizable" | "check-timeout" | "read-your-writes" | "monotonic-reads" | ...
    key: str
    detail: str
    ops: list[Op] = field(default_factory=list)


@dataclass
class KeyResult:
    key: str
    ok: bool
    timed_out: bool
    checked: int  # ops that entered the search for this key
    explanation: str = ""
    stuck: Op | None = None  # on failure: the op due next where the search got furthest


@dataclass
class LinResult:
    """Verdict of `check_linearizable`. `ok` is True only if every key was proven linearizable."""

    ok: bool
    keys: dict[str, KeyResult]
    checked: int  # ops that entered the search
    dropped: int  # strong ops carrying no information (failed writes, unanswered reads, unseen unknowns)
    failed_keys: list[str]
    explanation: str
    timed_out: bool  # some key was not decided in time: the verdict is "unknown", never a pass

    def anomalies(self) -> list[Anomaly]:
        out = []
        for kr in self.keys.values():
            if kr.timed_out:
                out.append(Anomaly("check-timeout", kr.key, kr.explanation))
            elif not kr.ok:
                stuck = [kr.stuck] if kr.stuck else []
                out.append(Anomaly("not-linearizable", kr.key, kr.explanation, stuck))
        return out


def summarize(anomalies: Iterable[Anomaly]) -> dict[str, int]:
    """Number of anomalies of each kind, e.g. {"lost-write": 1, "read-your-writes": 2}."""
    return dict(sorted(Counter(a.kind for a in anomalies).items()))


# ---------------------------------------------------------------------------------------------------
# Linearizability: register model
# ---------------------------------------------------------------------------------------------------
# Model inputs. A cas whose comparison failed changed nothing but still observed the register:
# it is checked as a read that saw "anything but `expected`".
_WRITE, _READ, _CAS, _CAS_FAILED = range(4)


@dataclass(slots=True)
class _Entry:
    op: Op
    code: int
    value: str | None  # written value (_WRITE, _CAS) or read value (_READ)
    expected: str | None
    call: int
    ret: float  # INF for an unknown outcome
    optional: bool  # unknown outcome: may take effect once after `call`, or never
    wildcard: bool = False  # optional blind write of a value no op ever compares with (see _prune_unknown)


def _step(state: str | None, e: _Entry) -> tuple[bool, str | None]:
    """The register model: may `e` take effect on `state`, and what state follows."""
    if e.code == _WRITE:
        return True, e.value
    if e.code == _READ:
        return state == e.value, state
    if e.code == _CAS:
        return state == e.expected, e.value
    return state != e.expected, state


def _to_entry(op: Op) -> _Entry | None:
    """Map an op to a model input, or None when it carries no information.

    A missing return time means the outcome is unknown whatever `ok` says. Unknown reads, failed
    reads and failed writes constrain nothing. An unknown write (or cas) becomes optional: it may take
    effect at any point after its call (return = +inf) or never; for a cas, "never" also covers
    "took effect but its comparison failed", which leaves the register unchanged.
    """
    unknown = op.ok is None or op.ret is None
    ret = INF if unknown else op.ret
    if op.kind == "get":
        return None if unknown or not op.ok else _Entry(op, _READ, op.value, None, op.call, ret, False)
    if op.kind == "cas":
        if op.ok is False:
            return None if unknown else _Entry(op, _CAS_FAILED, None, op.expected, op.call, ret, False)
        return _Entry(op, _CAS, op.value, op.expected, op.call, ret, unknown)
    if op.ok is False:
        return None
    return _Entry(op, _WRITE, op.written, None, op.call, ret, unknown)


def _prune_unknown(entries: list[_Entry]) -> list[_Entry]:
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
      they are interchangeable, and the search tries one per step (see `_search`).
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

    def __init__(self, entry: _Entry | None, bit: int, is_call: bool) -> None:
        self.entry = entry
        self.bit = bit
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _build_list(entries: list[_Entry]) -> _Node:
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
class _Outcome:
    ok: bool
    timed_out: bool = False
    depth: int = 0  # length of the deepest partial linearization reached
    tail: list[_Entry] = field(default_factory=list)  # its last few ops
    stuck: _Entry | None = None  # the op due next there, which no remaining choice could place
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
    blocked: tuple[str | None] | None  # the level's restriction (see `_search`)
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


def _search(entries: list[_Entry], deadline: float) -> _Outcome:
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
    out = _Outcome(ok=False)
    candidates, due = _pending(head)
    index = steps = 0
    blocked: tuple[str | None] | None = None  # (state,): the next op must fail on that state
    wildcard_tried = False
    while required_left:
        steps += 1
        if steps % _CHECK_CLOCK_EVERY == 0 and time.monotonic() > deadline:
            return _Outcome(ok=False, timed_out=True)
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
    return _Outcome(ok=True)


def _fmt(op: Op, t0: int) -> str:
    """A compact, readable op: `c3 get(k)->'v7' [12.1ms, 13.0ms]`, times relative to the key's start."""
    if op.kind == "get":
        what = f"get({op.key})->{op.value!r}"
    elif op.kind == "put":
        what = f"put({op.key}, {op.value!r})"
    elif op.kind == "delete":
        what = f"delete({op.key})"
    else:
        what = f"cas({op.key}, {op.expected!r}->{op.value!r})"
    status = {True: "", False: " failed", None: " unknown"}[op.ok]
    end = "?" if op.ret is None else f"{(op.ret - t0) / 1e6:.1f}ms"
    return f"c{op.client} {what}{status} [{(op.call - t0) / 1e6:.1f}ms, {end}]"


def _explain(key: str, n: int, out: _Outcome, t0: int) -> str:
    tail = ", ".join(_fmt(e.op, t0) for e in out.tail) or "nothing"
    stuck = _fmt(out.stuck.op, t0) if out.stuck else "?"
    return (
        f"key {key!r}: not linearizable. The longest valid order found covers {out.depth} of {n} ops "
        f"(ending with {tail}), leaving the register at {out.state!r}; the op due next, {stuck}, "
        f"cannot take effect there, and no other choice gets further."
    )


def _check_key(key: str, ops: list[Op], deadline: float) -> KeyResult:
    entries = _prune_unknown([e for e in map(_to_entry, ops) if e is not None])
    if time.monotonic() > deadline:
        return KeyResult(key, False, True, len(entries), f"key {key!r}: not checked, time budget spent")
    out = _search(entries, deadline)
    if out.ok:
        return KeyResult(key, True, False, len(entries))
    if out.timed_out:
        return KeyResult(key, False, True, len(entries), f"key {key!r}: search exceeded the time budget")
    t0 = min(op.call for op in ops)
    stuck = out.stuck.op if out.stuck else None
    return KeyResult(key, False, False, len(entries), _explain(key, len(entries), out, t0), stuck)


def check_linearizable(ops: Iterable[Op], *, timeout_s: float = 10.0) -> LinResult:
    """Check the "strong" reads and every write of a history against one register per key.

    kvstore writes are linearizable whatever consistency their client reads at (they all go
    through the shard's Raft leader), so writes recorded by session or bounded clients are part of
    the register's history too; only reads at weaker levels are left out. Unknown-outcome writes
    may take effect at any time after their call, or never; see `_to_entry` for what each op
    means to the model. The time budget covers all keys: a key not decided in time makes the
    result `timed_out` (and not ok).
    """
    deadline = time.monotonic() + timeout_s
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.consistency == "strong" or op.is_write:
            by_key[op.key].append(op)
    keys = {key: _check_key(key, key_ops, deadline) for key, key_ops in by_key.items()}
    failed = [k for k, r in keys.items() if not r.ok and not r.timed_out]
    timed_out = any(r.timed_out for r in keys.values())
    checked = sum(r.checked for r in keys.values())
    total = sum(len(v) for v in by_key.values())
    explanation = "\n".join(keys[k].explanation for k in failed)
    if timed_out:
        explanation = (explanation + "\n" if explanation else "") + "verdict unknown: time budget exceeded"
    ok = not failed and not timed_out
    return LinResult(ok, keys, checked, total - checked, failed, explanation, timed_out)


# ---------------------------------------------------------------------------------------------------
# Revision-based checks (session guarantees, bounded staleness)
# ---------------------------------------------------------------------------------------------------
def _acked(op: Op) -> bool:
    return op.ok is True and op.ret is not None


def _acked_write(op: Op) -> bool:
    return op.is_write and _acked(op)


def _deletes_by_key(ops: list[Op]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "delete" and op.ok is not False:
            out[op.key].append(op)
    return out


def _later_delete(deletes: list[Op], after_rev: int, before: int) -> bool:
    """Could some delete, ordered after revision `after_rev`, explain a not-found read returning at
    `before`? Deletes without a reported revision (unknown outcome) get the benefit of the doubt."""
    return any(d.call < before and (d.revision == 0 or d.revision > after_rev) for d in deletes)


def _floor_violation(read: Op, floor: Op, deletes: list[Op]) -> str | None:
    """Why `read` fails to reflect `floor` (a write, or an earlier read), or None if it does.

    A read with a revision must have revision >= the floor's, and the floor's value if equal. A
    not-found read without a revision (servers may not version absent keys) is fine only if the floor
    is itself "absent" or a delete that may come later explains it. A found read without a revision
    cannot be ordered and is not judged here (linearizability checks values).
    """
    want = floor.written if floor.is_write else floor.value
    if read.revision > 0:
        if read.revision < floor.revision:
            return f"read revision {read.revision} is older than revision {floor.revision}"
        if read.revision == floor.revision and read.value != want:
            return f"read {read.value!r} at revision {read.revision}, which holds {want!r}"
        return None
    if read.value is None and want is not None and not _later_delete(deletes, floor.revision, read.ret):
        return f"read 'not found', but revision {floor.revision} holds {want!r} and no later delete exists"
    return None


def _session_id(op: Op) -> str:
    return op.session or f"client-{op.client}"


def check_sessions(ops: Iterable[Op]) -> list[Anomaly]:
    """Read-your-writes and monotonic reads, per session and per key, for "session" ops.

    Only acknowledged ops count (ok=True with a return time). For each read R of key k by session S:

    * read-your-writes: let W be S's write to k (put, delete, successful cas) with the highest
      revision among those that returned before R was called. R must reflect W (`_floor_violation`):
      revision >= W's revision, and W's value if the revisions are equal.
    * monotonic reads: let P be S's read of k with the highest revision among those that returned
      before R was called. R must reflect P the same way.

    Revisions are per key (a key's modification index); no rule compares revisions of different
    keys, because a replica that has applied index N still reports older revisions for keys not
    written recently. Writes and reads whose revision is 0 (not reported) set no floor.
    """
    ops = list(ops)
    deletes = _deletes_by_key(ops)
    sessions: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.consistency == "session" and _acked(op) and (op.is_write or op.kind == "get"):
            sessions[_session_id(op)].append(op)
    anomalies: list[Anomaly] = []
    for session_ops in sessions.values():
        anomalies.extend(_check_session(session_ops, deletes))
    return anomalies


def _check_session(ops: list[Op], deletes: dict[str, list[Op]]) -> list[Anomaly]:
    # Sweep events in time order: a read is judged at its call against what had returned before it
    # (ties: the call first, so an op returning at the same instant does not count as "before").
    events = [(op.call, 0, i, op) for i, op in enumerate(ops) if op.kind == "get"]
    events += [(op.ret, 1, i, op) for i, op in enumerate(ops)]
    events.sort(key=lambda t: t[:3])
    last_write: dict[str, Op] = {}
    last_read: dict[str, Op] = {}
    out: list[Anomaly] = []
    for _, is_return, _, op in events:
        if is_return:
            floors = last_write if op.is_write else last_read
            best = floors.get(op.key)
            if op.revision > 0 and (best is None or op.revision >= best.revision):
                floors[op.key] = op
            continue
        for kind, floors in (("read-your-writes", last_write), ("monotonic-reads", last_read)):
            floor = floors.get(op.key)
            why = _floor_violation(op, floor, deletes.get(op.key, [])) if floor else None
            if why:
                out.append(Anomaly(kind, op.key, f"session {_session_id(op)!r}: {why}", [floor, op]))
    return out


def check_bounded(ops: Iterable[Op]) -> list[Anomaly]:
    """Bounded-staleness reads: a "bounded" read R of key k, called at c with bound b seconds, must
    reflect (`_floor_violation`) W, the write to k with the highest revision among the writes
    acknowledged (at any consistency) before c - b. A not-found read is fine when W is a delete."""
    ops = list(ops)
    deletes = _deletes_by_key(ops)
    writes: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if _acked_write(op) and op.revision > 0:
            writes[op.key].append(op)
    # Per key: writes sorted by return time, and the highest-revision write among each prefix.
    rets: dict[str, list[int]] = {}
    newest: dict[str, list[Op]] = {}
    for key, ws in writes.items():
        ws.sort(key=lambda w: w.ret)
        rets[key] = [w.ret for w in ws]
        newest[key] = _running_max(ws)
    out: list[Anomaly] = []
    for op in ops:
        if op.consistency != "bounded" or op.kind != "get" or not _acked(op) or op.key not in rets:
            continue
        cutoff = op.call - op.staleness_bound * 1e9
        n = bisect_left(rets[op.key], cutoff)  # writes acknowledged strictly before the cutoff
        if n == 0:
            continue
        floor = newest[op.key][n - 1]
        why = _floor_violation(op, floor, deletes.get(op.key, []))
        if why:
            detail = f"bound {op.staleness_bound}s: {why} (acknowledged {_ago(op, floor)} before the call)"
            out.append(Anomaly("stale-bounded-read", op.key, detail, [floor, op]))
    return out


def _running_max(ws: list[Op]) -> list[Op]:
    out: list[Op] = []
    for w in ws:
        out.append(w if not out or w.revision >= out[-1].revision else out[-1])
    return out


def _ago(read: Op, write: Op) -> str:
    return f"{(read.call - (write.ret or 0)) / 1e9:.3f}s"


# ---------------------------------------------------------------------------------------------------
# Lost writes
# ---------------------------------------------------------------------------------------------------
def check_no_lost_writes(
    acked_final: dict[str, str | None], ops: Iterable[Op], *, timeout_s: float = 10.0
) -> list[Anomaly]:
    """Check the final value of each key (a strong read after healing) against the writes made to it.

    The final value must be one a linearization of the writes (any consistency; acknowledged ones
    required, unknown-outcome ones optional, failed ones excluded) could end with. This runs the
    register search on the key's writes plus the final read placed after everything. Without cas, it
    means: the value came from some write W (or is "absent" with no acknowledged write), and no
    acknowledged write was called after W returned. Keys missing from `acked_final` are not checked.

    Anomalies: "unexpected-value" (nobody wrote it), "lost-write" (an acknowledged write that must
    come after the final value's writer was lost), "check-timeout" (undecided).
    """
    ops = list(ops)
    end = max((op.ret if op.ret is not None else op.call for op in ops), default=0) + 1
    writes: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.is_write and op.ok is not False:
            writes[op.key].append(op)
    deadline = time.monotonic() + timeout_s
    out: list[Anomaly] = []
    for key, final in acked_final.items():
        read = Op(client=-1, kind="get", key=key, value=final, expected=None, ok=True, call=end, ret=end + 1)
        result = _check_key(key, [*writes[key], read], deadline)
        if result.timed_out:
            out.append(Anomaly("check-timeout", key, result.explanation))
        elif not result.ok:
            out.append(_lost_write_anomaly(key, final, writes[key], result))
    return out


def _lost_write_anomaly(key: str, final: str | None, writes: list[Op], result: KeyResult) -> Anomaly:
    sources = [w for w in writes if w.written == final]
    if final is not None and not sources:
        return Anomaly("unexpected-value", key, f"final value {final!r} of {key!r} was never written")
    # The final value's writer could have returned as late as the latest source; acknowledged writes
    # called after that cannot precede it in any order.
    latest = max((INF if w.ret is None else w.ret for w in sources), default=-INF)
    later = [w for w in writes if _acked(w) and w.call > latest]
    if not later:  # e.g. a cas chain rules the value out: let the search explain
        return Anomaly("lost-write", key, result.explanation, [result.stuck] if result.stuck else [])
    t0 = min(w.call for w in writes)
    lost = "; ".join(_fmt(w, t0) for w in later[:5])
    detail = f"final value of {key!r} is {final!r}, but {len(later)} acknowledged later write(s) vanished: "
    detail += lost
    return Anomaly("lost-write", key, detail, later)
