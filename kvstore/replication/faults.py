"""FAULT INJECTION for tests of the health service: make a live replica stuck, on purpose, and undo it.

Enabled only by `ServerSettings.fault_injection_signals` (the node warns at start); never in a real
deployment. Two faults, each the shape of a real failure the health service must see:
- `freeze_applies`: pysyncobj keeps ticking (elections, replication, commit) but applies nothing,
  like an entry that fails on every tick;
- `stall_ticks`: the tick thread blocks at the end of its next tick, like a hung fsync or a deadlock.
The gRPC server keeps answering throughout: only the Raft side is stuck.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, machine: Any) -> None:
        self._machine = machine
        self._apply_log_entries = machine._SyncObj__applyLogEntries  # noqa: SLF001 (pysyncobj private)
        self._applies_frozen = False
        self._ticks_released = threading.Event()
        self._ticks_released.set()
        # pysyncobj calls self.__applyLogEntries() once per tick: an instance attribute of the
        # mangled name takes precedence over the class's method.
        machine._SyncObj__applyLogEntries = self._maybe_apply  # noqa: SLF001
        machine.addOnTickCallback(self._maybe_block)

    def _maybe_apply(self) -> bool:
        if self._applies_frozen:
            return False  # "no append entries needed": nothing was applied
        return bool(self._apply_log_entries())

    def _maybe_block(self) -> None:
        self._ticks_released.wait()

    @property
    def applies_frozen(self) -> bool:
        return self._applies_frozen

    @property
    def ticks_stalled(self) -> bool:
        return not self._ticks_released.is_set()

    def freeze_applies(self, frozen: bool) -> None:
        self._applies_frozen = frozen
        log.warning("FAULT INJECTION: applies %s", "frozen" if frozen else "resumed")

    def stall_ticks(self, stalled: bool) -> None:
        if stalled:
            self._ticks_released.clear()
        else:
            self._ticks_released.set()
        log.warning("FAULT INJECTION: raft tick thread %s", "stalled" if stalled else "released")
