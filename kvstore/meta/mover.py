"""Moving slot ranges between shards while they serve: the coordinator.

Per range (one source, one target), in phases recorded in the metadata group (`MoveRecord`), so
that a coordinator that crashes anywhere can be resumed by another (`resume`); every step is safe
to repeat. The shards' side of each step is a claim in their own log
(kvstore/replication/slot_claims.py); docs/architecture.md, "Moving slots", walks it through.

1. planned -> copying: the target claims the range `importing` (takes only this move's imports),
   then the source claims it `logging` (from that entry on, every write to the range is also
   recorded in the source's change log, as its outcome).
2. copying: the range's keys, read from the source in pages (strong reads, through the slot
   index: cost in proportion to the range), are imported by the target.
3. catching_up: the change log is replayed into the target in order, in rounds, until a round is
   small; then the source claims the range `fenced` (writes and fresh reads refused with
   `Moving`, which clients retry).
4. fenced: the final catch-up, until the log (read after the fence) has nothing more; then the
   map's compare-and-set (epoch + 1: the target owns the range).
5. flipped: the target claims `serving` (from that epoch), the source `gone`.
6. cleaning: the source drops the range's keys and the change log, a page at a time; done.

An abort before the flip unfences the source (claim `aborted`), and the target drops what it
imported: the source owns all of the range's data, as before. After the flip, a move is undone
only by moving the range back. `rate` (keys/s) throttles copying, catch-up and cleanup alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from kvstore import errors
from kvstore.meta.store import MapStore, MoveRecord, MoveRecords
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import ClusterMap
from kvstore.routing.ring import SLOT_COUNT

PAGE = 1000  # keys or changes per page (fewer when throttled below it)
SMALL_ROUND = 200  # a catch-up round this small is followed by the fence
MAX_ROUNDS = 20  # catch-up rounds before fencing anyway (a writer faster than the copy)
CALL_TIMEOUT = 10.0  # per step, across retries (no leader, a leader change)

Say = Callable[[str], None]


class MoveFailed(errors.KvError):
    """A move stopped; its record says in which phase (resume or abort it)."""


def plan_moves(
    cluster_map: ClusterMap, first: int, last: int, target: int
) -> dict[int, list[tuple[int, int]]]:
    """Per source shard, the (first, last) runs of slots first..last it owns (not `target`)."""
    moves: dict[int, list[tuple[int, int]]] = {}
    for run_first, run_last, source in plan_ranges(cluster_map, first, last, target):
        moves.setdefault(source, []).append((run_first, run_last))
    return moves


def plan_ranges(cluster_map: ClusterMap, first: int, last: int, target: int) -> list[tuple[int, int, int]]:
    """(first, last, source) runs of slots first..last that another shard than `target` owns."""
    if not 0 <= first <= last < SLOT_COUNT:
        raise errors.InvalidArgument(f"slots {first}-{last} are not a range of 0-{SLOT_COUNT - 1}")
    cluster_map.shard(target)  # UnknownShard unless it is in the map
    table = cluster_map.slots
    runs: list[tuple[int, int, int]] = []
    for slot in range(first, last + 1):
        owner = table.shard_for_slot(slot)
        if owner == target:
            continue
        if runs and runs[-1][2] == owner and runs[-1][1] == slot - 1:
            runs[-1] = (runs[-1][0], slot, owner)
        else:
            runs.append((slot, slot, owner))
    return runs


class ShardCalls:
    """Admin calls to a shard's leader: follows NotLeader hints, tries each replica, retries while
    no leader answers, until `CALL_TIMEOUT`."""

    def __init__(self, cluster_map: ClusterMap, admin_token: str) -> None:
        self.cluster_map = cluster_map
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._leaders: dict[int, str] = {}
        self._metadata = (
            (errors.CLUSTER_ID_KEY, cluster_map.cluster_id),
            (errors.ADMIN_TOKEN_KEY, admin_token),
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _stub(self, address: str) -> pb_grpc.AdminStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=_OPTIONS)
        return pb_grpc.AdminStub(self._channels[address])

    async def call(self, shard_id: int, method: str, request: Any) -> Any:
        replicas = [r.address for r in self.cluster_map.shard(shard_id).replicas]
        deadline = time.monotonic() + CALL_TIMEOUT
        address = self._leaders.get(shard_id) or replicas[0]
        last: errors.KvError | None = None
        pause = 0.05
        while time.monotonic() < deadline:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                return await getattr(self._stub(address), method)(
                    request, timeout=min(5.0, remaining), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                err = errors.from_rpc_error(exc)
            if not err.retryable and not isinstance(err, errors.Unavailable | errors.UnknownOutcome):
                raise err
            last = err
            if isinstance(err, errors.NotLeader) and err.leader and err.leader != address:
                address = self._leaders[shard_id] = err.leader
                continue
            others = [a for a in replicas if a != address]
            address = random.choice(others) if others else address
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)
        raise errors.Unavailable(f"shard {shard_id} did not answer {method} within {CALL_TIMEOUT:g}s: {last}")

    async def wait_for_epoch(self, epoch: int, timeout: float = 10.0) -> list[str]:
        """Wait until every replica of every shard that answers holds map `epoch` or newer (they
        poll the metadata group twice a second); the names of those that did not in time."""
        deadline = time.monotonic() + timeout
        waiting = [r for s in self.cluster_map.shards for r in s.replicas]
        while waiting and time.monotonic() < deadline:
            behind = []
            for replica in waiting:
                try:
                    status = await self._stub(replica.address).Status(
                        pb.StatusRequest(), timeout=1.0, metadata=self._metadata
                    )
                except grpc.RpcError:
                    continue  # down or cut off: it starts from its cached map, or learns later
                if status.epoch < epoch:
                    behind.append(replica)
            waiting = behind
            if waiting:
                await asyncio.sleep(0.1)
        return [r.name for r in waiting]


_OPTIONS = [("grpc.max_receive_message_length", 512 << 20), ("grpc.max_send_message_length", 512 << 20)]


class Throttle:
    """Keeps a count of keys per second under `rate` (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._started = time.monotonic()
        self._count = 0

    async def took(self, count: int) -> None:
        self._count += count
        if self.rate > 0:
            ahead = self._count / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                await asyncio.sleep(ahead)


class Mover:
    """Runs moves against the cluster whose map (any epoch) is `cluster_map`, with its admin secret
    (`admin_token`: the steps need it). `say`: progress lines."""

    def __init__(self, cluster_map: ClusterMap, admin_token: str, say: Say = lambda _: None) -> None:
        self.admin_token = admin_token
        self.store = MapStore(cluster_map, timeout=CALL_TIMEOUT, admin_token=admin_token)
        self.records = MoveRecords(self.store)
        self.say = say
        self._calls: ShardCalls | None = None

    async def close(self) -> None:
        if self._calls is not None:
            await self._calls.close()
        await self.store.close()

    async def _shards(self) -> ShardCalls:
        current, _ = await self.store.read()
        if current is None:
            raise errors.Unavailable("the metadata group holds no cluster map yet")
        if self._calls is None:
            self._calls = ShardCalls(current, self.admin_token)
        self._calls.cluster_map = current
        return self._calls

    # ----- starting, resuming, aborting --------------------------------------------------------

    async def move_slots(
        self, first: int, last: int, target: int, rate: float = 0.0, stop_at: str | None = None
    ) -> list[MoveRecord]:
        """Move slots first..last (those another shard owns) to `target`; returns the moves, done
        (or stopped at phase `stop_at`: see `resume`)."""
        current, _ = await self.store.read()
        if current is None:
            raise errors.Unavailable("the metadata group holds no cluster map yet")
        return await self.move_ranges(plan_moves(current, first, last, target), target, rate, stop_at)

    async def move_ranges(
        self,
        by_source: dict[int, list[tuple[int, int]]],
        target: int,
        rate: float = 0.0,
        stop_at: str | None = None,
    ) -> list[MoveRecord]:
        """One move per source shard of its (first, last) ranges to `target`, one after another."""
        busy = [m for m in await self.records.all() if not m.finished_phase]
        for ranges in by_source.values():
            for m in busy:
                if m.overlaps(ranges):
                    raise errors.InvalidArgument(
                        f"{m.describe()} are in move {m.id} ({m.phase}): resume or abort it first"
                    )
        done = []
        for source, ranges in sorted(by_source.items()):
            record = MoveRecord(await self.records.new_id(), ranges, source, target, rate=rate)
            await self.records.create(record)
            self.say(f"move {record.id}: {record.describe()} from shard {source} to shard {target}")
            done.append(await self.resume(record.id, stop_at))
        return done

    async def resume(self, move_id: int, stop_at: str | None = None) -> MoveRecord:
        """Drive move `move_id` from its recorded phase to done, or until it reaches phase
        `stop_at` (it then waits there, paused, for the next `resume`)."""
        record, revision = await self.records.read(move_id)
        if record.finished_phase:
            return record
        try:
            return await self._run(record, revision, stop_at)
        except errors.KvError as exc:
            with contextlib.suppress(errors.KvError):
                record, revision = await self.records.read(move_id)
                record.error = f"{exc.kind}: {exc.message}"
                await self.records.save(record, revision)
            raise MoveFailed(
                f"move {move_id} stopped in phase {record.phase}: {exc.message} (resume it, or abort it "
                "before it flips)"
            ) from exc

    async def abort(self, move_id: int) -> MoveRecord:
        """Undo a move that has not flipped: the source keeps (and serves) all of the range."""
        record, revision = await self.records.read(move_id)
        if record.phase == "aborted":
            return record
        if record.phase in ("flipped", "cleaning", "done"):
            raise errors.InvalidArgument(
                f"move {move_id} has flipped (epoch {record.epoch}): the target owns the range; "
                "move it back instead"
            )
        shards = await self._shards()
        await self._claim(shards, record.source, record, "out", "aborted")
        await self._claim(shards, record.target, record, "in", "aborted")
        record.phase, record.error = "aborted", ""
        revision = await self.records.save(record, revision)
        throttle = Throttle(record.rate)
        for shard in (record.target, record.source):  # the imported keys; the change log
            while True:
                answer = await shards.call(
                    shard, "DropMoved", pb.DropMovedRequest(shard=shard, move=record.id, limit=PAGE)
                )
                await throttle.took(answer.keys + answer.changes)
                if not answer.keys and not answer.changes:
                    break
        record.finished = time.time()
        await self.records.save(record, revision)
        self.say(f"move {move_id}: aborted; shard {record.source} keeps its {record.describe()}")
        return record

    # ----- the phases --------------------------------------------------------------------------

    async def _run(self, record: MoveRecord, revision: int, stop_at: str | None) -> MoveRecord:
        shards = await self._shards()
        throttle = Throttle(record.rate)
        began = time.monotonic()
        while record.phase != "done" and record.phase != stop_at:
            step = getattr(self, f"_{record.phase}", None)
            if step is None:
                raise errors.KvError(f"move {record.id} is in an unknown phase {record.phase!r}")
            next_phase = await step(shards, record, throttle)
            shards = await self._shards()  # a flip changed the map
            record.phase, record.error = next_phase, ""
            if next_phase == "done":
                record.finished = time.time()
            revision = await self.records.save(record, revision)
            elapsed = time.monotonic() - began
            self.say(
                f"move {record.id}: {next_phase} ({elapsed:.1f}s: {record.keys_copied} keys copied, "
                f"{record.changes_applied} changes replayed, {record.keys_dropped} dropped)"
            )
        return record

    async def _planned(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        await self._claim(shards, record.target, record, "in", "importing")
        await self._claim(shards, record.source, record, "out", "logging")
        return "copying"

    async def _copying(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        record.keys_copied = await self._copy(shards, record, throttle)
        return "catching_up"

    async def _catching_up(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        for _ in range(MAX_ROUNDS):
            if await self._catch_up(shards, record, throttle, rounds=1) < SMALL_ROUND:
                break
        await self._claim(shards, record.source, record, "out", "fenced")
        return "fenced"

    async def _fenced(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        await self._catch_up(shards, record, throttle, rounds=None)  # until nothing is left
        record.epoch = await self._flip(record)
        return "flipped"

    async def _flipped(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        # Every node holds the new map before the target serves: a scan that meets the range on
        # both sides for that moment can tell whose it is from any node's map (core.scan).
        behind = await shards.wait_for_epoch(record.epoch)
        if behind:
            self.say(f"move {record.id}: {', '.join(behind)} still behind epoch {record.epoch}")
        await self._claim(shards, record.target, record, "in", "serving", record.epoch)
        await self._claim(shards, record.source, record, "out", "gone", record.epoch)
        return "cleaning"

    async def _cleaning(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> str:
        while True:
            request = pb.DropMovedRequest(shard=record.source, move=record.id, limit=PAGE)
            answer = await shards.call(record.source, "DropMoved", request)
            record.keys_dropped += answer.keys
            await throttle.took(answer.keys)
            if not answer.keys and not answer.changes:
                return "done"

    async def _claim(
        self, shards: ShardCalls, shard: int, record: MoveRecord, side: str, phase: str, epoch: int = 0
    ) -> pb.MoveClaimResponse:
        request = pb.MoveClaimRequest(
            shard=shard,
            move=record.id,
            ranges=[pb.SlotRange(first=a, last=b) for a, b in record.ranges],
            side=side,
            phase=phase,
            epoch=epoch,
        )
        return await shards.call(shard, "MoveClaim", request)

    async def _copy(self, shards: ShardCalls, record: MoveRecord, throttle: Throttle) -> int:
        """Every key of the range from the source into the target; how many."""
        copied = 0
        resume, after_slot, after_key = False, 0, b""
        page = min(PAGE, max(1, int(record.rate))) if record.rate else PAGE
        while True:
            answer = await shards.call(
                record.source,
                "ExportKeys",
                pb.ExportKeysRequest(
                    shard=record.source,
                    move=record.id,
                    resume=resume,
                    after_slot=after_slot,
                    after_key=after_key,
                    limit=page,
                ),
            )
            if answer.keys:
                await self._import(
                    shards, record, list(answer.keys), list(answer.values), [False] * len(answer.keys), 0
                )
                copied += len(answer.keys)
                await throttle.took(len(answer.keys))
            if answer.done:
                return copied
            resume, after_slot, after_key = True, answer.next_slot, answer.next_key

    async def _catch_up(
        self, shards: ShardCalls, record: MoveRecord, throttle: Throttle, rounds: int | None
    ) -> int:
        """Replay the source's change log into the target from where the target has it; stops after
        one page if `rounds` is 1, else when a page comes back empty. Changes replayed."""
        through = (await self._claim(shards, record.target, record, "in", "importing")).imported_through
        replayed = 0
        page = min(PAGE, max(1, int(record.rate))) if record.rate else PAGE
        while True:
            answer = await shards.call(
                record.source,
                "ExportChanges",
                pb.ExportChangesRequest(
                    shard=record.source, move=record.id, after_revision=through, limit=page
                ),
            )
            if not answer.keys:
                return replayed
            through = max(answer.revisions)
            await self._import(
                shards, record, list(answer.keys), list(answer.values), list(answer.deleted), through
            )
            replayed += len(answer.keys)
            record.changes_applied += len(answer.keys)
            await throttle.took(len(answer.keys))
            if rounds == 1:
                return replayed

    async def _import(
        self,
        shards: ShardCalls,
        record: MoveRecord,
        keys: list[bytes],
        values: list[bytes],
        deleted: list[bool],
        through: int,
    ) -> None:
        request = pb.ImportChangesRequest(
            shard=record.target, move=record.id, keys=keys, values=values, deleted=deleted, through=through
        )
        await shards.call(record.target, "ImportChanges", request)

    async def _flip(self, record: MoveRecord) -> int:
        """The map change that gives the range to the target; its epoch (done already: the current)."""
        moves = [(a, b, record.target) for a, b in record.ranges]
        while True:
            current, _ = await self.store.read()
            assert current is not None
            owners = {current.slots.shard_for_slot(s) for a, b in record.ranges for s in range(a, b + 1)}
            if owners == {record.target}:
                return current.epoch  # flipped before a crash
            try:
                flipped = await self.store.change(lambda m: m.with_slots_moved(*moves))
            except errors.MapConflict:
                continue  # another change landed (another move's flip): read again
            return flipped.epoch
