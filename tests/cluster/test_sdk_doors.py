"""One behavioural suite for both SDK doors, against a real cluster (2 shards x 3 replicas, real node
processes over real gRPC and pysyncobj).

Every test body is written once and runs twice: `door` (tests/cluster/sdk_doors.py) is a `Client`,
or an `AsyncClient` whose coroutines run to completion on the adapter's own event loop (one loop
per AsyncClient, as the README says it must be). What is proven, for both: every operation's
results (revisions, found and missing keys, multi-key writes within and across shards, scans in
key order across shards, every consistency level, session tokens handed between clients); a closed
client raises `ClientClosed`, unsent, and closing during a call ends it with `ClientClosed`;
consistency is a level or its name; a bad argument is `InvalidArgument` and nothing is written;
conflicting constructor arguments are refused; `atomic` must be said for put_many/delete_many; the
CAS result cannot be misread; every method takes `timeout=`, and the deadline holds within `MARGIN`
against black-holed addresses and a paused (SIGSTOP) leader. And a `Client` shared by threads.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import AsyncClient, CasResult, Client, Consistency, Item, ReadConsistency, ReadPolicy, errors
from kvstore.client.session import decode_session
from kvstore.cluster.local import LocalCluster
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.cluster_map import ClusterMap
from tests.cluster.sdk_doors import (
    SHARDS,
    Bound,
    Door,
    black_hole_addresses,
    key,
    key_on_shard,
    keys_on_both_shards,
    prefix,
)
from tests.conftest import running_cluster, wait_until

# How far past its timeout a call may return: raising, thread hand-offs, a loaded 2-core machine.
MARGIN = 0.25


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("doors"), shards=SHARDS) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    adapter = Door(request.param)
    yield adapter
    adapter.close()


@pytest.fixture
def kv(door: Door, cluster: LocalCluster) -> Any:
    """A client of this door on the cluster: `kv.method(...)` calls it and waits for the result."""
    return Bound(door, door.from_cluster(cluster.dir))


# ----- the two doors have one API --------------------------------------------------------------

PUBLIC = [
    "put",
    "get",
    "get_item",
    "delete",
    "delete_many",
    "compare_and_set",
    "multi_put",
    "put_many",
    "multi_get",
    "scan",
    "send",
    "session_token",
    "cluster_map",
    "close",
]


def test_both_doors_have_the_same_methods_arguments_docstrings_and_types() -> None:
    for name in PUBLIC:
        sync, aio = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(sync).parameters == inspect.signature(aio).parameters, name
        assert sync.__doc__ and aio.__doc__, f"{name} has no docstring"
        hints = inspect.get_annotations(sync)
        assert "Any" not in str(hints.get("return")), f"{name} returns {hints.get('return')}"
        if name not in ("session_token", "close"):  # local: nothing to wait for
            assert "timeout" in inspect.signature(sync).parameters, f"{name} has no timeout="
    assert inspect.get_annotations(Client.cluster_map)["return"] == "ClusterMap"
    assert (Path(__file__).parents[2] / "kvstore" / "py.typed").exists()


# ----- every operation --------------------------------------------------------------------------


def test_suite_put_get_get_item_delete(door: Door, kv: Any) -> None:
    k = key(door, "k")
    first = kv.put(k, b"v1")
    assert first > 0
    assert kv.get(k) == b"v1"
    assert kv.get_item(k) == Item(k, b"v1", first)
    second = kv.put(k, b"v2")
    assert second > first
    assert kv.get_item(k) == Item(k, b"v2", second)
    assert kv.get(key(door, "missing")) is None and kv.get_item(key(door, "missing")) is None
    assert kv.delete(k) is True
    assert kv.get(k) is None
    assert kv.delete(k) is False


def test_suite_compare_and_set(door: Door, kv: Any) -> None:
    k = key(door, "cas")
    created = kv.compare_and_set(k, b"one", expected_revision=0)
    assert created.succeeded and created.revision > 0 and created.current is None
    taken = kv.compare_and_set(k, b"two", expected_revision=0)
    assert not taken.succeeded and taken.revision is None
    assert taken.current == Item(k, b"one", created.revision)
    swapped = kv.compare_and_set(k, b"two", expected_revision=created.revision)
    assert swapped.succeeded and swapped.revision > created.revision
    lost = kv.compare_and_set(k, b"three", expected_revision=created.revision)
    assert not lost.succeeded and lost.current == Item(k, b"two", swapped.revision)
    assert kv.get(k) == b"two"


def test_suite_multi_put_and_multi_get(door: Door, kv: Any) -> None:
    items = {key(door, f"{{tag}}:{i}"): b"val-%d" % i for i in range(10)}  # one hash tag: one shard
    revision = kv.multi_put(items)
    assert revision > 0
    assert kv.multi_get([*items, key(door, "{tag}:absent")]) == items
    assert {kv.get_item(k).revision for k in items} == {revision}  # one entry, one revision
    assert kv.delete_many(list(items), atomic=True) == len(items)
    assert kv.multi_get(list(items)) == {}


def test_suite_put_many_and_delete_many_across_shards(cluster: LocalCluster, door: Door, kv: Any) -> None:
    keys = keys_on_both_shards(cluster, door, "many", 12)
    items = {k: b"m-" + k for k in keys}
    revisions = kv.put_many(items, atomic=False)
    assert set(revisions) == set(range(SHARDS)) and all(r > 0 for r in revisions.values())
    ring = cluster.cluster_map().slots
    assert all(kv.get_item(k).revision == revisions[ring.shard_for(k)] for k in keys)
    assert kv.multi_get(keys) == items
    assert kv.delete_many(keys, atomic=False) == len(keys)
    assert kv.multi_get(keys) == {}
    assert kv.delete_many(keys, atomic=False) == 0


def test_suite_atomic_writes_across_shards_are_refused(cluster: LocalCluster, door: Door, kv: Any) -> None:
    first, second = (key_on_shard(cluster, s, prefix(door) + "cross") for s in range(SHARDS))
    pair = {first: b"a", second: b"b"}
    with pytest.raises(errors.CrossShardWrite):
        kv.multi_put(pair)
    with pytest.raises(errors.CrossShardWrite):
        kv.put_many(pair, atomic=True)
    assert kv.multi_get(list(pair)) == {}  # nothing was written
    kv.put_many(pair, atomic=False)
    with pytest.raises(errors.CrossShardWrite):
        kv.delete_many(list(pair), atomic=True)
    assert kv.multi_get(list(pair)) == pair  # nothing was deleted


def test_suite_empty_key_is_invalid(door: Door, kv: Any) -> None:
    with pytest.raises(errors.InvalidArgument):
        kv.put(b"", b"v")
    with pytest.raises(errors.InvalidArgument):
        kv.get(b"")
    with pytest.raises(errors.InvalidArgument):
        kv.delete(b"")
    with pytest.raises(errors.InvalidArgument):
        kv.compare_and_set(b"", b"v", expected_revision=0)


def test_suite_scan(cluster: LocalCluster, door: Door, kv: Any) -> None:
    keys = keys_on_both_shards(cluster, door, "scan", 12)
    kv.put_many({k: k[-2:] for k in keys}, atomic=False)
    kv.put(key(door, "scan;after"), b"outside the prefix")
    seen: list[Item] = []
    continuation = b""
    for _ in range(10):
        page = kv.scan(prefix=key(door, "scan:"), limit=5, continuation=continuation)
        seen += page.items
        continuation = page.continuation
        if not continuation:
            break
    assert [i.key for i in seen] == keys  # in key order, across both shards
    assert all(i.value == i.key[-2:] and i.revision > 0 for i in seen)
    ranged = kv.scan(start=keys[3], end=keys[7])
    assert [i.key for i in ranged] == keys[3:7]


LEVELS = [Consistency.STRONG, Consistency.SESSION, Consistency.EVENTUAL, Consistency.bounded(5.0)]


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_suite_every_consistency_level_returns_the_written_value(
    cluster: LocalCluster, door: Door, kv: Any, level: ReadConsistency
) -> None:
    keys = keys_on_both_shards(cluster, door, f"level-{level}", 6)
    items = {k: b"at-" + str(level).encode() for k in keys}
    revisions = kv.put_many(items, atomic=False)
    # Reads at the leader the writer just used: every level must see the acknowledged write.
    assert kv.get(keys[0], consistency=level) == items[keys[0]]
    assert kv.get_item(keys[1], consistency=level).revision in revisions.values()
    assert kv.multi_get(keys, consistency=level) == items
    page = kv.scan(prefix=key(door, f"level-{level}:"), consistency=level)
    assert {i.key: i.value for i in page} == items


def test_suite_session_token(cluster: LocalCluster, door: Door, kv: Any) -> None:
    fresh = door.from_cluster(cluster.dir)
    assert fresh.session_token().startswith("kvs1.") and decode_session(fresh.session_token()) == {}
    keys = keys_on_both_shards(cluster, door, "token", 6)
    revisions = kv.put_many({k: b"t" for k in keys}, atomic=False)
    token = kv.session_token()
    assert all(decode_session(token)[shard] >= rev for shard, rev in revisions.items())
    other = door.from_cluster(
        cluster.dir, session=token, consistency=Consistency.SESSION, read_policy=ReadPolicy.FOLLOWERS_ONLY
    )
    assert other.core.session == decode_session(token)
    assert door.call(other, "multi_get", keys) == {k: b"t" for k in keys}
    assert door.call(other, "get", keys[0]) == b"t"
    # Reads only raise the token; the other client's session never falls behind the handed one.
    assert all(decode_session(other.session_token())[s] >= r for s, r in decode_session(token).items())
    with pytest.raises(errors.InvalidArgument):
        door.from_cluster(cluster.dir, session="not-a-token")


# ----- closed clients --------------------------------------------------------------------------

CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "put": ((b"doors:closed", b"v"), {}),
    "get": ((b"doors:closed",), {}),
    "get_item": ((b"doors:closed",), {}),
    "delete": ((b"doors:closed",), {}),
    "delete_many": (([b"doors:closed"],), {"atomic": True}),
    "compare_and_set": ((b"doors:closed", b"v"), {"expected_revision": 0}),
    "multi_put": (({b"doors:closed": b"v"},), {}),
    "put_many": (({b"doors:closed": b"v"},), {"atomic": False}),
    "multi_get": (([b"doors:closed"],), {}),
    "scan": ((), {"prefix": b"doors:closed"}),
    "send": ((pb.GetRequest(key=b"doors:closed"),), {}),
    "cluster_map": ((), {}),
}


def test_a_closed_client_raises_client_closed_on_every_call(door: Door, cluster: LocalCluster) -> None:
    client = door.from_cluster(cluster.dir)
    assert door.call(client, "put", key(door, "before-close"), b"v") > 0
    door.run(client.close())
    door.run(client.close())  # closing twice is harmless
    for method, (args, kwargs) in CALLS.items():
        with pytest.raises(errors.ClientClosed, match="nothing was sent"):
            door.call(client, method, *args, **kwargs)
    reader = door.from_cluster(cluster.dir)
    assert door.call(reader, "get", b"doors:closed") is None  # no call after close() was sent


def test_closing_during_a_call_ends_it_with_client_closed(door: Door, black_holes: list[str]) -> None:
    # A call that would wait 10 s (seeds that never answer) is under way when the client closes.
    client = door.make(black_holes, timeout=10.0)
    took, outcome = door.while_calling(client, "get", (b"k",), after=0.3, action=client.close)
    assert isinstance(outcome, errors.ClientClosed), outcome
    assert took < 0.3 + 1.0, f"{took:.3f}s"


def test_a_client_is_safe_to_share_between_threads(cluster: LocalCluster) -> None:
    with Client.from_cluster(cluster.dir) as shared:
        written: dict[bytes, int] = {}
        failures: list[BaseException] = []

        def work(worker: int) -> None:
            try:
                for i in range(25):
                    k = b"doors:threads:%d:%d" % (worker, i)
                    revision = shared.put(k, b"v%d" % i)
                    assert shared.get_item(k) == Item(k, b"v%d" % i, revision)
                    written[k] = revision
            except BaseException as exc:  # reported below, in the test's thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == [] and len(written) == 200
        assert all(revision > 0 for revision in written.values())
        assert shared.multi_get(list(written)) == {k: b"v%s" % k.rsplit(b":", 1)[1] for k in written}


# ----- consistency: a level or its name ------------------------------------------------------


@pytest.mark.parametrize(
    "level", ["strong", "session", "eventual", "bounded:0.5s", "bounded0.5", Consistency.EVENTUAL], ids=str
)
def test_consistency_is_a_level_or_its_name(door: Door, kv: Any, level: Any) -> None:
    k = key(door, "named-level")
    revision = kv.put(k, b"v")
    assert kv.get(k, consistency=level) == b"v"
    assert kv.get_item(k, consistency=level) == Item(k, b"v", revision)
    assert kv.multi_get([k], consistency=level) == {k: b"v"}
    assert [i.key for i in kv.scan(prefix=k, consistency=level)] == [k]


def test_the_clients_consistency_by_name(door: Door, cluster: LocalCluster) -> None:
    client = door.from_cluster(cluster.dir, consistency="session", read_policy="followers_only")
    k = key(door, "by-name")
    door.call(client, "put", k, b"mine")
    assert door.call(client, "get", k) == b"mine"  # read-your-writes at a follower


@pytest.mark.parametrize("level", ["sometimes", "bounded", "bounded:-1s", 3, b"strong"], ids=str)
def test_anything_else_is_invalid_and_the_error_lists_the_valid_forms(kv: Any, level: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="strong, session, eventual, bounded"):
        kv.get(b"doors:any", consistency=level)


# ----- arguments: InvalidArgument, nothing sent ---------------------------------------------------


def test_bad_arguments_are_invalid_and_nothing_is_written(door: Door, kv: Any) -> None:
    k = key(door, "bad")
    bad: list[Callable[[], Any]] = [
        lambda: kv.compare_and_set(k, b"v", expected_revision=-1),
        lambda: kv.compare_and_set(k, b"v", expected_revision="3"),
        lambda: kv.put(k.decode(), b"v"),
        lambda: kv.put(k, "v"),
        lambda: kv.put(b"", b"v"),
        lambda: kv.put(k, b"v" * (1024 * 1024 + 1)),
        lambda: kv.put(k, b"v", timeout=0),
        lambda: kv.put(k, b"v", timeout=-2.5),
        lambda: kv.multi_put([(k, b"1"), (k, b"2")]),
        lambda: kv.put_many({k: b"v", b"": b"w"}, atomic=False),
        lambda: kv.delete_many([k, k], atomic=True),
        lambda: kv.delete_many(k, atomic=False),
        lambda: kv.multi_get("abc"),
        lambda: kv.scan(prefix=k, limit=0),
        lambda: kv.scan(prefix=k.decode()),
    ]
    for call in bad:
        with pytest.raises(errors.InvalidArgument):
            call()
    assert kv.get(k) is None


def test_atomic_must_be_said_for_put_many_and_delete_many(door: Door, kv: Any) -> None:
    keys = [key(door, f"{{atomic}}:{i}") for i in range(3)]
    with pytest.raises(TypeError, match="atomic"):
        kv.put_many(dict.fromkeys(keys, b"v"))
    with pytest.raises(TypeError, match="atomic"):
        kv.delete_many(keys)
    assert kv.multi_get(keys) == {}
    revisions = kv.put_many(dict.fromkeys(keys, b"v"), atomic=True)  # one hash tag: one shard
    assert list(revisions.values()) == [kv.get_item(keys[0]).revision]
    assert kv.delete_many(keys, atomic=False) == 3


@pytest.mark.parametrize(
    "arguments",
    [
        {"endpoints": ["127.0.0.1:7000"], "router": "127.0.0.1:7400"},
        {},
        {"endpoints": []},
        {"endpoints": ["127.0.0.1"]},
        {"router": "127.0.0.1:7400", "read_policy": "nearest"},
        {"endpoints": ["127.0.0.1:7000"], "timeout": 0},
        {"endpoints": ["127.0.0.1:7000"], "consistency": "sometimes"},
    ],
    ids=str,
)
def test_conflicting_or_wrong_constructor_arguments_are_refused(
    door: Door, arguments: dict[str, Any]
) -> None:
    with pytest.raises(errors.InvalidArgument):
        door.make(**arguments)


def test_from_cluster_refuses_other_addresses(door: Door, cluster: LocalCluster) -> None:
    with pytest.raises(errors.InvalidArgument, match="exactly one of"):
        door.from_cluster(cluster.dir, router="127.0.0.1:7400")


# ----- compare_and_set -------------------------------------------------------------------------


def test_a_cas_result_cannot_be_misread(door: Door, kv: Any) -> None:
    k = key(door, "cas-fields")
    created = kv.compare_and_set(k, b"one", expected_revision=0)
    assert created == CasResult(True, created.revision, None) and created.revision > 0
    taken = kv.compare_and_set(k, b"two", expected_revision=0)
    assert taken == CasResult(False, None, Item(k, b"one", created.revision))
    assert taken.current_revision == created.revision
    swapped = kv.compare_and_set(k, b"two", expected_revision=taken.current_revision)
    assert swapped.succeeded and swapped.revision > created.revision
    kv.delete(k)
    gone = kv.compare_and_set(k, b"three", expected_revision=swapped.revision)
    assert gone == CasResult(False, None, None) and gone.current_revision == 0


# ----- timeouts --------------------------------------------------------------------------------


def test_every_method_takes_its_own_timeout(door: Door, kv: Any) -> None:
    k = key(door, "timeouts")
    assert kv.put(k, b"v", timeout=5) > 0
    assert kv.get(k, timeout=5) == b"v" and kv.get_item(k, timeout=5.0).value == b"v"
    assert kv.multi_put({k: b"w"}, timeout=5) > 0
    assert kv.put_many({k: b"x"}, atomic=False, timeout=5)
    assert kv.multi_get([k], timeout=5) == {k: b"x"}
    assert len(kv.scan(prefix=k, timeout=5)) == 1
    assert not kv.compare_and_set(k, b"y", expected_revision=0, timeout=5).succeeded
    assert kv.send(pb.GetRequest(key=k), timeout=5).kv.value == b"x"
    assert isinstance(kv.cluster_map(timeout=5), ClusterMap)
    assert kv.delete(k, timeout=5) and kv.delete_many([k], atomic=True, timeout=5) == 0


@pytest.fixture
def black_holes() -> Iterator[list[str]]:
    """Three addresses that accept TCP connections and never answer."""
    yield from black_hole_addresses(3)


def test_the_deadline_holds_against_black_holed_addresses(door: Door, black_holes: list[str]) -> None:
    # Three seeds that never answer: fetching the map once took 0.5 s per seed (1.5 s for a
    # client timeout of 1 s); it now shares the call's deadline.
    smart = door.make(black_holes, timeout=1.0)
    thin = door.make(router=black_holes[0], timeout=10.0)
    measured = {
        "smart get (client timeout 1 s)": (1.0, door.timed(smart, "get", b"k")),
        "smart put, timeout=0.6": (0.6, door.timed(smart, "put", b"k", b"v", timeout=0.6)),
        "thin put, timeout=1 (client 10 s)": (1.0, door.timed(thin, "put", b"k", b"v", timeout=1.0)),
        "thin get, timeout=1": (1.0, door.timed(thin, "get", b"k", timeout=1.0)),
    }
    print(door.kind, {name: round(took, 3) for name, (_, (took, _)) in measured.items()})
    for name, (limit, (took, outcome)) in measured.items():
        assert isinstance(outcome, errors.KvError), (name, outcome)
        assert took <= limit + MARGIN, f"{name}: {took:.3f}s"
    assert isinstance(measured["smart get (client timeout 1 s)"][1][1], errors.Unavailable)
    assert isinstance(measured["thin put, timeout=1 (client 10 s)"][1][1], errors.UnknownOutcome)
    assert isinstance(measured["thin get, timeout=1"][1][1], errors.Timeout)


def test_the_deadline_holds_with_the_leader_paused(door: Door, cluster: LocalCluster) -> None:
    """SIGSTOP the leader: a write to it gets no answer. A call returns by its deadline (plus
    MARGIN), whatever it returns: done through a new leader, UnknownOutcome, or Timeout."""
    writer = door.from_cluster(cluster.dir, timeout=1.0)
    patient = door.from_cluster(cluster.dir, timeout=30.0)
    k = key_on_shard(cluster, 0, prefix(door) + "paused")  # on the shard whose leader stops
    door.call(writer, "put", k, b"before")  # the client knows the leader: it will try it first
    door.call(patient, "put", k, b"before")
    leader = cluster.leader_of(0)
    assert leader
    cluster.kill(leader, "STOP")
    try:
        measured = [
            ("put, client timeout 1 s", 1.0, door.timed(writer, "put", k, b"during")),
            ("put, timeout=0.8 (client 30 s)", 0.8, door.timed(patient, "put", k, b"during", timeout=0.8)),
            ("strong get, timeout=0.7", 0.7, door.timed(patient, "get", k, timeout=0.7)),
            (
                "put_many, timeout=1",
                1.0,
                door.timed(patient, "put_many", {k: b"x"}, atomic=False, timeout=1.0),
            ),
        ]
    finally:
        cluster.kill(leader, "CONT")
    print(
        door.kind,
        [(name, round(seconds, 3), type(outcome).__name__) for name, _, (seconds, outcome) in measured],
    )
    for name, limit, (seconds, outcome) in measured:
        assert seconds <= limit + MARGIN, f"{name}: {seconds:.3f}s ({outcome!r})"
        assert not isinstance(outcome, errors.KvError) or isinstance(
            outcome, errors.UnknownOutcome | errors.Timeout | errors.Unavailable
        ), (name, outcome)
    wait_until(lambda: cluster.leader_of(0), 30)
    # Afterwards the same clients work again (a retry under a new request id: a new write).
    assert door.call(writer, "put", k, b"after", timeout=15.0) > 0
    assert door.call(patient, "get", k) == b"after"
