"""Tests for the history checkers: small hand-written histories, planted bugs in generated ones."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from dataclasses import dataclass

from kvstore.chaos.checker import (
    Anomaly,
    check_bounded,
    check_linearizable,
    check_no_lost_writes,
    check_sessions,
    summarize,
)
from kvstore.chaos.history import History, Op

MS = 1_000_000  # hand-written histories use milliseconds, the checkers nanoseconds


def put(c: int, v: str, call: int, ret: int | None, ok: bool | None = True, key: str = "k", **kw) -> Op:
    return Op(c, "put", key, v, None, ok, call * MS, None if ret is None else ret * MS, **kw)


def get(c: int, v: str | None, call: int, ret: int, ok: bool | None = True, key: str = "k", **kw) -> Op:
    return Op(c, "get", key, v, None, ok, call * MS, ret * MS, **kw)


def delete(c: int, call: int, ret: int | None, ok: bool | None = True, key: str = "k", **kw) -> Op:
    return Op(c, "delete", key, None, None, ok, call * MS, None if ret is None else ret * MS, **kw)


def cas(c: int, exp: str | None, v: str, call: int, ret: int | None, ok: bool | None, key: str = "k") -> Op:
    return Op(c, "cas", key, v, exp, ok, call * MS, None if ret is None else ret * MS)


def linearizable(*ops: Op) -> bool:
    return check_linearizable(ops).ok


# --- hand-written linearizability cases -------------------------------------------------------------
def test_sequential_read_sees_last_write() -> None:
    assert linearizable(put(1, "a", 0, 10), put(1, "b", 20, 30), get(2, "b", 40, 50))
    assert linearizable(get(2, None, 0, 5), put(1, "a", 10, 20))


def test_stale_read_after_completed_write_fails() -> None:
    result = check_linearizable([put(1, "a", 0, 10), put(1, "b", 20, 30), get(2, "a", 40, 50)])
    assert not result.ok and not result.timed_out
    assert result.failed_keys == ["k"]
    assert result.keys["k"].stuck is not None and result.keys["k"].stuck.kind == "get"
    assert "get(k)->'a'" in result.explanation
    assert [a.kind for a in result.anomalies()] == ["not-linearizable"]


def test_read_concurrent_with_write_may_see_either_value() -> None:
    assert linearizable(put(1, "a", 0, 10), put(1, "b", 20, 40), get(2, "a", 25, 30))
    assert linearizable(put(1, "a", 0, 10), put(1, "b", 20, 40), get(2, "b", 25, 30))


def test_concurrent_writes_seen_in_one_order_pass() -> None:
    writes = [put(1, "a", 0, 100), put(2, "b", 0, 100)]
    # Two readers both see a then b: the order a < b explains both.
    assert linearizable(
        *writes, get(3, "a", 10, 20), get(3, "b", 30, 40), get(4, "a", 10, 20), get(4, "b", 50, 60)
    )
    # A reader seeing b then a is fine alone: b < a.
    assert linearizable(*writes, get(3, "b", 10, 20), get(3, "a", 30, 40))


def test_concurrent_writes_seen_in_both_orders_fail() -> None:
    writes = [put(1, "a", 0, 100), put(2, "b", 0, 100)]
    assert not linearizable(
        *writes, get(3, "a", 10, 20), get(3, "b", 30, 40), get(4, "b", 10, 20), get(4, "a", 30, 40)
    )
    # After both writes returned the register holds one final value: two readers cannot disagree.
    assert not linearizable(*writes, get(3, "a", 110, 120), get(4, "b", 110, 120))
    assert linearizable(*writes, get(3, "b", 110, 120), get(4, "b", 110, 120))


def test_unknown_write_may_appear_later_or_never() -> None:
    unknown = put(1, "x", 0, None, ok=None)
    assert linearizable(put(2, "a", 0, 1), unknown, get(2, "a", 100, 110), get(2, "x", 500, 510))
    assert linearizable(put(2, "a", 0, 1), unknown, get(2, "a", 100, 110))
    # Once seen it has taken effect: the old value cannot come back.
    assert not linearizable(put(2, "a", 0, 1), unknown, get(2, "x", 100, 110), get(2, "a", 120, 130))
    # ...and it cannot take effect before it was called.
    assert not linearizable(get(2, "x", 0, 10), put(1, "x", 20, None, ok=None))


def test_unknown_write_recorded_ok_without_return_is_unknown() -> None:
    assert linearizable(put(1, "x", 0, None, ok=True), get(2, None, 100, 110))


def test_failed_writes_and_unanswered_reads_are_dropped() -> None:
    result = check_linearizable(
        [put(1, "z", 0, 10, ok=False), get(2, "q", 20, 30, ok=None), get(2, None, 40, 50)]
    )
    assert result.ok and result.checked == 1 and result.dropped == 2
    # A failed write definitely did not take effect, so nobody may read its value.
    assert not linearizable(put(1, "z", 0, 10, ok=False), get(2, "z", 20, 30))


def test_delete_is_a_write_of_absent() -> None:
    assert linearizable(put(1, "a", 0, 10), delete(1, 20, 30), get(2, None, 40, 50))
    assert not linearizable(put(1, "a", 0, 10), delete(1, 20, 30), get(2, "a", 40, 50))
    assert linearizable(
        put(1, "a", 0, 10), delete(1, 20, None, ok=None), get(2, "a", 40, 50), get(2, None, 60, 70)
    )


def test_cas_success_and_failure() -> None:
    assert linearizable(put(1, "a", 0, 10), cas(2, "a", "b", 20, 30, True), get(3, "b", 40, 50))
    assert not linearizable(put(1, "a", 0, 10), cas(2, "x", "b", 20, 30, True))
    # A failed cas saw a value other than `expected`.
    assert linearizable(put(1, "a", 0, 10), cas(2, "z", "b", 20, 30, False), get(3, "a", 40, 50))
    assert not linearizable(put(1, "a", 0, 10), cas(2, "a", "b", 20, 30, False))
    # ...unless a concurrent write made the comparison fail.
    assert linearizable(put(1, "a", 0, 10), put(3, "c", 15, 35), cas(2, "a", "b", 20, 30, False))
    assert linearizable(cas(1, None, "a", 0, 10, True), get(2, "a", 20, 30))


def test_a_cas_refused_with_an_error_observed_nothing() -> None:
    # While every replica is down (a power cut), the value stays "a" and a cas expecting "a" fails
    # with "not sent": not a comparison that saw another value (found by the long power-loss run).
    refused = dataclasses.replace(cas(2, "a", "b", 20, 30, False), error="Unavailable: not sent")
    assert linearizable(put(1, "a", 0, 10), refused, get(3, "a", 40, 50))
    assert not linearizable(put(1, "a", 0, 10), cas(2, "a", "b", 20, 30, False), get(3, "a", 40, 50))


def test_unknown_cas() -> None:
    base = [put(1, "a", 0, 10), cas(2, "a", "b", 20, None, None)]
    assert linearizable(*base, get(3, "b", 40, 50))
    assert linearizable(*base, get(3, "a", 40, 50))
    # If it took effect, its comparison must have held when it did.
    assert not linearizable(put(1, "a", 0, 10), cas(2, "z", "b", 20, None, None), get(3, "b", 40, 50))


def test_only_strong_ops_are_checked() -> None:
    stale = get(2, "a", 40, 50, consistency="eventual")
    assert linearizable(put(1, "a", 0, 10), put(1, "b", 20, 30), stale)


def test_keys_are_independent() -> None:
    result = check_linearizable(
        [
            put(1, "a", 0, 10, key="x"),
            get(2, "a", 20, 30, key="x"),
            put(1, "b", 0, 10, key="y"),
            get(2, None, 20, 30, key="y"),
        ]
    )
    assert result.failed_keys == ["y"] and result.keys["x"].ok


def test_many_unknown_writes_stay_fast() -> None:
    ops = [put(i, f"u{i}", 0, None, ok=None) for i in range(60)]
    ops += [get(100, f"u{i}", 10 + 10 * i, 15 + 10 * i) for i in range(0, 60, 3)]
    start = time.perf_counter()
    assert check_linearizable(ops, timeout_s=5).ok
    assert time.perf_counter() - start < 1.0


def test_unknown_write_can_explain_a_failed_cas() -> None:
    # The cas saw something other than "a": only the unknown write (or delete) can explain it.
    assert not linearizable(put(1, "a", 0, 10), cas(2, "a", "b", 20, 30, False))
    assert linearizable(put(1, "a", 0, 10), put(3, "x", 5, None, ok=None), cas(2, "a", "b", 20, 30, False))
    assert linearizable(put(1, "a", 0, 10), delete(3, 5, None, ok=None), cas(2, "a", "b", 20, 30, False))
    # ...but not one called after the cas returned.
    assert not linearizable(
        put(1, "a", 0, 10), cas(2, "a", "b", 20, 30, False), put(3, "x", 40, None, ok=None)
    )


def test_many_unknown_writes_with_failed_cas_stay_fast() -> None:
    ops = [put(0, "a", 0, 1)] + [put(i, f"u{i}", 2, None, ok=None) for i in range(1, 41)]
    ops += [cas(50, "a", f"z{i}", 10 + 10 * i, 15 + 10 * i, False) for i in range(20)]
    start = time.perf_counter()
    assert linearizable(*ops, get(51, "u7", 300, 310))
    assert not linearizable(*ops, get(51, "a", 300, 310))  # "a" was overwritten for good
    assert time.perf_counter() - start < 1.0


def test_timeout_reports_unknown_not_pass() -> None:
    result = check_linearizable(generate(1, n_ops=200).ops, timeout_s=0.0)
    assert result.timed_out and not result.ok and result.failed_keys == []


# --- generated histories -----------------------------------------------------------------------------
@dataclass
class Generated:
    ops: list[Op]
    order: list[Op]  # ops that took effect, in linearization order
    final: dict[str, str | None]


def generate(
    seed: int, n_ops: int = 2000, n_keys: int = 10, n_clients: int = 5, unknown: float = 0.0
) -> Generated:
    """Simulate a linearizable register per key: each op takes effect at a random instant inside its
    interval (unknown-outcome writes: maybe later, maybe never), and reports what it saw there."""
    rng = random.Random(seed)
    plans: list[
        tuple[int, int, int, int, str, str, bool]
    ] = []  # (lin, call, ret, client, kind, key, unknown)
    for client in range(n_clients):
        t = rng.randrange(0, 1000) * 1000
        for _ in range(n_ops // n_clients):
            call, ret = t, t + rng.randrange(100, 3000) * 1000
            kind = rng.choices(["get", "put", "delete", "cas"], [50, 30, 5, 15])[0]
            lost = kind != "get" and rng.random() < unknown
            lin = rng.randrange(call, ret + (5_000_000 if lost else 1))
            plans.append((lin, call, ret, client, kind, f"k{rng.randrange(n_keys)}", lost))
            t = ret + rng.randrange(0, 500) * 1000
    plans.sort()
    state: dict[str, str | None] = {}
    key_rev: dict[str, int] = {}
    written: list[str] = []
    ops, order, log_index = [], [], 0
    for i, (_, call, ret, client, kind, key, lost) in enumerate(plans):
        value, expected, ok, revision = f"v{i}", None, True, 0
        effect = not lost or rng.random() < 0.5
        if kind == "get":
            value, revision = state.get(key), key_rev.get(key, 0)
        elif kind == "cas":
            expected = state.get(key) if rng.random() < 0.5 else rng.choice([None, *written[-20:]])
            ok = state.get(key) == expected
            effect = effect and ok
        if kind != "get" and effect:
            log_index += 1
            state[key] = None if kind == "delete" else value
            key_rev[key] = revision = log_index
            written.append(value)
        op = Op(
            client,
            kind,
            key,
            value,
            expected,
            None if lost else ok,
            call,
            None if lost else ret,
            revision=revision,
        )
        ops.append(op)
        if effect:
            order.append(op)
    ops.sort(key=lambda o: o.call)
    return Generated(ops, order, dict(state))


def test_generated_valid_history_passes_quickly() -> None:
    gen = generate(7, unknown=0.02)
    assert len(gen.ops) == 2000
    start = time.perf_counter()
    result = check_linearizable(gen.ops)
    elapsed = time.perf_counter() - start
    assert result.ok, result.explanation
    assert result.checked > 1500
    assert elapsed < 1.0, f"{elapsed:.2f}s"


def test_several_generated_histories_pass() -> None:
    for seed in range(5):
        gen = generate(seed, n_ops=400, n_keys=3, unknown=0.05)
        assert check_linearizable(gen.ops).ok, seed


def _plant_stale_read(gen: Generated, rng: random.Random) -> Op:
    """Make one read return the value of write P although a write W called after P returned had
    itself returned before the read was called: no order can explain it."""
    order_by_key: dict[str, list[Op]] = {}
    for op in gen.order:
        if op.kind != "get":
            order_by_key.setdefault(op.key, []).append(op)
    reads = [op for op in gen.ops if op.kind == "get" and op.ok]
    rng.shuffle(reads)
    for read in reads:
        writes = order_by_key.get(read.key, [])
        for prev, nxt in zip(writes, writes[1:], strict=False):
            if prev.ok and prev.kind == "put" and nxt.ok and prev.ret < nxt.call and nxt.ret < read.call:
                if read.value != prev.value:
                    read.value = prev.value
                    return read
    raise AssertionError("no place to plant the bug")


def test_planted_stale_read_is_caught() -> None:
    for seed in range(3):
        gen = generate(seed, n_ops=1000, unknown=0.02)
        bad = _plant_stale_read(gen, random.Random(seed))
        result = check_linearizable(gen.ops)
        assert not result.ok and not result.timed_out
        assert result.failed_keys == [bad.key]
        assert result.keys[bad.key].stuck is bad  # the explanation points at the planted read


def test_generated_history_passes_the_other_checkers() -> None:
    gen = generate(3, n_ops=1000, unknown=0.02)
    as_session = [dataclasses.replace(op, consistency="session", session=f"s{op.client}") for op in gen.ops]
    as_bounded = [dataclasses.replace(op, consistency="bounded", staleness_bound=0.0) for op in gen.ops]
    assert check_sessions(as_session) == []
    assert check_bounded(as_bounded) == []
    assert check_no_lost_writes(gen.final, gen.ops) == []


# --- session guarantees --------------------------------------------------------------------------------
def sess(op: Op, session: str = "s1") -> Op:
    return dataclasses.replace(op, consistency="session", session=session)


def test_session_read_your_writes_violation() -> None:
    ops = [sess(put(1, "v1", 0, 10, revision=5)), sess(get(1, "v0", 20, 30, revision=3))]
    anomalies = check_sessions(ops)
    assert [a.kind for a in anomalies] == ["read-your-writes"]
    assert anomalies[0].ops == ops


def test_session_read_your_writes_valid() -> None:
    own = sess(put(1, "v1", 0, 10, revision=5))
    assert (
        check_sessions([own, sess(get(1, "v1", 20, 30, revision=5)), sess(get(1, "v2", 40, 50, revision=7))])
        == []
    )
    # Another session's stale read is not this session's business.
    assert check_sessions([own, sess(get(2, "v0", 20, 30, revision=3), "s2")]) == []
    # A read concurrent with the write may miss it.
    assert check_sessions([own, sess(get(1, "v0", 5, 30, revision=3))]) == []


def test_session_same_revision_other_value() -> None:
    ops = [sess(put(1, "v1", 0, 10, revision=5)), sess(get(1, "zz", 20, 30, revision=5))]
    assert [a.kind for a in check_sessions(ops)] == ["read-your-writes"]


def test_session_not_found_read_after_own_put() -> None:
    ops = [sess(put(1, "v1", 0, 10, revision=5)), sess(get(1, None, 20, 30))]
    assert [a.kind for a in check_sessions(ops)] == ["read-your-writes"]
    # A later delete by someone else explains it.
    assert check_sessions([*ops, delete(2, 12, 15, revision=6)]) == []
    assert check_sessions([sess(delete(1, 0, 10, revision=5)), sess(get(1, None, 20, 30))]) == []


def test_session_monotonic_reads_violation() -> None:
    ops = [sess(get(1, "v2", 0, 10, revision=7)), sess(get(1, "v1", 20, 30, revision=5))]
    anomalies = check_sessions(ops)
    assert [a.kind for a in anomalies] == ["monotonic-reads"]
    assert "older" in anomalies[0].detail
    assert (
        check_sessions([sess(get(1, "v1", 0, 10, revision=5)), sess(get(1, "v2", 20, 30, revision=7))]) == []
    )


def test_session_identity_falls_back_to_client() -> None:
    ops = [
        dataclasses.replace(op, consistency="session")
        for op in (get(1, "v2", 0, 10, revision=7), get(1, "v1", 20, 30, revision=5))
    ]
    assert len(check_sessions(ops)) == 1
    ops[1].client = 2
    assert check_sessions(ops) == []


# --- bounded staleness -------------------------------------------------------------------------------
def test_bounded_read_too_old() -> None:
    write = put(1, "v1", 0, 1000, revision=5)  # acknowledged at 1 s
    read = get(2, "v0", 3000, 3010, consistency="bounded", staleness_bound=1.0, revision=3)
    anomalies = check_bounded([write, read])
    assert [a.kind for a in anomalies] == ["stale-bounded-read"]
    assert anomalies[0].ops == [write, read]
    # Within the bound the old value is allowed.
    assert check_bounded([write, dataclasses.replace(read, staleness_bound=5.0)]) == []
    assert check_bounded([write, dataclasses.replace(read, value="v1", revision=5)]) == []


def test_bounded_not_found_read() -> None:
    bounded = {"consistency": "bounded", "staleness_bound": 0.5}
    gone = [put(1, "v1", 0, 10, revision=5), delete(1, 20, 30, revision=6)]
    assert check_bounded([*gone, get(2, None, 2000, 2010, **bounded)]) == []
    assert len(check_bounded([gone[0], get(2, None, 2000, 2010, **bounded)])) == 1


# --- lost writes -------------------------------------------------------------------------------------
def test_lost_acknowledged_write() -> None:
    ops = [put(1, "a", 0, 10), put(1, "b", 20, 30)]
    anomalies = check_no_lost_writes({"k": "a"}, ops)
    assert [a.kind for a in anomalies] == ["lost-write"]
    assert anomalies[0].ops == [ops[1]]
    assert check_no_lost_writes({"k": "b"}, ops) == []
    assert [a.kind for a in check_no_lost_writes({"k": None}, ops)] == ["lost-write"]


def test_final_value_from_unknown_or_concurrent_write() -> None:
    ops = [put(1, "a", 0, 10), put(2, "b", 5, 30), put(3, "c", 40, None, ok=None)]
    assert check_no_lost_writes({"k": "c"}, ops) == []
    assert check_no_lost_writes({"k": "b"}, ops) == []
    assert check_no_lost_writes({"k": "a"}, ops) == []  # a and b were concurrent
    assert [a.kind for a in check_no_lost_writes({"k": "zzz"}, ops)] == ["unexpected-value"]
    # A failed write must not show up either.
    assert [a.kind for a in check_no_lost_writes({"k": "f"}, [*ops, put(1, "f", 50, 60, ok=False)])] == [
        "unexpected-value"
    ]


def test_summarize_counts_by_kind() -> None:
    anomalies = [
        Anomaly("lost-write", "a", ""),
        Anomaly("read-your-writes", "b", ""),
        Anomaly("lost-write", "c", ""),
    ]
    assert summarize(anomalies) == {"lost-write": 2, "read-your-writes": 1}


# --- persistence -------------------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path) -> None:
    history = History()
    history.extend(generate(5, n_ops=50, unknown=0.2).ops)
    history.append(get(9, None, 1, 2, consistency="bounded", staleness_bound=0.25, session="s9", shard=3))
    path = tmp_path / "history.jsonl"
    history.to_jsonl(path)
    loaded = History.from_jsonl(path)
    assert loaded.ops == history.ops
    assert len(loaded) == 51 and loaded[-1].shard == 3
    assert {k: len(v) for k, v in loaded.by_key().items()} == {k: len(v) for k, v in history.by_key().items()}


# --- cross-check against brute force --------------------------------------------------------------------
def _brute_force(ops: list[Op]) -> bool:
    """Try every order of every admissible subset: the definition, written independently."""
    required, optional = [], []
    for op in ops:
        known = op.ok is not None and op.ret is not None
        if op.kind == "get" or (op.kind == "cas" and op.ok is False):
            if known and (op.ok or op.kind == "cas"):
                required.append(op)
        elif op.ok is not False:
            (required if known else optional).append(op)

    def effect(state: str | None, op: Op) -> tuple[bool, str | None]:
        if op.kind == "get":
            return state == op.value, state
        if op.kind == "cas":
            if op.ok is False:
                return state != op.expected, state
            return state == op.expected, op.value
        return True, op.written

    def precedes(a: Op, b: Op) -> bool:
        return a.ret is not None and a.ok is not None and a.ret < b.call

    def extend(order: list[Op], rest: list[Op], state: str | None) -> bool:
        if not rest:
            return True
        for i, op in enumerate(rest):
            others = rest[:i] + rest[i + 1 :]
            if any(precedes(o, op) for o in others):
                continue
            allowed, new_state = effect(state, op)
            if allowed and extend([*order, op], others, new_state):
                return True
        return False

    for mask in range(1 << len(optional)):
        chosen = [op for i, op in enumerate(optional) if mask >> i & 1]
        if extend([], required + chosen, None):
            return True
    return False


def _random_small_history(rng: random.Random) -> list[Op]:
    # Few values so that reads and cas collide with writes often; two mixes of outcomes, one of them
    # rich in unknown writes and failed cas, where the pruning of unknown writes matters.
    values = rng.choice([["a", "b", "c"], ["a", "b", "c", "d", "e", "f"]])
    oks: list[bool | None] = rng.choice([[True, True, True, False, None], [True, False, None, None]])
    ops = []
    for client in range(rng.choice([3, 4])):
        t = rng.randrange(0, 4)
        for _ in range(rng.randrange(1, 3)):
            kind = rng.choice(["get", "get", "put", "delete", "cas"])
            ok = rng.choice(oks)
            call, ret = t, t + rng.randrange(0, 5)
            value, expected = rng.choice([*values, None]), rng.choice(["a", "b", None])
            if kind != "get":
                value = rng.choice(values)
            ops.append(Op(client, kind, "k", value, expected, ok, call, None if ok is None else ret))
            t = ret + rng.randrange(0, 3)
    return ops


def test_agrees_with_brute_force_on_small_random_histories() -> None:
    rng = random.Random(42)
    verdicts = Counter()
    for _ in range(1500):
        ops = _random_small_history(rng)
        expected = _brute_force(ops)
        assert check_linearizable(ops).ok == expected, ops
        verdicts[expected] += 1
    assert min(verdicts.values()) > 200  # both verdicts well represented
