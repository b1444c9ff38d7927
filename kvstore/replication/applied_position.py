"""Restart refuses to diverge (issue 15, item 2): the entry LMDB last applied must be the entry the
Raft log holds at that index.

LMDB stores the applied position, (index, term), in each apply batch's transaction. Entries at or
below that index are skipped by the state machine (replayed after a restart, or re-received after a
power cut took the tail of a log that was not durable). At LMDB's own index, and in the journal
loaded at start, the log's term is compared with the stored one: a committed entry never changes
term in a sound log, so a difference means the store and the log come from different histories,
and the node stops (exit 65) with one line instead of applying around it.

A mixin of `ShardStateMachine` (it precedes SyncObj in the MRO: nothing pysyncobj defines is
declared here). It reads `_stored_applied`, `_stored_term`, `_settings` and `_on_diverged`, which
the state machine sets, and pysyncobj's log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

EXIT_DIVERGED = 65  # EX_DATAERR (sysexits.h): the store and the Raft log disagree


def stop_diverged(message: str) -> None:
    """A store that diverged from its log must not serve, vote or apply another entry."""
    log.critical(message)
    logging.shutdown()
    os._exit(EXIT_DIVERGED)


class AppliedPositionCheck:
    _stored_applied: int
    _stored_term: int
    _settings: Any
    _on_diverged: Any

    def _entry_term(self, index: int) -> int:
        """The term of the log entry at `index` (0 if the log does not hold it)."""
        raft_log = self._SyncObj__raftLog  # noqa: SLF001 (pysyncobj private: entries (command, idx, term))
        if not len(raft_log):
            return 0
        at = index - raft_log[0][1]
        if 0 <= at < len(raft_log) and raft_log[at][1] == index:
            return int(raft_log[at][2])
        return 0

    def _check_journal_at_start(self) -> None:
        """The journal just loaded may already hold the entry at LMDB's applied index."""
        if self._stored_applied and self._stored_term:
            self._check_position(
                self._stored_applied, self._entry_term(self._stored_applied), "the Raft journal's"
            )

    def _check_position(self, index: int, term: int, whose: str) -> None:
        """LMDB applied the entry at `index` in `_stored_term`; the log now says `term`. A committed
        entry never changes term in a sound log: if they differ, this replica's store and log come
        from different histories (a power cut took acknowledged entries of a log that was not
        durable, or files were restored from elsewhere), and applying on would serve wrong data."""
        if not term or not self._stored_term or term == self._stored_term:
            return  # not known on one side (an older store, a compacted log): nothing to compare
        self._on_diverged(
            f"data dir {self._settings.data_dir}: LMDB applied index {index} term {self._stored_term}, "
            f"but {whose} entry {index} has term {term}: this replica's store diverged from its log; "
            f"stopping (exit {EXIT_DIVERGED}). Restore it from its peers: delete this data dir, run "
            f"`kvstore node --config PEER.toml --forget-peer {self._settings.advertise}` on each "
            f"peer, then start this node: it rejoins as a new incarnation and receives a snapshot "
            f'(docs/architecture.md, "Identity")'
        )
