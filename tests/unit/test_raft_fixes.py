"""PatchedSyncObj fixes pysyncobj 0.3.17's two replication bugs; each bug test also shows SyncObj has it.

Unit tests drive one node in-process: autoTick off, messages injected through the (overridden) handler,
outgoing messages captured instead of sent. The node's peers are unused loopback ports, and the node gets
the lexicographically smallest address, so its transport never connects to them (pysyncobj only dials
peers with a smaller address).
"""

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from typing import Any

import pytest
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.node import Node
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from kvstore.replication.raft_fixes import PatchedSyncObj

NOOP = bytes([_COMMAND_TYPE.NO_OP])
TRUNCATION_LOG = "truncating already-applied log entries"
Entry = tuple[bytes, int, int]
Message = dict[str, Any]
Sent = list[tuple[Node, Message]]
Log = list[tuple[int, int]]  # (index, term) of each local entry


def free_addresses(count: int) -> list[str]:
    """Distinct free loopback addresses, sorted (the first one never dials the others)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return sorted(f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks)


def capture_sends(node: SyncObj) -> Sent:
    sent: Sent = []
    node._SyncObj__transport.send = lambda peer, message: sent.append((peer, message)) or True
    return sent


@contextmanager
def raft_node(cls: type[SyncObj]) -> Iterator[tuple[SyncObj, list[Node], Sent]]:
    """One manually ticked node with two fake peers; yields (node, peers, messages it sends)."""
    self_addr, *peer_addrs = free_addresses(3)
    conf = SyncObjConf(
        autoTick=False,
        appendEntriesUseBatch=False,
        bindAddress=self_addr,
        raftMinTimeout=60.0,  # no spontaneous election: make_leader triggers one explicitly
        raftMaxTimeout=61.0,
        connectionTimeout=62.0,  # pysyncobj requires connectionTimeout >= raftMaxTimeout
    )
    node = cls(self_addr, peer_addrs, conf=conf)
    try:
        yield node, sorted(node.otherNodes, key=lambda peer: peer.id), capture_sends(node)
    finally:
        node.destroy()


@contextmanager
def captured_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("pysyncobj.syncobj")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def truncation_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if TRUNCATION_LOG in r.getMessage()]


def deliver(node: SyncObj, peer: Node, message: Message) -> None:
    node._SyncObj__onMessageReceived(peer, message)


def log_of(node: SyncObj) -> Log:
    """The local log as (index, term) pairs."""
    raft_log = node._SyncObj__raftLog
    return [(raft_log[i][1], raft_log[i][2]) for i in range(len(raft_log))]


def entries(first: int, last: int, term: int) -> list[Entry]:
    return [(NOOP, idx, term) for idx in range(first, last + 1)]


def append_msg(term: int, prev: tuple[int, int], new: list[Entry], commit: int = 1) -> Message:
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit,
        "entries": new,
        "prevLogIdx": prev[0],
        "prevLogTerm": prev[1],
    }


def acks(sent: Sent) -> list[Message]:
    return [message for _, message in sent if message["type"] == "next_node_idx"]


def ack(next_idx: int, success: bool, reset: bool) -> Message:
    return {"type": "next_node_idx", "next_node_idx": next_idx, "success": success, "reset": reset}


LOG_20_TERM_1 = [(1, 0)] + [(idx, 1) for idx in range(2, 21)]


def make_follower_with_20_entries(node: SyncObj, leader: Node, commit: int = 1) -> None:
    """Log: 1 (term 0, pysyncobj's initial no-op) and 2..20 (term 1), received in one append."""
    deliver(node, leader, append_msg(1, (1, 0), entries(2, 20, 1), commit=commit))
    assert log_of(node) == LOG_20_TERM_1


def make_leader(node: SyncObj, peers: list[Node]) -> None:
    node._SyncObj__connectedNodes.update(peers)  # the election needs _SyncObj__connectedToAnyone()
    node._SyncObj__raftElectionDeadline = 0
    node.doTick(0)
    assert node._SyncObj__raftState == _RAFT_STATE.CANDIDATE
    deliver(node, peers[0], {"type": "response_vote", "term": node.raftCurrentTerm})
    assert node._isLeader()


def replicate(node: SyncObj, to: Node) -> list[int]:
    """Run the leader's append-entries round; returns the log indexes it sent to `to`."""
    sent = capture_sends(node)
    node._SyncObj__sendAppendEntries()
    return [e[1] for peer, m in sent if peer == to and m["type"] == "append_entries" for e in m["entries"]]


def leader_append(node: SyncObj, first: int, last: int, to: Node) -> list[int]:
    """Add entries to the leader's log as accepted commands would be, then replicate them."""
    for idx in range(first, last + 1):
        node._SyncObj__raftLog.add(NOOP, idx, node.raftCurrentTerm)
    return replicate(node, to)


@contextmanager
def pipelined_leader(cls: type[SyncObj]) -> Iterator[tuple[SyncObj, Node]]:
    """A leader that sent 3..10 and then 11..20 to a follower, without any ack yet (nextIndex = 21)."""
    with raft_node(cls) as (node, peers, _):
        make_leader(node, peers)  # log: 1 (term 0) and the leader's no-op 2, already sent
        follower = peers[0]
        assert leader_append(node, 3, 10, follower) == list(range(3, 11))
        assert leader_append(node, 11, 20, follower) == list(range(11, 21))
        assert node._SyncObj__raftNextIndex[follower] == 21
        yield node, follower


# --- the override is really what the transport calls --------------------------------------------------


def test_transport_calls_the_override() -> None:
    with raft_node(PatchedSyncObj) as (node, _, _):
        callback = node._SyncObj__transport._onMessageReceivedCallback
        assert callback.__func__ is PatchedSyncObj._SyncObj__onMessageReceived
    with raft_node(SyncObj) as (node, _, _):
        callback = node._SyncObj__transport._onMessageReceivedCallback
        assert callback.__func__ is SyncObj._SyncObj__onMessageReceived


# --- bug 1: the leader moves nextIndex backwards on an ack for an older pipelined append -------------


def stale_ack_effect(cls: type[SyncObj]) -> tuple[int, int, list[int]]:
    """The ack for 3..10 arrives after 11..20 was sent. Returns (nextIndex, matchIndex, re-sent indexes)."""
    with pipelined_leader(cls) as (node, follower):
        deliver(node, follower, ack(11, success=True, reset=False))
        result = node._SyncObj__raftNextIndex[follower], node._SyncObj__raftMatchIndex[follower]
        return *result, replicate(node, follower)


def test_plain_syncobj_moves_next_index_backwards() -> None:
    assert stale_ack_effect(SyncObj) == (11, 10, list(range(11, 21)))


def test_patched_keeps_next_index_on_stale_success_ack() -> None:
    assert stale_ack_effect(PatchedSyncObj) == (21, 10, [])


def test_patched_counts_prevented_backward_moves() -> None:
    with pipelined_leader(PatchedSyncObj) as (node, follower):
        deliver(node, follower, ack(11, success=True, reset=False))
        deliver(node, follower, ack(21, success=True, reset=False))  # in order: nothing to prevent
        assert node.backward_next_index_prevented == 1
        assert node._SyncObj__raftMatchIndex[follower] == 20


def test_patched_reset_ack_still_moves_next_index_backwards() -> None:
    # A follower that lost entries answers with a reset: the leader must go back and re-send from there.
    with pipelined_leader(PatchedSyncObj) as (node, follower):
        deliver(node, follower, ack(5, success=False, reset=True))
        assert node._SyncObj__raftNextIndex[follower] == 5
        assert node.backward_next_index_prevented == 0
        assert replicate(node, follower) == list(range(5, 21))


# --- bug 2: the follower deletes matching entries after prevLogIdx ------------------------------------


def old_append_effect(cls: type[SyncObj]) -> tuple[Log, list[Message]]:
    """A follower with 20 entries gets a re-sent append 11..15 (prev 10). Returns (log, acks sent)."""
    with raft_node(cls) as (node, peers, sent):
        make_follower_with_20_entries(node, peers[0])
        sent.clear()
        deliver(node, peers[0], append_msg(1, (10, 1), entries(11, 15, 1)))
        return log_of(node), acks(sent)


def test_plain_syncobj_deletes_matching_entries() -> None:
    log, replies = old_append_effect(SyncObj)
    assert log == LOG_20_TERM_1[:15]
    assert replies == [ack(16, success=True, reset=False)]


def test_patched_keeps_matching_entries() -> None:
    log, replies = old_append_effect(PatchedSyncObj)
    assert log == LOG_20_TERM_1
    assert replies == [ack(16, success=True, reset=False)]


def conflict_after_applied_effect(cls: type[SyncObj]) -> tuple[Log, list[Message], list[str]]:
    """1..11 applied; a term-2 leader sends 11 (term 1, matches) and 12, 13 (term 2, conflict at 12)."""
    with raft_node(cls) as (node, peers, sent), captured_log() as records:
        make_follower_with_20_entries(node, peers[0], commit=11)
        node.doTick(0)
        assert node.raftLastApplied == 11
        sent.clear()
        deliver(node, peers[0], append_msg(2, (10, 1), entries(11, 11, 1) + entries(12, 13, 2), commit=11))
        return log_of(node), acks(sent), truncation_lines(records)


EXPECTED_AFTER_CONFLICT = LOG_20_TERM_1[:11] + [(12, 2), (13, 2)]


def test_plain_syncobj_truncates_applied_entry_before_conflict() -> None:
    log, replies, truncations = conflict_after_applied_effect(SyncObj)
    assert log == EXPECTED_AFTER_CONFLICT
    assert len(truncations) == 1 and "from index 11" in truncations[0]


def test_patched_truncates_from_first_conflict_only() -> None:
    log, replies, truncations = conflict_after_applied_effect(PatchedSyncObj)
    assert log == EXPECTED_AFTER_CONFLICT
    assert replies == [ack(14, success=True, reset=False)]
    assert truncations == []


ALL_MATCH_CASES = pytest.mark.parametrize(
    "prev, new", [((10, 1), entries(11, 15, 1)), ((15, 1), [])], ids=["old-append", "heartbeat"]
)


def all_match_effect(cls: type[SyncObj], prev: tuple[int, int], new: list[Entry]) -> dict[str, Any]:
    """Every incoming entry matches, but the follower's log goes further (16..20).

    The sender is a term-2 leader whose log is 1..15 (term 1) + 16 (term 2), commit 16. The follower's
    16..20 are term-1 leftovers: they must stay (no conflict seen yet) but be neither acked nor committed.
    Afterwards the leader's next append resolves the real conflict at 16.
    """
    with raft_node(cls) as (node, peers, sent):
        leader = peers[0]
        make_follower_with_20_entries(node, leader)
        sent.clear()
        deliver(node, leader, append_msg(2, prev, new, commit=16))
        effect = {
            "log": log_of(node),
            "acks": acks(sent),
            "commit": node.raftCommitIndex,
            "leader_commit": node.getStatus()["leader_commit_idx"],
            "term_leader": (node.raftCurrentTerm, node._getLeader() == leader),
            "kept": getattr(node, "matching_entries_kept", None),
        }
        deliver(node, leader, append_msg(2, (15, 1), [(NOOP, 16, 2)], commit=16))
        effect["log_after_conflict"], effect["commit_after_conflict"] = log_of(node), node.raftCommitIndex
        return effect


@ALL_MATCH_CASES
def test_plain_syncobj_deletes_unverified_tail(prev: tuple[int, int], new: list[Entry]) -> None:
    assert all_match_effect(SyncObj, prev, new)["log"] == LOG_20_TERM_1[:15]


@ALL_MATCH_CASES
def test_patched_all_match_acks_only_verified_prefix(prev: tuple[int, int], new: list[Entry]) -> None:
    effect = all_match_effect(PatchedSyncObj, prev, new)
    assert effect["log"] == LOG_20_TERM_1
    assert effect["acks"] == [ack(16, success=True, reset=False)]  # not 21: 16..20 are unverified
    assert effect["commit"] == 15  # not 16: the local 16 is not the leader's 16
    assert effect["leader_commit"] == 16
    assert effect["term_leader"] == (2, True)
    assert effect["kept"] == len(new)
    assert effect["log_after_conflict"] == LOG_20_TERM_1[:15] + [(16, 2)]
    assert effect["commit_after_conflict"] == 16


@pytest.mark.parametrize("cls", [SyncObj, PatchedSyncObj], ids=["plain", "patched"])
def test_stale_term_append_is_ignored(cls: type[SyncObj]) -> None:
    with raft_node(cls) as (node, peers, sent):
        make_follower_with_20_entries(node, peers[0])
        deliver(node, peers[1], append_msg(2, (20, 1), []))  # a newer leader appears
        sent.clear()
        deliver(node, peers[0], append_msg(1, (10, 1), entries(11, 15, 1), commit=20))
        assert (log_of(node), acks(sent), node.raftCommitIndex) == (LOG_20_TERM_1, [], 1)
        assert (node.raftCurrentTerm, node._getLeader()) == (2, peers[1])


# --- integration: three real nodes, pipelined writes ------------------------------------------------


class AppendLog(PatchedSyncObj):
    def __init__(self, self_addr: str, others: list[str]) -> None:
        self.entries_received = 0  # before super(): messages may arrive during it; not replicated state
        conf = SyncObjConf(appendEntriesUseBatch=False, bindAddress=self_addr)
        super().__init__(self_addr, others, conf=conf)
        self.values: list[int] = []  # after super(): part of the replicated state, as pysyncobj expects

    def _SyncObj__onMessageReceived(self, node: Node, message: Message) -> None:
        if message["type"] == "append_entries":
            self.entries_received += len(message.get("entries") or [])
        super()._SyncObj__onMessageReceived(node, message)

    @replicated
    def append(self, value: int) -> int:
        self.values.append(value)
        return len(self.values)


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Results:
    def __init__(self, expected: int) -> None:
        self.errors: list[int] = []
        self.count = 0
        self.expected = expected
        self.done = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, result: Any, error: int) -> None:
        with self.lock:
            self.count += 1
            if error != FAIL_REASON.SUCCESS:
                self.errors.append(error)
            if self.count == self.expected:
                self.done.set()


def run_cluster(cls: type[AppendLog], writes: int) -> tuple[list[AppendLog], Results, list[str]]:
    """Pipeline `writes` async appends through the leader of a 3-node cluster; nodes are destroyed."""
    addrs = free_addresses(3)
    nodes: list[AppendLog] = []
    with captured_log() as records:
        try:
            nodes = [cls(addr, [a for a in addrs if a != addr]) for addr in addrs]
            assert wait_for(lambda: sum(n._isLeader() for n in nodes) == 1, 10), "no leader elected"
            leader = next(n for n in nodes if n._isLeader())
            results = Results(writes)
            for value in range(writes):
                leader.append(value, callback=results)
            assert results.done.wait(20), f"only {results.count} of {writes} writes finished"
            assert wait_for(lambda: all(len(n.values) == writes for n in nodes), 5)
        finally:
            for node in nodes:
                node.destroy()
            for node in nodes:
                node._SyncObj__thread.join(timeout=5)
        return nodes, results, truncation_lines(records)


def test_cluster_pipelined_writes_converge_without_truncation() -> None:
    nodes, results, truncations = run_cluster(AppendLog, writes=2000)
    assert results.errors == []
    assert all(node.values == list(range(2000)) for node in nodes)
    assert truncations == []
    # Each follower gets each entry (the writes and the leader's no-op) about once. Measured without
    # the fixes: 1.007x to 5.5x as many (re-sent after backward next-index moves).
    followers = [node for node in nodes if node.entries_received]
    assert len(followers) == 2
    assert all(node.entries_received <= 2001 + 20 for node in followers)
    counters = [(n.matching_entries_kept, n.backward_next_index_prevented, n.entries_received) for n in nodes]
    print(f"(matching_entries_kept, backward_next_index_prevented, entries_received) per node: {counters}")
