"""`ClientCore`'s plans driven by a scripted runner: no processes, no sockets, a fake clock.

The runner answers each `Call` from a script (a response, or a typed error to raise), so each test
decides what every replica says and checks what the plan does next: where it sends the next
attempt, with which request id and `retry` flag, how long it pauses, and when it gives up. The
same plans run in `Client` and `AsyncClient`, so what holds here holds for both."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore import AsyncClient, Client, Consistency, RetryPolicy, errors
from kvstore.batch_ops import FIELD_BY_METHOD, METHOD_BY_FIELD
from kvstore.client.core import ClientCore, ClientSettings, ReadPolicy
from kvstore.client.plans import Call, Parallel, Plan, Sleep, drive
from kvstore.client.session import decode_session, encode_session
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo

Answer = Callable[[Call], Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRunner:
    """Runs a plan as the front doors do; `answer(call)` returns the response or raises a KvError.
    A Sleep advances the fake clock by its length, a Call by `call_seconds`; Parallel sub-plans
    run one after another, in order. Every call is recorded with a copy of its request as sent
    (the plans reuse and change the request object between attempts)."""

    def __init__(self, answer: Answer, clock: FakeClock, call_seconds: float = 0.0) -> None:
        self.answer = answer
        self.clock = clock
        self.call_seconds = call_seconds
        self.calls: list[Call] = []
        self.sleeps: list[float] = []

    def run(self, plan: Plan) -> Any:
        return drive(plan, self._perform)

    def _perform(self, step: Any) -> Any:
        if isinstance(step, Call):
            sent = type(step.request)()
            sent.CopyFrom(step.request)
            call = Call(step.address, step.service, step.method, sent, step.timeout)
            self.calls.append(call)
            self.clock.now += self.call_seconds
            return self.answer(call)
        if isinstance(step, Sleep):
            self.sleeps.append(step.seconds)
            self.clock.now += step.seconds
            return None
        if isinstance(step, Parallel):
            return [self.run(p) for p in step.plans]
        raise TypeError(f"unknown step {step!r}")

    def kv_calls(self) -> list[Call]:
        return [c for c in self.calls if c.service == "KV"]


def addr(shard: int, replica: int, epoch: int = 1) -> str:
    return f"10.{epoch}.{shard}.{replica}:7000"


def make_map(epoch: int = 1, shards: int = 2) -> ClusterMap:
    return ClusterMap(
        epoch,
        tuple(
            ShardInfo(
                s, tuple(ReplicaInfo(f"s{s}r{r}", addr(s, r, epoch), f"10.9.{s}.{r}:9000") for r in range(3))
            )
            for s in range(shards)
        ),
        vnodes_per_shard=8,
    )


MAP = make_map()


def key_on(shard: int, cluster_map: ClusterMap = MAP, skip: int = 0) -> bytes:
    keys = (f"key-{i}".encode() for i in itertools.count())
    found = (k for k in keys if cluster_map.slots.shard_for(k) == shard)
    return next(itertools.islice(found, skip, None))


def header(shard: int, revision: int, epoch: int = 1) -> pb.ResponseHeader:
    return pb.ResponseHeader(shard=shard, revision=revision, epoch=epoch)


def transport_error(cls: type[errors.KvError]) -> errors.KvError:
    """What `errors.from_rpc_error` makes of a bare gRPC status: no kvstore server said it."""
    return cls("no answer", from_server=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_core(clock: FakeClock, timeout: float = 10.0, rpc_timeout: float = 2.0, **retry: Any) -> ClientCore:
    policy = RetryPolicy(clock=clock, jitter=0.0, **retry)  # no jitter: pauses are exact
    settings = ClientSettings(timeout=timeout, rpc_timeout=rpc_timeout)
    return ClientCore(cluster_map=make_map(), settings=settings, retry=policy)


def replies(*outcomes: Any) -> Answer:
    """Answer the KV calls in order with `outcomes` (an exception is raised)."""
    queue = list(outcomes)

    def answer(call: Call) -> Any:
        assert call.service == "KV", f"unexpected {call.service}.{call.method}"
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return answer


def raising(outcomes: Iterator[errors.KvError]) -> Answer:
    """Answer every call with the next error of `outcomes`."""

    def answer(call: Call) -> Any:
        raise next(outcomes)

    return answer


# ----- writes ------------------------------------------------------------------------------------


def test_not_leader_redirects_to_the_hinted_leader_at_once(clock: FakeClock) -> None:
    core = make_core(clock)
    key = key_on(0)
    runner = ScriptedRunner(
        replies(errors.NotLeader("no", leader=addr(0, 2)), pb.PutResponse(header=header(0, 7))), clock
    )
    assert runner.run(core.put(key, b"v")).header.revision == 7
    assert [c.address for c in runner.calls] == [addr(0, 0), addr(0, 2)]
    assert runner.sleeps == []  # a named leader is tried at once
    assert core.leaders[0] == addr(0, 2)  # and remembered for the next write
    runner.answer = replies(pb.PutResponse(header=header(0, 8)))
    runner.run(core.put(key, b"w"))
    assert runner.calls[-1].address == addr(0, 2)


def test_redirects_are_free_only_twice_then_back_off(clock: FakeClock) -> None:
    core = make_core(clock)
    hint = errors.NotLeader("no", leader=addr(0, 1))
    runner = ScriptedRunner(replies(hint, hint, hint, pb.PutResponse(header=header(0, 3))), clock)
    runner.run(core.put(key_on(0), b"v"))
    assert len(runner.calls) == 4
    assert runner.sleeps == [0.02 * 2**2]  # the third attempt's pause: attempts count from the first


def test_not_leader_without_a_hint_backs_off_and_tries_the_next_replica(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(replies(errors.NotLeader("no"), pb.PutResponse(header=header(0, 3))), clock)
    runner.run(core.put(key_on(0), b"v"))
    assert [c.address for c in runner.calls] == [addr(0, 0), addr(0, 1)]
    assert runner.sleeps == [0.02]


def test_wrong_shard_refreshes_the_map_and_retries_under_it(clock: FakeClock) -> None:
    core = make_core(clock)
    newer = make_map(epoch=2)  # shard 0 moved to other addresses
    key = key_on(0)
    assert newer.slots.shard_for(key) == 0

    def answer(call: Call) -> Any:
        if call.service == "Admin":
            assert call.method == "ClusterMap"
            return newer.to_proto()
        if call.request.epoch == 1:
            raise errors.WrongShard("moved", epoch=2)
        return pb.PutResponse(header=header(0, 11, epoch=2))

    runner = ScriptedRunner(answer, clock)
    assert runner.run(core.put(key, b"v")).header.revision == 11
    first, retried = runner.kv_calls()
    assert (first.address, first.request.epoch) == (addr(0, 0), 1)
    assert (retried.address, retried.request.epoch) == (addr(0, 0, epoch=2), 2)
    assert retried.request.request_id == first.request.request_id
    assert core.cluster_map.epoch == 2 and runner.sleeps == []


def test_unknown_outcome_is_retried_with_the_same_id_and_the_retry_flag(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(
        replies(
            errors.Unavailable("no leader"),  # a server's definite "not applied": not a retry yet
            errors.UnknownOutcome("timed out"),  # may have applied: from now on, a retry
            transport_error(errors.Unavailable),
            pb.PutResponse(header=header(0, 5)),
        ),
        clock,
    )
    runner.run(core.put(key_on(0), b"v"))
    calls = runner.calls
    assert len({c.request.request_id for c in calls}) == 1
    assert [c.request.retry for c in calls] == [False, False, True, True]
    # No answer from a replica: the next attempt goes to the next one (it may lead now).
    assert [c.address for c in calls] == [addr(0, 0), addr(0, 1), addr(0, 2), addr(0, 0)]


def test_a_transport_failure_makes_the_next_attempt_a_retry(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(
        replies(transport_error(errors.Unavailable), pb.PutResponse(header=header(0, 5))), clock
    )
    runner.run(core.put(key_on(0), b"v"))
    assert [c.request.retry for c in runner.calls] == [False, True]


def test_session_expired_is_final(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(
        replies(errors.UnknownOutcome("timed out"), errors.SessionExpired("evicted")), clock
    )
    with pytest.raises(errors.SessionExpired):
        runner.run(core.put(key_on(0), b"v"))
    assert len(runner.calls) == 2


@pytest.mark.parametrize(
    "final", [errors.InvalidArgument("too big"), errors.DiskFull("full"), errors.CrossShardWrite("no")]
)
def test_errors_that_are_not_retryable_end_the_write_at_once(clock: FakeClock, final: errors.KvError) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(replies(final), clock)
    with pytest.raises(type(final)):
        runner.run(core.put(key_on(0), b"v"))
    assert len(runner.calls) == 1 and runner.sleeps == []


def test_overloaded_backs_off_exponentially_on_the_same_leader(clock: FakeClock) -> None:
    core = make_core(clock)
    busy = errors.Overloaded("busy")
    runner = ScriptedRunner(replies(busy, busy, busy, pb.PutResponse(header=header(0, 2))), clock)
    runner.run(core.put(key_on(0), b"v"))
    assert {c.address for c in runner.calls} == {addr(0, 0)}
    assert runner.sleeps == [0.02, 0.04, 0.08]
    assert not any(c.request.retry for c in runner.calls)  # refused before it started


def test_backoff_is_capped_and_jittered_within_its_bounds(clock: FakeClock) -> None:
    policy = RetryPolicy(backoff_initial=0.1, backoff_max=0.3, jitter=0.5)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.3), (9, 0.3)]:
        pauses = [policy.pause(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses)
        assert len(set(pauses)) > 1  # jittered


def test_a_write_gives_up_at_its_deadline_with_the_servers_refusal(clock: FakeClock) -> None:
    core = make_core(clock, timeout=5.0, rpc_timeout=2.0)
    start = clock.now
    runner = ScriptedRunner(replies(*[errors.Unavailable("no leader")] * 100), clock, call_seconds=1.0)
    with pytest.raises(errors.Unavailable):  # definite: no attempt applied
        runner.run(core.put(key_on(0), b"v"))
    assert 5.0 <= clock.now - start < 5.0 + 1.0 + 0.5  # the last call, the last pause
    # No call outlives the deadline: the last ones get what is left of it.
    assert all(c.timeout <= 2.0 for c in runner.calls)
    assert all(0.001 <= c.timeout for c in runner.calls)


def test_a_write_that_may_have_applied_ends_unknown_at_its_deadline(clock: FakeClock) -> None:
    core = make_core(clock, timeout=5.0)
    runner = ScriptedRunner(replies(*[transport_error(errors.UnknownOutcome)] * 100), clock, call_seconds=2.0)
    with pytest.raises(errors.UnknownOutcome, match="write outcome unknown"):
        runner.run(core.put(key_on(0), b"v"))


def test_the_last_call_gets_only_what_is_left_of_the_deadline(clock: FakeClock) -> None:
    core = make_core(clock, timeout=5.0, rpc_timeout=2.0)
    runner = ScriptedRunner(replies(*[errors.Unavailable("x")] * 100), clock, call_seconds=1.7)
    with pytest.raises(errors.Unavailable):
        runner.run(core.put(key_on(0), b"v"))
    timeouts = [c.timeout for c in runner.calls]
    assert timeouts[0] == 2.0 and timeouts[-1] < 2.0


def test_writes_are_retried_at_most_write_deadline_even_under_a_longer_timeout(clock: FakeClock) -> None:
    core = make_core(clock, timeout=100.0, write_deadline=30.0)
    start = clock.now
    runner = ScriptedRunner(replies(*[errors.Unavailable("x")] * 1000), clock, call_seconds=1.0)
    with pytest.raises(errors.Unavailable):
        runner.run(core.put(key_on(0), b"v"))
    assert 30.0 <= clock.now - start < 32.0


def test_the_policy_deadline_overrides_the_clients_timeout(clock: FakeClock) -> None:
    core = make_core(clock, timeout=100.0, deadline=3.0)
    start = clock.now
    runner = ScriptedRunner(replies(*[errors.Unavailable("x")] * 100), clock, call_seconds=1.0)
    with pytest.raises(errors.Unavailable):
        runner.run(core.put(key_on(0), b"v"))
    assert 3.0 <= clock.now - start < 4.5


def test_attempts_bound_the_tries(clock: FakeClock) -> None:
    core = make_core(clock, attempts=3)
    runner = ScriptedRunner(replies(*[errors.Unavailable("x")] * 10), clock)
    with pytest.raises(errors.Unavailable):
        runner.run(core.put(key_on(0), b"v"))
    assert len(runner.calls) == 3 and len(runner.sleeps) == 2


# ----- reads -------------------------------------------------------------------------------------


def test_a_read_tries_the_next_replica_and_learns_a_named_leader(clock: FakeClock) -> None:
    core = make_core(clock)
    core.leaders[0] = addr(0, 0)  # known: no leader discovery
    runner = ScriptedRunner(
        replies(
            errors.NotLeader("no", leader=addr(0, 2)),
            pb.GetResponse(header=header(0, 4), found=True, kv=pb.KeyValue(key=b"k", value=b"v")),
        ),
        clock,
    )
    assert runner.run(core.get(key_on(0))).kv.value == b"v"
    assert [c.address for c in runner.calls] == [addr(0, 0), addr(0, 1)]
    assert core.leaders[0] == addr(0, 2) and runner.sleeps == []


def test_a_read_discovers_the_leader_before_its_first_attempt(clock: FakeClock) -> None:
    core = make_core(clock)

    def answer(call: Call) -> Any:
        if call.method == "Status":
            return pb.StatusResponse(leader_address=addr(0, 1))
        return pb.GetResponse(header=header(0, 1))

    runner = ScriptedRunner(answer, clock)
    runner.run(core.get(key_on(0)))
    assert runner.kv_calls()[0].address == addr(0, 1)


def test_a_bounded_read_that_no_follower_can_serve_becomes_strong(clock: FakeClock) -> None:
    core = make_core(clock)
    core.read_policy = ReadPolicy.ROUND_ROBIN
    runner = ScriptedRunner(
        replies(errors.ReplicaBehind("stale"), pb.GetResponse(header=header(0, 1))), clock
    )
    runner.run(core.get(key_on(0), Consistency.bounded(0.5)))
    levels = [c.request.read.consistency for c in runner.calls]
    assert levels == [pb.BOUNDED, pb.STRONG]


def test_a_read_that_gets_no_answer_ends_as_a_timeout(clock: FakeClock) -> None:
    core = make_core(clock, timeout=3.0)
    core.leaders[0] = addr(0, 0)
    runner = ScriptedRunner(replies(*[transport_error(errors.UnknownOutcome)] * 100), clock, call_seconds=1.0)
    with pytest.raises(errors.Timeout):
        runner.run(core.get(key_on(0)))


def test_a_reads_refusal_is_preferred_over_the_timeout_that_ended_it(clock: FakeClock) -> None:
    core = make_core(clock, timeout=3.0)
    core.leaders[0] = addr(0, 0)
    outcomes = itertools.cycle([errors.ReplicaBehind("behind"), transport_error(errors.UnknownOutcome)])
    runner = ScriptedRunner(raising(outcomes), clock, call_seconds=0.5)
    with pytest.raises(errors.ReplicaBehind):
        runner.run(core.get(key_on(0), Consistency.SESSION))


def test_a_read_refreshes_the_map_on_wrong_shard(clock: FakeClock) -> None:
    core = make_core(clock)
    core.leaders[0] = addr(0, 0)
    newer = ClusterMap(2, MAP.shards, MAP.vnodes_per_shard)

    def answer(call: Call) -> Any:
        if call.method == "ClusterMap":
            return newer.to_proto()
        if call.request.epoch == 1:
            raise errors.WrongShard("moved", epoch=2)
        return pb.GetResponse(header=header(0, 1, epoch=2))

    runner = ScriptedRunner(answer, clock)
    runner.run(core.get(key_on(0)))
    assert core.cluster_map.epoch == 2
    assert [c.request.epoch for c in runner.kv_calls()] == [1, 2]


# ----- through a router ----------------------------------------------------------------------------


def test_through_a_router_only_an_unreachable_router_is_tried_again(clock: FakeClock) -> None:
    policy = RetryPolicy(clock=clock, jitter=0.0)
    core = ClientCore(router="router:7400", retry=policy)
    runner = ScriptedRunner(
        replies(transport_error(errors.Unavailable), pb.PutResponse(header=header(0, 1))), clock
    )
    runner.run(core.put(b"k", b"v"))
    assert [c.request.retry for c in runner.calls] == [False, True]
    # The router already followed redirects: its NotLeader is its final answer.
    runner = ScriptedRunner(replies(errors.NotLeader("gave up", leader="x")), clock)
    with pytest.raises(errors.NotLeader):
        runner.run(core.put(b"k", b"v"))
    assert len(runner.calls) == 1


# ----- split writes --------------------------------------------------------------------------------


def _split_write(clock: FakeClock, outcome_of_shard_1: Any) -> tuple[ScriptedRunner, Plan]:
    core = make_core(clock, attempts=1)

    def answer(call: Call) -> Any:
        shard = 0 if call.address.startswith("10.1.0.") else 1
        if shard == 1 and isinstance(outcome_of_shard_1, BaseException):
            raise outcome_of_shard_1
        return pb.MultiPutResponse(header=header(shard, 3))

    items = [(key_on(0), b"a"), (key_on(1), b"b")]
    return ScriptedRunner(answer, clock), core.multi_put(items, atomic=False)


def test_a_split_write_with_a_part_applied_and_a_part_refused_is_reported_unknown(clock: FakeClock) -> None:
    runner, plan = _split_write(clock, errors.DiskFull("full"))
    with pytest.raises(errors.UnknownOutcome, match="partly applied"):
        runner.run(plan)


def test_a_split_write_whose_parts_all_were_refused_is_a_clean_failure(clock: FakeClock) -> None:
    core = make_core(clock)
    runner = ScriptedRunner(raising(itertools.repeat(errors.DiskFull("full"))), clock)
    with pytest.raises(errors.DiskFull):
        runner.run(core.multi_put([(key_on(0), b"a"), (key_on(1), b"b")], atomic=False))


def test_split_write_parts_have_their_own_ids_and_the_whole_its_revisions(clock: FakeClock) -> None:
    runner, plan = _split_write(clock, None)
    response = runner.run(plan)
    assert dict(response.header.revisions) == {0: 3, 1: 3}
    ids = [c.request.request_id for c in runner.calls]
    assert len(set(ids)) == 2 and ids[0][:24] == ids[1][:24]


# ----- the policy itself ------------------------------------------------------------------------------


def test_what_may_have_applied() -> None:
    may = RetryPolicy.may_have_applied
    assert may(errors.UnknownOutcome("x")) and may(errors.SessionExpired("x"))
    assert may(transport_error(errors.Unavailable)) and may(transport_error(errors.InvalidArgument))
    for definite in (
        errors.Unavailable("x"),
        errors.NotLeader("x"),
        errors.Overloaded("x"),
        errors.DiskFull(),
    ):
        assert not may(definite)


def test_retryable_is_what_the_error_class_says() -> None:
    retryable = RetryPolicy.retryable
    for cls in (
        errors.NotLeader,
        errors.WrongShard,
        errors.ReplicaBehind,
        errors.Unavailable,
        errors.UnknownOutcome,
        errors.Overloaded,
    ):
        assert retryable(cls("x")) and cls.retryable
    for cls in (
        errors.InvalidArgument,
        errors.SessionExpired,
        errors.DiskFull,
        errors.ResourceExhausted,
        errors.Timeout,
        errors.ClientClosed,
    ):
        assert not retryable(cls("x"))
    assert not retryable(errors.NotLeader("x"), through_router=True)
    assert retryable(errors.Unavailable("x"), through_router=True)


def test_transport_errors_are_marked_at_construction() -> None:
    import grpc

    err = errors.from_status(grpc.StatusCode.UNAVAILABLE, "connection refused", {})
    assert type(err) is errors.Unavailable and not err.from_server
    assert errors.from_status(grpc.StatusCode.UNAVAILABLE, "x", {errors.KIND_KEY: "unavailable"}).from_server


@pytest.mark.parametrize(
    "bad",
    [{"attempts": 0}, {"deadline": 0.0}, {"jitter": 1.5}, {"backoff_initial": -1.0}, {"free_redirects": -1}],
)
def test_a_policy_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


def test_clients_take_a_policy_and_default_to_their_settings(tmp_path: Path) -> None:
    policy = RetryPolicy(attempts=2, backoff_max=1.0)
    assert Client(["127.0.0.1:1"], retry=policy).core.retry is policy
    assert AsyncClient(["127.0.0.1:1"], retry=policy).core.retry is policy
    MAP.save(tmp_path / "cluster.json")
    assert Client.from_cluster(tmp_path, retry=policy).core.retry is policy
    default = ClientCore(seeds=["x:1"], settings=ClientSettings(backoff_initial=0.1, backoff_max=0.2)).retry
    assert (default.backoff_initial, default.backoff_max, default.attempts) == (0.1, 0.2, None)
    assert ClientCore(seeds=["x:1"]).retry == RetryPolicy()


# ----- the public door: one request message, one response message -----------------------------------


def test_send_merges_a_multi_get_split_by_shard_in_request_order(clock: FakeClock) -> None:
    core = make_core(clock)
    core.leaders.update({0: addr(0, 0), 1: addr(1, 0)})
    a, b, c = key_on(0), key_on(1), key_on(0, skip=1)

    def answer(call: Call) -> Any:
        keys = list(call.request.keys)
        shard = MAP.slots.shard_for(keys[0])
        return pb.MultiGetResponse(
            header=header(shard, 10 + shard),
            keys=keys,
            values=[k + b"!" for k in keys],
            revisions=[1] * len(keys),
        )

    response = ScriptedRunner(answer, clock).run(core.send(pb.MultiGetRequest(keys=[c, b, a])))
    assert list(response.keys) == [c, b, a] and list(response.values) == [c + b"!", b + b"!", a + b"!"]
    assert dict(response.header.revisions) == {0: 10, 1: 11}


def test_send_keeps_the_requests_id_and_read_options(clock: FakeClock) -> None:
    core = make_core(clock)
    core.leaders[0] = addr(0, 0)
    runner = ScriptedRunner(replies(pb.DeleteResponse(header=header(0, 9), deleted=1)), clock)
    request_id = core.new_request_id()
    response = runner.run(core.send(pb.DeleteRequest(keys=[key_on(0)], request_id=request_id, retry=True)))
    assert response.header.revision == 9
    assert runner.calls[0].request.request_id == request_id and runner.calls[0].request.retry
    runner.answer = replies(pb.GetResponse(header=header(0, 9)))
    read = pb.ReadOptions(consistency=pb.SESSION, session={0: 9})
    runner.run(core.send(pb.GetRequest(key=key_on(0), read=read)))
    assert runner.calls[-1].request.read.session[0] == 9
    with pytest.raises(TypeError):
        runner.run(core.send(pb.StatusRequest()))


def test_the_batch_tables_come_from_the_proto() -> None:
    assert FIELD_BY_METHOD == {
        "Put": "put",
        "Get": "get",
        "Delete": "delete",
        "CompareAndSet": "compare_and_set",
        "MultiPut": "multi_put",
        "MultiGet": "multi_get",
    }
    assert set(METHOD_BY_FIELD) == {f.name for f in pb.BatchOp.DESCRIPTOR.fields}
    result_fields = {f.name for f in pb.BatchResult.DESCRIPTOR.fields} - {"error"}
    assert result_fields == set(METHOD_BY_FIELD)


def test_session_tokens_round_trip() -> None:
    assert decode_session(encode_session({0: 5, 3: 1 << 40})) == {0: 5, 3: 1 << 40}
    with pytest.raises(ValueError):
        decode_session("not-a-token")


def test_a_call_grpc_failed_before_sending_cannot_have_applied() -> None:
    """Found by a new-user walk: a put to a shard whose nodes were all down ended UnknownOutcome
    though no attempt ever left ("failed to connect to all addresses"). A bare UNAVAILABLE that
    says no connection was made is a definite "not applied"; one that may have come after the
    request left (a reset connection) still may have applied."""
    may = RetryPolicy.may_have_applied
    refused = errors.from_status(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7000: "
        "Failed to connect to remote host: Connection refused",
        {},
    )
    assert isinstance(refused, errors.Unavailable) and not may(refused)
    unresolved = errors.from_status(grpc.StatusCode.UNAVAILABLE, "DNS resolution failed for nowhere:1", {})
    assert not may(unresolved)
    reset = errors.from_status(grpc.StatusCode.UNAVAILABLE, "Connection reset by peer", {})
    assert isinstance(reset, errors.Unavailable) and may(reset)
