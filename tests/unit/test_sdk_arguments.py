"""The SDK's pure logic, without processes: argument checks (`InvalidArgument` before anything is
sent), conflicting constructor arguments, the CAS result's fields, and deadlines driven by a
scripted runner on a fake clock (every pause and call cut to what remains of the operation's
time; no attempt once it is gone; a call's own `timeout=` wins over the client's).

The behaviour of both doors against a real cluster: tests/cluster/test_sdk_doors.py."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import pytest

from kvstore import AsyncClient, CasResult, Client, Consistency, Item, errors
from kvstore.client import arguments
from kvstore.client.core import ClientCore
from kvstore.client.results import cas_result
from kvstore.cluster.local import LocalCluster
from kvstore.config import Limits
from kvstore.proto import kvstore_pb2 as pb
from tests.unit.test_client_plans import (
    FakeClock,
    ScriptedRunner,
    addr,
    header,
    key_on,
    make_core,
    replies,
    transport_error,
)

LIMITS = Limits()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def first_step(plan: Any) -> Any:
    """Start a plan: its argument checks run before its first step (nothing is sent before)."""
    return next(plan)


# ----- arguments -------------------------------------------------------------------------------

BAD_CALLS = {
    "str key": lambda c: c.put("k", b"v"),
    "empty key": lambda c: c.put(b"", b"v"),
    "long key": lambda c: c.get(b"k" * (LIMITS.max_key_bytes + 1)),
    "int key": lambda c: c.delete([1]),
    "str value": lambda c: c.put(b"k", "v"),
    "None value": lambda c: c.compare_and_set(b"k", None, 0),
    "large value": lambda c: c.put(b"k", b"v" * (LIMITS.max_value_bytes + 1)),
    "negative revision": lambda c: c.compare_and_set(b"k", b"v", -1),
    "huge revision": lambda c: c.compare_and_set(b"k", b"v", 2**64),
    "float revision": lambda c: c.compare_and_set(b"k", b"v", 1.0),
    "bool revision": lambda c: c.compare_and_set(b"k", b"v", True),
    "keys as bytes": lambda c: c.multi_get(b"abc"),
    "keys as str": lambda c: c.delete("abc"),
    "one empty key among many": lambda c: c.multi_get([b"a", b""]),
    "a key twice in a delete": lambda c: c.delete([b"a", b"a"]),
    "a key twice in a put": lambda c: c.multi_put([(b"a", b"1"), (b"a", b"2")]),
    "items not pairs": lambda c: c.multi_put([b"a", b"b"]),
    "items value str": lambda c: c.multi_put({b"a": "1"}),
    "atomic empty": lambda c: c.multi_put({}, atomic=True),
    "atomic not bool": lambda c: c.delete([b"a"], atomic="yes"),
    "scan limit 0": lambda c: c.scan(limit=0),
    "scan limit too big": lambda c: c.scan(limit=LIMITS.max_scan_limit + 1),
    "scan limit float": lambda c: c.scan(limit=10.0),
    "scan prefix str": lambda c: c.scan(prefix="p"),
    "consistency word": lambda c: c.get(b"k", "sometimes"),
    "consistency int": lambda c: c.get(b"k", 3),
    "bounded without seconds": lambda c: c.get(b"k", "bounded"),
    "timeout 0": lambda c: c.get(b"k", timeout=0),
    "timeout negative": lambda c: c.put(b"k", b"v", timeout=-1),
    "timeout nan": lambda c: c.delete([b"k"], timeout=math.nan),
    "timeout inf": lambda c: c.scan(timeout=math.inf),
    "timeout str": lambda c: c.multi_get([b"k"], timeout="1"),
    "timeout bool": lambda c: c.put(b"k", b"v", timeout=True),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_every_bad_argument_is_refused_before_anything_is_sent(clock: FakeClock, call: Any) -> None:
    core = make_core(clock)
    with pytest.raises(errors.InvalidArgument):
        first_step(call(core))


def test_the_refusal_says_what_is_wrong_and_what_is_valid(clock: FakeClock) -> None:
    core = make_core(clock)
    with pytest.raises(errors.InvalidArgument, match=r"must be bytes, not str \(encode it"):
        first_step(core.put("k", b"v"))
    with pytest.raises(errors.InvalidArgument, match=r"valid forms: strong, session, eventual, bounded"):
        first_step(core.get(b"k", "sometimes"))
    with pytest.raises(errors.InvalidArgument, match=r"Consistency.STRONG"):
        first_step(core.get(b"k", 3))
    with pytest.raises(errors.InvalidArgument, match=r"expected_revision must be 0 .* not -1"):
        first_step(core.compare_and_set(b"k", b"v", -1))


@pytest.mark.parametrize("name", ["strong", "session", "eventual", "bounded:0.5s", "bounded0.5", " Strong "])
def test_consistency_by_name_reads_at_that_level(clock: FakeClock, name: str) -> None:
    core = make_core(clock)
    core.leaders[0] = addr(0, 0)
    runner = ScriptedRunner(replies(pb.GetResponse(header=header(0, 1))), clock)
    runner.run(core.get(key_on(0), name))
    expected = Consistency.parse(name)
    sent = runner.kv_calls()[0].request.read
    assert (sent.consistency, sent.max_staleness_seconds) == (expected.level, expected.max_staleness)


def test_empty_collections_are_nothing_to_do(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(replies(), clock)  # any call would fail: none may be made
    assert runner.run(core.multi_get([])) == []
    assert runner.run(core.delete([], atomic=False)).deleted == 0
    assert runner.run(core.multi_put([], atomic=False)).header.revision == 0
    assert runner.calls == []


def test_arguments_accept_what_they_document() -> None:
    assert arguments.timeout(None) is None and arguments.timeout(2) == 2.0
    assert arguments.items({b"a": b"1"}, LIMITS) == [(b"a", b"1")]
    assert arguments.items([(b"a", b"1"), (b"b", b"")], LIMITS) == [(b"a", b"1"), (b"b", b"")]
    assert arguments.keys((k for k in [b"a", b"b"]), LIMITS) == [b"a", b"b"]
    assert arguments.revision(0) == 0 and arguments.revision(2**63 - 1) == 2**63 - 1
    assert arguments.endpoints("h:1") == ["h:1"] and arguments.endpoints(["[::1]:7000"]) == ["[::1]:7000"]
    for bad in ["h", "h:", ":7000", "h:x", "h:70000", 7000, [b"h:1"]]:
        with pytest.raises(errors.InvalidArgument):
            arguments.endpoints(bad)


# ----- constructors ----------------------------------------------------------------------------

DOORS = [Client, AsyncClient]


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.__name__)
def test_conflicting_or_missing_places_are_refused(door: Any, tmp_path: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="exactly one of: endpoints"):
        door(["127.0.0.1:7000"], router="127.0.0.1:7400")
    with pytest.raises(errors.InvalidArgument, match="given: none"):
        door()
    with pytest.raises(errors.InvalidArgument, match="endpoints is empty"):
        door([])
    with pytest.raises(errors.InvalidArgument, match="read_policy and zone"):
        door(router="127.0.0.1:7400", read_policy="nearest")
    with pytest.raises(errors.InvalidArgument, match="read_policy and zone"):
        door(router="127.0.0.1:7400", zone="zone-a")
    (tmp_path / "cluster.json").write_text("{}")
    with pytest.raises(errors.InvalidArgument, match="from_cluster reads the nodes' addresses"):
        door.from_cluster(tmp_path, router="127.0.0.1:7400")


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": None},
        {"consistency": "sometimes"},
        {"consistency": 1},
        {"read_policy": "closest"},
        {"session": "not-a-token"},
        {"zone": 3},
        {"retry": {"attempts": 3}},
    ],
    ids=str,
)
def test_bad_constructor_options_are_refused(door: Any, options: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidArgument):
        door(["127.0.0.1:7000"], **options)


def test_from_cluster_checks_sizes_against_the_nodes_limits(tmp_path: Any) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.create(shards=1, replicas=1)  # files only: no process is started
    config = cluster.node_config("s0r0")
    bigger = dataclasses.replace(config.limits, max_value_bytes=2 * LIMITS.max_value_bytes)
    (tmp_path / "nodes" / "s0r0.toml").write_text(dataclasses.replace(config, limits=bigger).to_toml())
    for door in DOORS:
        kv = door.from_cluster(tmp_path)
        assert kv.core.limits == bigger
        first_step(kv.core.put(b"k", b"v" * (LIMITS.max_value_bytes + 1)))  # within the nodes' limit
        with pytest.raises(errors.InvalidArgument, match="the limit is"):
            first_step(kv.core.put(b"k", b"v" * (bigger.max_value_bytes + 1)))
        assert door.from_cluster(tmp_path, limits=LIMITS).core.limits == LIMITS


def test_constructor_options_by_name() -> None:
    kv = Client(["127.0.0.1:7000"], consistency="session", read_policy="nearest")
    assert kv.core.consistency == Consistency.SESSION and kv.core.read_policy.value == "nearest"
    kv.close()


# ----- closed clients (no cluster needed: nothing may be sent) ----------------------------------


def test_a_closed_client_refuses_every_call() -> None:
    kv = Client(["127.0.0.1:1"])
    kv.close()
    kv.close()  # twice: harmless
    for call in (lambda: kv.get(b"k"), lambda: kv.put(b"k", b"v"), lambda: kv.cluster_map()):
        with pytest.raises(errors.ClientClosed, match="nothing was sent"):
            call()


def test_a_closed_async_client_refuses_every_call() -> None:
    async def scenario() -> None:
        kv = AsyncClient(["127.0.0.1:1"])
        await kv.close()
        for call in (kv.get(b"k"), kv.put(b"k", b"v"), kv.cluster_map()):
            with pytest.raises(errors.ClientClosed, match="nothing was sent"):
                await call

    asyncio.run(scenario())


def test_an_async_client_refuses_a_second_event_loop() -> None:
    kv = AsyncClient(["127.0.0.1:1"], timeout=0.5)  # nothing listens: calls fail, quickly

    async def call() -> None:
        with pytest.raises(errors.KvError):
            await kv.get(b"k")

    asyncio.run(call())
    with pytest.raises(RuntimeError, match="one AsyncClient per event loop"):
        asyncio.run(kv.get(b"k"))


# ----- the CAS result --------------------------------------------------------------------------


def test_a_failed_cas_has_no_revision_of_its_own() -> None:
    lost = cas_result(
        pb.CompareAndSetResponse(
            header=header(0, 9), succeeded=False, current=pb.KeyValue(key=b"k", value=b"x", revision=7)
        )
    )
    assert lost == CasResult(False, None, Item(b"k", b"x", 7)) and lost.current_revision == 7
    absent = cas_result(pb.CompareAndSetResponse(header=header(0, 9), succeeded=False))
    assert absent == CasResult(False, None, None) and absent.current_revision == 0
    won = cas_result(pb.CompareAndSetResponse(header=header(0, 9), succeeded=True))
    assert won == CasResult(True, 9, None) and won.current_revision == 9


# ----- deadlines (fake clock) ------------------------------------------------------------------


def answering_after(clock: FakeClock, seconds: float, error: errors.KvError) -> Any:
    """Every call fails with `error` after `seconds`, or at its own timeout if that comes first
    (as a real call does: gRPC ends it at its deadline)."""

    def answer(call: Any) -> Any:
        clock.now += min(seconds, call.timeout)
        raise error

    return answer


def test_a_pause_never_runs_past_the_deadline_and_no_attempt_follows_it(clock: FakeClock) -> None:
    # Attempts of 0.3 s against nodes that refuse (definitely not applied), back-off up to 0.5 s.
    core = make_core(clock, timeout=1.0, rpc_timeout=0.5, backoff_initial=0.4, backoff_max=0.5)
    runner = ScriptedRunner(answering_after(clock, 0.3, errors.Unavailable("no leader")), clock)
    started = clock.now
    with pytest.raises(errors.Unavailable):
        runner.run(core.put(key_on(0), b"v"))
    assert clock.now - started <= 1.0 + 1e-9
    assert runner.sleeps and all(s <= 0.5 for s in runner.sleeps)
    assert all(c.timeout <= 0.5 for c in runner.calls)


def test_the_write_that_timed_out_is_unknown_outcome_at_the_deadline(clock: FakeClock) -> None:
    core = make_core(clock, timeout=1.0, rpc_timeout=0.5, backoff_initial=0.4, backoff_max=0.5)
    runner = ScriptedRunner(answering_after(clock, 0.5, transport_error(errors.UnknownOutcome)), clock)
    started = clock.now
    with pytest.raises(errors.UnknownOutcome):
        runner.run(core.put(key_on(0), b"v"))
    assert clock.now - started <= 1.0 + 1e-9


def test_a_calls_own_timeout_wins_over_the_clients(clock: FakeClock) -> None:
    core = make_core(clock, timeout=10.0, rpc_timeout=5.0)
    core.leaders[0] = addr(0, 0)  # known: no leader discovery
    runner = ScriptedRunner(answering_after(clock, 5.0, transport_error(errors.UnknownOutcome)), clock)
    started = clock.now
    with pytest.raises(errors.Timeout):
        runner.run(core.get(key_on(0), timeout=1.5))
    assert clock.now - started <= 1.5 + 1e-9
    assert max(c.timeout for c in runner.calls) == 0.5  # a third of 1.5 s: other replicas get a turn
    assert len({c.address for c in runner.calls}) > 1
    longer = make_core(clock, timeout=1.0)
    runner = ScriptedRunner(answering_after(clock, 0.5, errors.Unavailable("no leader")), clock)
    started = clock.now
    with pytest.raises(errors.Unavailable):
        runner.run(longer.put(key_on(0), b"v", timeout=4.0))
    assert 3.5 <= clock.now - started <= 4.0 + 1e-9


def test_fetching_the_map_is_within_the_operations_deadline(clock: FakeClock) -> None:
    core = ClientCore(seeds=[f"10.0.0.{i}:7000" for i in range(10)], retry=make_core(clock).retry)

    def timed_out(call: Any) -> Any:
        clock.now += call.timeout  # no seed answers: each call takes its whole timeout
        raise transport_error(errors.UnknownOutcome)

    runner = ScriptedRunner(timed_out, clock)
    started = clock.now
    with pytest.raises(errors.Unavailable, match="could not fetch the cluster map"):
        runner.run(core.get(b"k", timeout=2.0))
    assert clock.now - started <= 2.0 + 1e-9
    assert len(runner.calls) < 10  # not one whole rpc_timeout per seed


def test_the_parts_of_a_split_operation_share_one_deadline(clock: FakeClock) -> None:
    core = make_core(clock, timeout=1.0, rpc_timeout=0.5)
    core.leaders.update({0: addr(0, 0), 1: addr(1, 0)})
    runner = ScriptedRunner(answering_after(clock, 0.5, transport_error(errors.UnknownOutcome)), clock)
    started = clock.now
    with pytest.raises(errors.Timeout):
        runner.run(core.multi_get([key_on(0), key_on(1)]))
    # Parts run one after another here: with a deadline each, they would take 2 s.
    assert clock.now - started <= 1.0 + 1e-9
    assert {c.address for c in runner.calls} <= {addr(s, r) for s in (0, 1) for r in range(3)}
