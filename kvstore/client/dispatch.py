"""Where each attempt of one request goes, and when to stop: the part of the client core below the
operations (`core.py`).

`Dispatcher` holds what a client learns as it goes (the cluster map, each shard's leader, replica
latencies, its session tokens) and runs the attempt loops of one request: `write` (to the shard's
leader until applied, definitely failed, or out of time), `read` (to a replica the read policy and
the consistency level allow, falling back towards the leader), and the router's loop. Whether and
when to try again is the `RetryPolicy`'s (retry.py); which address the next attempt goes to is
decided here. Like everything under the front doors, these are plans (plans.py): no I/O happens here.
"""

from __future__ import annotations

import enum
import itertools
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvstore import errors
from kvstore.client.plans import Call, Plan
from kvstore.client.retry import Attempts, Deadline, RetryPolicy
from kvstore.client.session import decode_session, encode_session
from kvstore.client.split import MapChanged
from kvstore.config import Limits
from kvstore.consistency import Consistency, ConsistencyLevel, ReadConsistency
from kvstore.proto import kvstore_pb2 as pb
from kvstore.routing.cluster_map import ClusterMap, ShardInfo

STRONG, SESSION, BOUNDED, EVENTUAL = (
    ConsistencyLevel.STRONG,
    ConsistencyLevel.SESSION,
    ConsistencyLevel.BOUNDED,
    ConsistencyLevel.EVENTUAL,
)


class ReadPolicy(enum.Enum):
    """Which replica serves a non-leader-only read.

    FOLLOWERS_ONLY tries every follower first and goes to the leader only when none can serve."""

    LEADER = "leader"
    NEAREST = "nearest"
    ROUND_ROBIN = "round_robin"
    FOLLOWERS_ONLY = "followers_only"


@dataclass(frozen=True)
class ClientSettings:
    timeout: float = 10.0  # whole operation, retries included (writes: see RetryPolicy.write_deadline)
    rpc_timeout: float = 5.0  # one call
    # The default RetryPolicy's back-off (a `retry` policy given to ClientCore has its own).
    backoff_initial: float = 0.02
    backoff_max: float = 0.5
    zone: str = ""  # NEAREST prefers replicas with this zone label


class Routed(NamedTuple):
    """The shard a group of keys was routed to, and the map epoch that routing used."""

    shard: int
    epoch: int


class Dispatcher:
    """One request's attempts: see the module docstring. `ClientCore` adds the operations."""

    def __init__(
        self,
        *,
        seeds: Iterable[str] = (),
        cluster_map: ClusterMap | None = None,
        router: str | None = None,
        consistency: ReadConsistency = Consistency.STRONG,
        read_policy: ReadPolicy = ReadPolicy.LEADER,
        session: str | None = None,
        settings: ClientSettings | None = None,
        track_session: bool = True,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.router = router
        self.seeds = list(seeds)
        self.cluster_map = cluster_map
        if not router and not self.seeds and cluster_map is None:
            raise ValueError("give seed addresses, a cluster map, or a router address")
        self.consistency = consistency
        self.read_policy = read_policy
        self.settings = settings or ClientSettings()
        self.retry = retry or RetryPolicy(
            backoff_initial=self.settings.backoff_initial, backoff_max=self.settings.backoff_max
        )
        self.limits = limits or Limits()  # the nodes' (the defaults unless a cluster changed them)
        self.track_session = track_session
        self.session: dict[int, int] = decode_session(session) if session else {}
        self._session_lock = threading.Lock()
        self.leaders: dict[int, str] = {}
        self.latency: dict[str, float] = {}
        # The newest map epoch a response named: a newer one than the map's is fetched before
        # the next operation (a node learns a change from the metadata group within a second).
        self.newest_epoch_seen = 0
        self.extra_metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (an admin token)
        self._rr = itertools.count()
        # This client's session on the servers: its writes' request ids are the client id and a
        # sequence number (`new_request_id`), which the servers keep outcomes under.
        self.client_id = os.urandom(16)
        self._sequence = itertools.count(1)  # next() is atomic under the GIL: Client threads share it

    def new_request_id(self) -> bytes:
        return self.client_id + next(self._sequence).to_bytes(8, "big")

    # ----- session tokens --------------------------------------------------------------------

    @property
    def cluster_metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries once the cluster's id is known (from the map): a node of another
        cluster refuses it (errors.ClusterMismatch) instead of answering for data it does not hold."""
        cluster_id = self.cluster_map.cluster_id if self.cluster_map is not None else ""
        return (((errors.CLUSTER_ID_KEY, cluster_id),) if cluster_id else ()) + self.extra_metadata

    def session_token(self) -> str:
        with self._session_lock:
            return encode_session(dict(self.session))

    def observe(self, header: pb.ResponseHeader) -> None:
        """Learn from a response: the shard's leader (a hint that follows failovers), and the
        session token, raised to what the response shows was seen or written."""
        if header.leader and not header.revisions:
            self.leaders[header.shard] = header.leader
        if header.epoch > self.newest_epoch_seen:
            self.newest_epoch_seen = header.epoch
        if not self.track_session:
            return
        seen = dict(header.revisions) or {header.shard: header.revision}
        with self._session_lock:  # Client threads share it; a token must never move backwards
            for shard, revision in seen.items():
                if revision > self.session.get(shard, 0):
                    self.session[shard] = revision

    def record_latency(self, address: str, seconds: float) -> None:
        old = self.latency.get(address)
        self.latency[address] = seconds if old is None else 0.8 * old + 0.2 * seconds

    # ----- cluster map -----------------------------------------------------------------------

    def deadline(self, timeout: float | None = None) -> Deadline:
        """An operation's deadline from now: its own `timeout`, else the policy's or the client's."""
        return self.retry.deadline_for(timeout, self.settings.timeout, self.settings.rpc_timeout)

    def _ensure_map(self, deadline: Deadline | None = None) -> Plan:
        if self.cluster_map is None:
            yield from self.refresh_map(deadline=deadline)
        elif self.newest_epoch_seen > self.cluster_map.epoch:
            # A node serves under a newer map: fetch it now rather than meet a redirect later.
            # Once: if no node has it yet, the next wrong-shard answer asks again.
            seen, self.newest_epoch_seen = self.newest_epoch_seen, 0
            yield from self.refresh_map(seen, deadline)
        return self.cluster_map

    def refresh_map(self, min_epoch: int = 0, deadline: Deadline | None = None) -> Plan:
        """Fetch the map from any known node; keep whichever is newest. Within `deadline` (the
        operation's that needs the map; by default the client's timeout from now)."""
        deadline = deadline or self.deadline()
        candidates = list(self.seeds)
        if self.cluster_map is not None:
            candidates += [r.address for s in self.cluster_map.shards for r in s.replicas]
        random.shuffle(candidates)
        last_error: errors.KvError | None = None
        for address in dict.fromkeys(candidates):
            remaining = deadline.at - self.retry.clock()
            if remaining <= 0:
                last_error = last_error or errors.Timeout("the deadline passed")
                break
            try:
                msg = yield Call(
                    address,
                    "Admin",
                    "ClusterMap",
                    pb.ClusterMapRequest(),
                    min(deadline.rpc_timeout, remaining),
                    self.cluster_metadata,
                )
            except errors.ClientClosed:
                raise  # final: no other node would be asked either
            except errors.KvError as err:
                last_error = err
                continue
            try:
                fetched = ClusterMap.from_proto(msg)
            except errors.KvError as err:  # a node answering a map that does not hold together
                last_error = err
                continue
            known = self.cluster_map.cluster_id if self.cluster_map is not None else ""
            if known and fetched.cluster_id != known:
                continue  # another cluster's node (it answered without checking): never switch
            if self.cluster_map is None or fetched.epoch >= self.cluster_map.epoch:
                self.cluster_map = fetched
            if self.cluster_map.epoch >= min_epoch:
                return self.cluster_map
        if self.cluster_map is not None:
            return self.cluster_map
        raise errors.Unavailable(
            f"could not fetch the cluster map from any of {candidates}: {last_error} (seed addresses "
            "are the nodes' client ports, not their Raft ports: `kvstore cluster status` lists them)"
        )

    def _shard_of(self, keys: list[bytes], split: bool = False, routed: Routed | None = None) -> ShardInfo:
        """The one shard owning `keys`. If they span shards: a part of a split operation must be
        regrouped (`MapChanged`); an atomic write is refused (`CrossShardWrite`).

        `routed` is what grouping the keys found; it stands while the map is the one it came from,
        so a split operation hashes each key once, not once per part and attempt."""
        assert self.cluster_map is not None
        if routed is not None and routed.epoch == self.cluster_map.epoch:
            return self.cluster_map.shard(routed.shard)
        groups = self.cluster_map.slots.shards_for(keys)
        if len(groups) > 1:
            if split:
                raise MapChanged()
            raise errors.CrossShardWrite(
                f"an atomic write's keys span shards {sorted(groups)}; use a shared {{hash tag}} "
                "or the non-atomic variant (put_many/delete_many with atomic=False)"
            )
        return self.cluster_map.shard(next(iter(groups)))

    # ----- target selection ------------------------------------------------------------------

    def _leader_guess(self, shard: ShardInfo) -> str:
        return self.leaders.get(shard.id) or shard.replicas[0].address

    def _next_replica(self, shard: ShardInfo, after: str) -> str:
        addresses = [r.address for r in shard.replicas]
        i = addresses.index(after) if after in addresses else -1
        return addresses[(i + 1) % len(addresses)]

    def _read_targets(self, shard: ShardInfo, policy: ReadPolicy) -> list[str]:
        leader = self._leader_guess(shard)
        replicas = [r.address for r in shard.replicas]
        if policy == ReadPolicy.LEADER:
            return [leader] + [a for a in replicas if a != leader]
        if policy == ReadPolicy.ROUND_ROBIN:
            start = next(self._rr) % len(replicas)
            return replicas[start:] + replicas[:start]
        if policy == ReadPolicy.FOLLOWERS_ONLY:
            followers = [a for a in replicas if a != leader]
            random.shuffle(followers)
            return followers + [leader]
        zone = self.settings.zone

        def distance(r: Any) -> tuple[int, float]:
            return (0 if zone and r.zone == zone else 1, self.latency.get(r.address, 0.0))

        return [r.address for r in sorted(shard.replicas, key=distance)]

    # ----- the retry loops: the policy says whether to go on, these say where -----------------

    def _attempts(self, deadline: Deadline | None, write: bool = False) -> Attempts:
        return self.retry.start(
            self.settings.timeout, self.settings.rpc_timeout, write=write, deadline=deadline
        )

    def write(
        self,
        keys: list[bytes],
        method: str,
        request: Any,
        split: bool = False,
        routed: Routed | None = None,
        deadline: Deadline | None = None,
    ) -> Plan:
        """Send a write to its shard's leader until it is applied, definitely failed, or time is up.

        Retries reuse the request's id, so a write that did apply is not applied twice; once an
        attempt may have applied, later ones say so (`retry`), so a server that no longer holds
        this client's session refuses them (SessionExpired) rather than apply again."""
        if not request.request_id:
            request.request_id = self.new_request_id()  # e.g. a bare gRPC client through the router
        if self.router:
            return (yield from self._via_router(method, request, is_write=True, deadline=deadline))
        attempts = self._attempts(deadline, write=True)
        while True:
            attempts.begin()
            yield from self._ensure_map(attempts.remaining())
            shard = self._shard_of(keys, split, routed)
            address = self._leader_guess(shard)
            request.epoch = self.cluster_map.epoch
            request.retry = request.retry or attempts.may_have_applied  # a router passes its caller's on
            try:
                response = yield Call(
                    address, "KV", method, request, attempts.call_timeout(), self.cluster_metadata
                )
            except errors.KvError as err:
                if not self.retry.retryable(err):
                    raise
                attempts.failed(err)
                if isinstance(err, errors.WrongShard):
                    yield from self.refresh_map(err.epoch, attempts.remaining())
                    if attempts.redirect():
                        continue
                elif isinstance(err, errors.NotLeader):
                    self.leaders[shard.id] = err.leader or self._next_replica(shard, address)
                    if err.leader and attempts.redirect():
                        continue
                elif isinstance(err, errors.Moving):
                    # The slot is between owners for a moment: back off (below), then ask again
                    # under the newest map (the move may have flipped meanwhile).
                    yield from self.refresh_map(0, attempts.remaining())
                elif not isinstance(err, errors.Overloaded):
                    # No answer, or no leader there: the next replica may lead now. (Overloaded:
                    # refused before it started, the leader is busy: back off, same leader.)
                    self.leaders[shard.id] = self._next_replica(shard, address)
            else:
                self.leaders[shard.id] = address
                self.observe(response.header)
                return response
            if attempts.exhausted():
                raise attempts.give_up("no attempt made")
            yield attempts.pause()

    def read(
        self,
        keys: list[bytes] | None,
        shard_id: int | None,
        method: str,
        request: Any,
        consistency: ReadConsistency,
        session: dict[int, int] | None = None,
        routed: Routed | None = None,
        deadline: Deadline | None = None,
    ) -> Plan:
        """Send a read to a replica that can serve it at `consistency`; fall back towards the leader."""
        if self.router:
            request.read.CopyFrom(self._read_options(consistency, None, session))
            return (yield from self._via_router(method, request, is_write=False, deadline=deadline))
        attempts = self._attempts(deadline)
        refusal: errors.KvError | None = None
        level = consistency
        while True:
            attempts.begin()
            yield from self._ensure_map(attempts.remaining())
            if keys is None:
                shard = self.cluster_map.shard(shard_id)
            else:
                shard = self._shard_of(keys, split=True, routed=routed)
            if shard.id not in self.leaders and self.read_policy in _LEADER_AWARE:
                yield from self._discover_leader(shard, attempts)
            for address in self._read_targets(shard, self.read_policy):
                if attempts.expired():
                    break  # the next replica would get no time: the operation ends here
                request.read.CopyFrom(self._read_options(level, shard.id, session))
                request.epoch = self.cluster_map.epoch
                started = time.monotonic()
                try:
                    response = yield Call(
                        address, "KV", method, request, attempts.call_timeout(), self.cluster_metadata
                    )
                except errors.KvError as err:
                    if not self.retry.retryable(err):
                        raise
                    if isinstance(err, errors.WrongShard | errors.Moving):
                        attempts.failed(err)  # Moving: every replica would say so; back off first
                        epoch = err.epoch if isinstance(err, errors.WrongShard) else 0
                        yield from self.refresh_map(epoch, attempts.remaining())
                        break
                    if isinstance(err, errors.ReplicaBehind):
                        attempts.failed(err)
                        refusal = err
                        if level.level == BOUNDED:
                            level = Consistency.STRONG  # the leader's barrier is always within any bound
                    elif isinstance(err, errors.UnknownOutcome):
                        # For a read, "outcome unknown" only means no answer in time.
                        attempts.failed(errors.Timeout(f"read timed out at {address}: {err.message}"))
                    else:  # unavailable, not the leader: the next replica
                        attempts.failed(err)
                        if isinstance(err, errors.NotLeader) and err.leader:
                            self.leaders[shard.id] = err.leader
                    continue
                self.record_latency(address, time.monotonic() - started)
                self.observe(response.header)
                return response
            if attempts.exhausted():
                # Prefer what a server said (e.g. replica_behind) over the timeout that ended it.
                raise refusal or attempts.give_up("no replica answered")
            yield attempts.pause()

    def _discover_leader(self, shard: ShardInfo, attempts: Attempts) -> Plan:
        """Ask the shard's replicas who leads, so leader-aware read policies start right (a client
        that only reads would otherwise never learn it). Best effort: no answer leaves a guess."""
        addresses = {r.address for r in shard.replicas}
        for replica in shard.replicas:
            if attempts.expired():
                return
            try:
                status = yield Call(
                    replica.address,
                    "Admin",
                    "Status",
                    pb.StatusRequest(),
                    attempts.call_timeout(),
                    self.cluster_metadata,
                )
            except errors.KvError:
                continue
            if status.leader_address in addresses:
                self.leaders[shard.id] = status.leader_address
                return

    def _read_options(
        self, consistency: ReadConsistency, shard_id: int | None, session: dict[int, int] | None = None
    ) -> pb.ReadOptions:
        """`session` overrides this client's own tokens (the router passes its caller's through)."""
        options = pb.ReadOptions(
            consistency=consistency.level, max_staleness_seconds=consistency.max_staleness
        )
        if consistency.level == SESSION:
            tokens = self.session if session is None else session
            if shard_id is not None:
                tokens = {shard_id: tokens.get(shard_id, 0)}
            options.session.update({k: v for k, v in tokens.items() if v})
        return options

    def _via_router(
        self, method: str, request: Any, *, is_write: bool, deadline: Deadline | None = None
    ) -> Plan:
        """Send to the router until it answers: it does the routing, so only an unreachable or busy
        router, or no answer, is tried again (`RetryPolicy.retryable(through_router=True)`)."""
        attempts = self._attempts(deadline, write=is_write)
        while True:
            attempts.begin()
            if is_write:
                request.retry = request.retry or attempts.may_have_applied
            try:
                response = yield Call(
                    self.router, "KV", method, request, attempts.call_timeout(), self.cluster_metadata
                )
            except errors.KvError as err:
                if not self.retry.retryable(err, through_router=True):
                    raise
                if not is_write and isinstance(err, errors.UnknownOutcome):
                    # For a read, "outcome unknown" only means no answer in time (as in `read`).
                    err = errors.Timeout(f"read timed out at {self.router}: {err.message}")
                attempts.failed(err)
            else:
                self.observe(response.header)
                return response
            if attempts.exhausted():
                raise attempts.give_up("router unreachable")
            yield attempts.pause()


# Read policies whose replica order depends on knowing the leader.
_LEADER_AWARE = (ReadPolicy.LEADER, ReadPolicy.FOLLOWERS_ONLY)
