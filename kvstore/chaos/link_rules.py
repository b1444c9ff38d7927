"""The link-fault rules shared by every fault proxy of a cluster (`kvstore.chaos.proxy`): which links
between replicas are cut, blackholed one way or delayed, and which proxied address is which replica.

The rules are plain thread-safe state: the chaos runner, the tests and the proxy daemon set them from
their own threads, and each proxy's data path reads them on its event loop without a lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class _Rules:
    """Immutable rule set: setters swap in a new one, so the data path reads rules without a lock."""

    cuts: frozenset[frozenset[str]] = frozenset()
    isolated: frozenset[str] = frozenset()
    blackholes: frozenset[tuple[str, str]] = frozenset()
    delays: tuple[tuple[str | None, str | None, float], ...] = ()
    version: int = 0


class LinkController:
    """Fault rules shared by all proxies of a cluster. Setters are thread-safe and take effect at once:
    every chunk read after a setter returns is judged by the new rules, and proxies close cut links."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules = _Rules()
        self._names: dict[str, str] = {}  # address (advertised or real) -> replica name
        self._listeners: list[Callable[[], None]] = []

    # --- registry and listeners (used by FaultProxy) ---
    def register(self, name: str, *addresses: str) -> None:
        """Map addresses a dialer may announce to the replica name used in rules."""
        with self._lock:
            self._names.update({address: name for address in addresses})

    def name_of(self, address: str | None) -> str | None:
        return None if address is None else self._names.get(address)

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # --- rule setters ---
    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        pairs = {frozenset((a, b)) for a in set(group_a) for b in set(group_b) if a != b}
        self._update(lambda r: dataclasses.replace(r, cuts=r.cuts | pairs))

    def blackhole(self, src: str, dst: str) -> None:
        self._update(lambda r: dataclasses.replace(r, blackholes=r.blackholes | {(src, dst)}))

    def isolate(self, name: str) -> None:
        self._update(lambda r: dataclasses.replace(r, isolated=r.isolated | {name}))

    def delay(self, src: str | None, dst: str | None, seconds: float) -> None:
        """Latency on links from src to dst (None = any, including unidentified dialers). A new call for
        the same (src, dst) replaces the old one; 0 removes it; overlapping rules take the largest."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")

        def change(r: _Rules) -> _Rules:
            kept = tuple(d for d in r.delays if (d[0], d[1]) != (src, dst))
            added = ((src, dst, float(seconds)),) if seconds > 0 else ()
            return dataclasses.replace(r, delays=kept + added)

        self._update(change)

    def heal(self) -> None:
        self._update(lambda r: _Rules())

    def _update(self, change: Callable[[_Rules], _Rules]) -> None:
        with self._lock:
            version = self._rules.version + 1
            self._rules = dataclasses.replace(change(self._rules), version=version)
            listeners = list(self._listeners)
        for callback in listeners:  # outside the lock: callbacks only schedule work on their loops
            callback()

    # --- queries for the data path (lock-free: one attribute read of an immutable object) ---
    def is_cut(self, a: str | None, b: str | None) -> bool:
        """True if the link between a and b (either direction) is cut. None is an unidentified end."""
        rules = self._rules
        if a in rules.isolated or b in rules.isolated:
            return True
        return a is not None and b is not None and frozenset((a, b)) in rules.cuts

    def is_blackholed(self, src: str | None, dst: str | None) -> bool:
        return (src, dst) in self._rules.blackholes

    def delay_for(self, src: str | None, dst: str | None) -> float:
        matching = [s for ds, dd, s in self._rules.delays if ds in (None, src) and dd in (None, dst)]
        return max(matching, default=0.0)

    def snapshot(self) -> dict[str, Any]:
        rules = self._rules
        return {
            "version": rules.version,
            "partitions": sorted(sorted(pair) for pair in rules.cuts),
            "isolated": sorted(rules.isolated),
            "blackholes": sorted([src, dst] for src, dst in rules.blackholes),
            "delays": [{"src": s, "dst": d, "seconds": sec} for s, d, sec in rules.delays],
        }
