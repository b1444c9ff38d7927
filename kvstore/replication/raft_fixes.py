"""Fixes for two replication bugs of pysyncobj 0.3.17 (exact version pinned in pyproject.toml).

1. Leader: a success ack for an *older* pipelined append moved the follower's next index backwards,
   so the leader re-sent entries the follower already had.
2. Follower: an append starting before the last local entry deleted every entry after its prevLogIdx,
   even entries matching the incoming ones. Raft truncates only from the first *conflicting* entry.
   Together with (1) this deleted acknowledged (even applied) entries.

Both are fixed around pysyncobj's message handler, which SyncObj registers as the transport callback
`self.__onMessageReceived`: that compiles to `self._SyncObj__onMessageReceived`, an ordinary attribute
lookup through the MRO, so the method of the same name below replaces it. The override only
pre-processes the message or repairs state afterwards; the Raft logic itself stays pysyncobj's.
"""

from typing import Any

from pysyncobj import SyncObj
from pysyncobj.node import Node

Message = dict[str, Any]
Entry = tuple[bytes, int, int]  # (command, log index, term), as pysyncobj stores and sends them


class PatchedSyncObj(SyncObj):
    """SyncObj with the two replication fixes; inherit the state machine from this class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before SyncObj.__init__: its tick thread may deliver messages before it returns, and
        # attributes existing at that point are excluded from pysyncobj's default state snapshot.
        self.matching_entries_kept: int = 0
        self.backward_next_index_prevented: int = 0
        super().__init__(*args, **kwargs)

    def _SyncObj__onMessageReceived(self, node: Node, message: Message) -> None:
        if message["type"] == "next_node_idx":
            self.__on_next_node_idx(node, message)
        elif message["type"] == "append_entries" and self.__is_current_plain_append(message):
            self.__on_append_entries(node, message)
        else:
            super()._SyncObj__onMessageReceived(node, message)

    # --- bug 1: leader ------------------------------------------------------------------------------

    def __on_next_node_idx(self, node: Node, message: Message) -> None:
        next_index: dict[Node, int] = self._SyncObj__raftNextIndex
        before = next_index.get(node)
        super()._SyncObj__onMessageReceived(node, message)
        if before is None or message["reset"] or not message["success"]:
            # Reset (failure) acks must move it, backwards included: that repairs a lagging follower.
            return
        after = next_index.get(node)
        if after is not None and after < before:
            # The ack is for an older pipelined append; everything up to `before` is already in flight.
            next_index[node] = before
            self.backward_next_index_prevented += 1

    # --- bug 2: follower ----------------------------------------------------------------------------

    def __is_current_plain_append(self, message: Message) -> bool:
        # Stale terms, chunked large entries and snapshot installs keep pysyncobj's exact handling.
        return (
            message["term"] >= self._SyncObj__raftCurrentTerm
            and message.get("prevLogIdx") is not None
            and message.get("transmission") is None
            and message.get("serialized") is None
        )

    def __on_append_entries(self, node: Node, message: Message) -> None:
        entries: list[Entry] = list(message.get("entries") or [])
        matched = self.__count_matching_prefix(message["prevLogIdx"], message["prevLogTerm"], entries)
        if matched is None:
            super()._SyncObj__onMessageReceived(node, message)
            return
        self.matching_entries_kept += matched
        if matched == len(entries):
            self.__ack_verified_prefix(node, message, message["prevLogIdx"] + matched)
            return
        if matched:
            # Start the append at the first conflict, so pysyncobj truncates exactly from there.
            last = entries[matched - 1]
            message = {**message, "entries": entries[matched:], "prevLogIdx": last[1], "prevLogTerm": last[2]}
        super()._SyncObj__onMessageReceived(node, message)

    def __count_matching_prefix(self, prev_idx: int, prev_term: int, entries: list[Entry]) -> int | None:
        """How many leading entries already match the local log; None when pysyncobj's handling is right.

        That is when nothing after prevLogIdx would be truncated, when prevLogIdx is compacted away or
        missing, and when its term differs (pysyncobj then answers with a reset).
        """
        if prev_idx >= self._SyncObj__getCurrentLogIndex():
            return None
        local: list[Entry] = self._SyncObj__getEntries(prev_idx, len(entries) + 1)
        if not local or local[0][1] != prev_idx or local[0][2] != prev_term:
            return None
        matched = 0
        for offset, entry in enumerate(entries, start=1):
            mine = local[offset] if offset < len(local) else None
            if mine is None or entry[1] != prev_idx + offset or (mine[1], mine[2]) != (entry[1], entry[2]):
                break
            matched += 1
        return matched

    def __ack_verified_prefix(self, node: Node, message: Message, verified: int) -> None:
        """Accept an append whose entries all match while the local log goes further: delete nothing.

        Local entries after `verified` are unverified (maybe from an old term): the reply must not claim
        them and the commit index must not cover them.
        """
        leader_commit: int = message["commit_index"]
        # Without prevLogIdx pysyncobj runs only its common part: term, leader, election deadline, commit.
        common = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
        common["commit_index"] = min(leader_commit, verified)
        super()._SyncObj__onMessageReceived(node, common)
        # The leader's real commit index feeds getStatus()['leader_commit_idx'] (staleness) and onReady.
        self._SyncObj__leaderCommitIndex = leader_commit
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=verified + 1, success=True)
