"""The client core shared by `Client`, `AsyncClient` and the router: the operations.

Two modes:
- smart: holds the cluster map and ring, sends each key to its shard directly (leader for
  writes, a replica chosen by the read policy for reads), splits multi-key operations by shard;
- router: sends everything to one router address, which runs this same core in smart mode.

Every operation is a plan (see plans.py) returning the raw protobuf response; the front doors turn
it into Python values. No I/O happens here. Below the operations, `Dispatcher` (dispatch.py) runs
each request's attempts: where each goes, and (through the `RetryPolicy`, retry.py) when to stop.
Splitting multi-key operations by shard and merging their answers: split.py.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.client import arguments as check
from kvstore.client.dispatch import ClientSettings, Dispatcher, ReadPolicy, Routed
from kvstore.client.plans import Parallel, Plan
from kvstore.client.retry import Deadline
from kvstore.client.split import (
    MAX_REGROUPS,
    REGROUP,
    check_one_request,
    combine_headers,
    combine_multi_get,
    combined_failure,
    cut_to_limits,
    multi_put_request,
    outcome_of,
    sub_request_id,
    within_budget,
)
from kvstore.consistency import Consistency, ReadConsistency
from kvstore.proto import kvstore_pb2 as pb

__all__ = ["ClientCore", "ClientSettings", "Consistency", "ReadConsistency", "ReadPolicy"]


class ClientCore(Dispatcher):
    """The operations, each a plan returning the raw protobuf response (a split operation's parts
    merged, or one response per shard for `multi_get`).

    Every operation checks its arguments first (arguments.py: `InvalidArgument`, nothing sent)
    and takes a `timeout`: seconds for the whole operation, retries, parts and map fetches
    included (None: the client's; see `Dispatcher.deadline`)."""

    def put(self, key: bytes, value: bytes, timeout: float | None = None) -> Plan:
        request = pb.PutRequest(key=check.key(key, self.limits), value=check.value(value, self.limits))
        deadline = self.deadline(check.timeout(timeout))
        request.request_id = self.new_request_id()
        return (yield from self.write([key], "Put", request, deadline=deadline))

    def compare_and_set(
        self, key: bytes, value: bytes, expected_revision: int, timeout: float | None = None
    ) -> Plan:
        request = pb.CompareAndSetRequest(
            key=check.key(key, self.limits),
            value=check.value(value, self.limits),
            expected_revision=check.revision(expected_revision),
        )
        deadline = self.deadline(check.timeout(timeout))
        request.request_id = self.new_request_id()
        return (yield from self.write([key], "CompareAndSet", request, deadline=deadline))

    def get(
        self,
        key: bytes,
        consistency: ReadConsistency | str | None = None,
        session: dict[int, int] | None = None,
        timeout: float | None = None,
    ) -> Plan:
        request = pb.GetRequest(key=check.key(key, self.limits))
        level = check.consistency(consistency) or self.consistency
        deadline = self.deadline(check.timeout(timeout))
        return (yield from self.read([key], None, "Get", request, level, session, deadline=deadline))

    def multi_put(
        self,
        items: list[tuple[bytes, bytes]],
        atomic: bool = True,
        request_id: bytes = b"",
        retry: bool = False,
        timeout: float | None = None,
    ) -> Plan:
        """Atomic: one shard, one Raft entry (else CrossShardWrite), within the request limits (else
        InvalidArgument). Non-atomic: one write per shard, or several if a shard's part exceeds
        `max_batch_keys` or `max_request_bytes`. `request_id`, `retry`: a router passes its caller's on."""
        items = check.items(items, self.limits)
        check.flag(atomic, "atomic")
        deadline = self.deadline(check.timeout(timeout))
        if atomic and not items:
            raise errors.InvalidArgument("an atomic write needs at least one key (it returns its revision)")
        request_id = request_id or self.new_request_id()
        if atomic:
            check_one_request(
                self.limits,
                len(items),
                sum(map(len, itertools.chain.from_iterable(items))),
                "an atomic multi_put",
            )
        if self.router:
            request = multi_put_request(items, request_id)
            request.non_atomic, request.retry = not atomic, retry
            return (yield from self.write([], "MultiPut", request, deadline=deadline))
        by_key = dict(items)

        def part(routed: Routed, keys: list[bytes]) -> Plan:
            whole = len(keys) == len(items)
            sub_id = sub_request_id(request_id, routed.shard, keys, whole)
            request = multi_put_request(items if whole else [(k, by_key[k]) for k in keys], sub_id)
            request.retry = retry
            return self.write(keys, "MultiPut", request, split=not atomic, routed=routed, deadline=deadline)

        keys = [k for k, _ in items]
        responses = yield from self._per_shard(
            keys, atomic, part, deadline, chunked=not atomic, values=by_key
        )
        return combine_headers(pb.MultiPutResponse(), responses)

    def delete(
        self,
        keys: list[bytes],
        atomic: bool = True,
        request_id: bytes = b"",
        retry: bool = False,
        timeout: float | None = None,
    ) -> Plan:
        keys = check.keys(keys, self.limits, unique=True)
        check.flag(atomic, "atomic")
        deadline = self.deadline(check.timeout(timeout))
        request_id = request_id or self.new_request_id()
        if atomic:
            check_one_request(self.limits, len(keys), sum(map(len, keys)), "an atomic delete")
        if self.router:
            request = pb.DeleteRequest(keys=keys, request_id=request_id, non_atomic=not atomic, retry=retry)
            return (yield from self.write([], "Delete", request, deadline=deadline))

        def part(routed: Routed, group: list[bytes]) -> Plan:
            sub_id = sub_request_id(request_id, routed.shard, group, len(group) == len(keys))
            request = pb.DeleteRequest(keys=group, request_id=sub_id, retry=retry)
            return self.write(group, "Delete", request, split=not atomic, routed=routed, deadline=deadline)

        responses = yield from self._per_shard(keys, atomic, part, deadline, chunked=not atomic)
        combined = combine_headers(pb.DeleteResponse(), responses)
        combined.deleted = sum(r.deleted for r in responses)
        return combined

    def _per_shard(
        self,
        keys: list[bytes],
        atomic: bool,
        part: Callable[[Routed, list[bytes]], Plan],
        deadline: Deadline,
        writes: bool = True,
        chunked: bool = False,
        values: dict[bytes, bytes] | None = None,
    ) -> Plan:
        """Run `part` once per shard's group of keys, concurrently, and wait for every part. A part
        whose keys turn out to span shards under a refreshed map is regrouped and run again (only
        its keys). If a part fails, a write is reported as failed only if no part may have applied.

        `chunked` (non-atomic operations): a group beyond one request's limits (its keys and their
        `values`) is split into several parts. Every part, regrouped or not, ends by `deadline`."""
        if not keys:
            return []  # nothing to do: no map needed, nothing sent
        yield from self._ensure_map(deadline)
        remaining, responses = list(keys), []
        for _ in range(MAX_REGROUPS):
            epoch = self.cluster_map.epoch
            groups = self.cluster_map.slots.shards_for(remaining)
            if atomic and len(groups) > 1:
                self._shard_of(remaining)  # raises CrossShardWrite with the explanation
            chunks = [
                (shard, chunk)
                for shard, group in groups.items()
                for chunk in (cut_to_limits(group, values, self.limits) if chunked else (group,))
            ]
            parts = [part(Routed(shard, epoch), chunk) for shard, chunk in chunks]
            results = yield Parallel([outcome_of(p) for p in parts])
            remaining = [
                k for (_, chunk), r in zip(chunks, results, strict=True) if r is REGROUP for k in chunk
            ]
            failures = [r for r in results if isinstance(r, errors.KvError)]
            responses += [r for r in results if r is not REGROUP and not isinstance(r, errors.KvError)]
            if failures:
                raise combined_failure(failures, len(responses), writes, self.retry)
            if not remaining:
                return responses
        raise errors.Unavailable("the cluster map kept changing while keys were split by shard")

    def multi_get(
        self,
        keys: list[bytes],
        consistency: ReadConsistency | str | None = None,
        session: dict[int, int] | None = None,
        timeout: float | None = None,
    ) -> Plan:
        """One response per shard read (the caller merges them: `combine_multi_get`, or a dict)."""
        keys = check.keys(keys, self.limits)
        level = check.consistency(consistency) or self.consistency
        deadline = self.deadline(check.timeout(timeout))
        if self.router:
            if not keys:
                return []
            request = pb.MultiGetRequest(keys=keys)
            return [
                (yield from self.read(None, None, "MultiGet", request, level, session, deadline=deadline))
            ]

        def part(routed: Routed, group: list[bytes]) -> Plan:
            request = pb.MultiGetRequest(keys=group)
            return self.read(group, None, "MultiGet", request, level, session, routed, deadline)

        return (yield from self._per_shard(keys, False, part, deadline, writes=False, chunked=True))

    def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | str | None = None,
        session: dict[int, int] | None = None,
        timeout: float | None = None,
    ) -> Plan:
        """Keys in order across every shard. The continuation is the last key returned, so it
        stays valid when the cluster map changes between pages."""
        start, end = check.scan_bound(start, "start"), check.scan_bound(end, "end")
        prefix, continuation = (
            check.scan_bound(prefix, "prefix"),
            check.scan_bound(continuation, "continuation"),
        )
        limit = check.scan_limit(limit, self.limits)
        level = check.consistency(consistency) or self.consistency
        deadline = self.deadline(check.timeout(timeout))

        def request() -> pb.ScanRequest:
            return pb.ScanRequest(start=start, end=end, prefix=prefix, limit=limit, continuation=continuation)

        if self.router:
            return (yield from self.read(None, None, "Scan", request(), level, session, deadline=deadline))
        cluster_map = yield from self._ensure_map(deadline)
        plans = [
            self.read(None, s.id, "Scan", request(), level, session, deadline=deadline)
            for s in cluster_map.shards
        ]
        responses = yield Parallel(plans)
        shard_ids = [s.id for s in cluster_map.shards]
        tagged = heapq.merge(
            *([(kv.key, i, kv) for kv in r.kvs] for i, r in zip(shard_ids, responses, strict=True))
        )
        merged_tagged = list(tagged)
        if any(a[0] == b[0] for a, b in itertools.pairwise(merged_tagged)):
            # A key listed by two shards: a move's source (fenced: its copy as of the fence) and
            # its target (serving) for a moment. The newest map says whose it is (a mover flips
            # the map, and waits for every node to have it, before the target serves).
            fresh = yield from self.refresh_map(deadline=deadline)
            owner = fresh.slots.shard_for
            merged_tagged = [
                entry
                for j, entry in enumerate(merged_tagged)
                if not (
                    (j > 0 and merged_tagged[j - 1][0] == entry[0])
                    or (j + 1 < len(merged_tagged) and merged_tagged[j + 1][0] == entry[0])
                )
                or owner(entry[0]) == entry[1]
            ]
        merged = [kv for _, _, kv in merged_tagged]
        more = len(merged) > limit or any(r.continuation for r in responses)
        page = merged[:limit]
        # A shard's page may end early (at the node's answer limit): the merged page must end
        # where the first of those ends, or the keys after it on that shard would be skipped.
        ends = [r.continuation for r in responses if r.continuation]
        if ends:
            page = page[: bisect.bisect_right(page, min(ends), key=lambda kv: kv.key)]
        if len(responses) > 1:  # each shard's page is within the answer limit, together maybe not
            within = within_budget(page, self.limits.max_response_bytes)
            more = more or len(within) < len(page)
            page = within
        combined = combine_headers(pb.ScanResponse(), responses)
        combined.kvs.extend(page)
        if more:  # a shard's page may hold no key it lists (moving slots): go on from where it ended
            combined.continuation = page[-1].key if page else min(ends) if ends else b""
        return combined

    # ----- one KV request message (`Client.send`: the router, tools that want the headers) --------

    def send(self, request: Any, timeout: float | None = None) -> Plan:
        """The plan for one KV request message, run as this client runs its own operations
        (routing, splitting by shard, retries). The request's fields stand: its request id and
        `retry` flag (assigned if empty), `non_atomic`, its read options (a read without session
        tokens uses this client's). The answer is the one response message a node gives: a split
        operation's parts merged under one header (per-shard revisions in `header.revisions`)."""
        if isinstance(request, pb.PutRequest | pb.CompareAndSetRequest):
            check.key(request.key, self.limits)
            check.value(request.value, self.limits)
            deadline = self.deadline(check.timeout(timeout))
            method = "Put" if isinstance(request, pb.PutRequest) else "CompareAndSet"
            return (yield from self.write([request.key], method, request, deadline=deadline))
        if isinstance(request, pb.MultiPutRequest):
            if len(request.keys) != len(request.values):
                raise errors.InvalidArgument(
                    f"{len(request.keys)} keys but {len(request.values)} values: they must pair up"
                )
            items = list(zip(request.keys, request.values, strict=True))
            atomic = not request.non_atomic
            return (yield from self.multi_put(items, atomic, request.request_id, request.retry, timeout))
        if isinstance(request, pb.DeleteRequest):
            keys = list(request.keys)
            atomic = not request.non_atomic
            return (yield from self.delete(keys, atomic, request.request_id, request.retry, timeout))
        if not isinstance(request, pb.GetRequest | pb.MultiGetRequest | pb.ScanRequest):
            raise TypeError(f"not a KV request message: {type(request).__name__}")
        level = ReadConsistency(request.read.consistency, request.read.max_staleness_seconds)
        session = dict(request.read.session) or None
        if isinstance(request, pb.GetRequest):
            return (yield from self.get(request.key, level, session, timeout))
        if isinstance(request, pb.MultiGetRequest):
            keys = list(request.keys)
            return combine_multi_get(keys, (yield from self.multi_get(keys, level, session, timeout)))
        plan = self.scan(
            start=request.start,
            end=request.end,
            prefix=request.prefix,
            limit=request.limit,
            continuation=request.continuation,
            consistency=level,
            session=session,
            timeout=timeout,
        )
        return (yield from plan)
