"""The `reshard` nemesis: slot moves back and forth while the other nemeses strike.

A background thread moves the slot of a random workload key to another shard, again and again
(kvstore/meta/mover.py, the same coordinator `kvstore cluster move-slots` runs), so kills, pauses
and partitions land on the source, the target and the metadata group mid-move. A move that fails
(a step found no leader in time) is left in its phase and resumed before the next one, as an
operator would; when the run heals, every unfinished move is driven to done. The checkers then
see the history across the flips: a lost or stale write shows up as a linearizability anomaly or
a lost write.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.cluster.local import LocalCluster
from kvstore.meta.mover import Mover
from kvstore.routing.ring import slot_of


class Resharder:
    def __init__(
        self,
        cluster: LocalCluster,
        keys: list[bytes],
        rng: random.Random,
        record: Callable[[str, str, float, float], None],
        gap: tuple[float, float] = (0.5, 2.0),
    ) -> None:
        """`record(kind, target, start, end)`: log one move (or a failed attempt) as a fault."""
        self.cluster = cluster
        self.keys = keys
        self.rng = random.Random(rng.randrange(1 << 30))
        self.record = record
        self.gap = gap
        self.moves = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reshard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, finish_within: float = 120.0) -> None:
        """Stop moving, then drive every unfinished move to done (the cluster is healed by now)."""
        self._stop.set()
        self._thread.join(finish_within)
        asyncio.run(self._finish(time.monotonic() + finish_within))

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._moves())
        finally:
            loop.close()

    def _mover(self) -> Mover:
        return Mover(self.cluster.cluster_map(), self.cluster.admin_token())

    async def _moves(self) -> None:
        mover = self._mover()
        try:
            while not self._stop.wait(self.rng.uniform(*self.gap)):
                started = time.monotonic()
                try:
                    await self._resume_unfinished(mover)
                    target = await self._one_move(mover)
                    self.moves += 1
                    self.record("reshard", target, started, time.monotonic())
                except errors.KvError as exc:
                    self.failures += 1
                    self.record(
                        "reshard-stalled", f"{exc.kind}: {exc.message[:120]}", started, time.monotonic()
                    )
        finally:
            await mover.close()

    async def _one_move(self, mover: Mover) -> str:
        current, _ = await mover.store.read()
        if current is None:
            raise errors.Unavailable("the metadata group holds no map yet")
        slot = slot_of(self.rng.choice(self.keys))
        owner = current.slots.shard_for_slot(slot)
        target = self.rng.choice([s.id for s in current.shards if s.id != owner])
        await mover.move_slots(slot, slot, target)
        return f"slot {slot}: shard {owner} -> {target}"

    async def _resume_unfinished(self, mover: Mover) -> list[Any]:
        return [await mover.resume(m.id) for m in await mover.records.all() if not m.finished_phase]

    async def _finish(self, deadline: float) -> None:
        while True:
            mover = self._mover()
            try:
                await self._resume_unfinished(mover)
                return
            except errors.KvError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
            finally:
                await mover.close()
