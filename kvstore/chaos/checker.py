"""Consistency checkers for recorded histories.

* `check_linearizable`: strong ops, one register per key, checked with the Wing & Gong search plus
  Lowe's memoization (`register_search`), partitioned by key (P-compositionality), as Porcupine does.
* `check_sessions`: read-your-writes and monotonic reads for session-consistency ops.
* `check_bounded`: bounded-staleness reads reflect every write acknowledged more than the bound ago.
* `check_no_lost_writes`: after healing, each key's final value is one a linearization could end with.

Revision-based checks (sessions, bounded) rely on the revisions the server reports: a write's log
index and a read's key revision, which grow together because a key lives in one shard and one log.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvstore.chaos.history import Op
from kvstore.chaos.register_search import INF, Outcome, prune_unknown, search, to_entry


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
# Linearizability, per key (the search itself: register_search.py)
# ---------------------------------------------------------------------------------------------------
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


def _explain(key: str, n: int, out: Outcome, t0: int) -> str:
    tail = ", ".join(_fmt(e.op, t0) for e in out.tail) or "nothing"
    stuck = _fmt(out.stuck.op, t0) if out.stuck else "?"
    return (
        f"key {key!r}: not linearizable. The longest valid order found covers {out.depth} of {n} ops "
        f"(ending with {tail}), leaving the register at {out.state!r}; the op due next, {stuck}, "
        f"cannot take effect there, and no other choice gets further."
    )


def _check_key(key: str, ops: list[Op], deadline: float) -> KeyResult:
    entries = prune_unknown([e for e in map(to_entry, ops) if e is not None])
    if time.monotonic() > deadline:
        return KeyResult(key, False, True, len(entries), f"key {key!r}: not checked, time budget spent")
    out = search(entries, deadline)
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
    may take effect at any time after their call, or never; see `register_search.to_entry` for what each op
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
