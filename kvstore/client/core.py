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
from kvstore.client.dispatch import ClientSettings, Dispatcher, ReadPolicy, Routed
from kvstore.client.plans import Parallel, Plan
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
    merged, or one response per shard for `multi_get`)."""

    def put(self, key: bytes, value: bytes) -> Plan:
        request = pb.PutRequest(key=key, value=value, request_id=self.new_request_id())
        return (yield from self.write([key], "Put", request))

    def compare_and_set(self, key: bytes, value: bytes, expected_revision: int) -> Plan:
        request = pb.CompareAndSetRequest(
            key=key, value=value, expected_revision=expected_revision, request_id=self.new_request_id()
        )
        return (yield from self.write([key], "CompareAndSet", request))

    def get(
        self, key: bytes, consistency: ReadConsistency | None = None, session: dict[int, int] | None = None
    ) -> Plan:
        request = pb.GetRequest(key=key)
        return (yield from self.read([key], None, "Get", request, consistency or self.consistency, session))

    def multi_put(
        self,
        items: list[tuple[bytes, bytes]],
        atomic: bool = True,
        request_id: bytes = b"",
        retry: bool = False,
    ) -> Plan:
        """Atomic: one shard, one Raft entry (else CrossShardWrite), within the request limits (else
        InvalidArgument). Non-atomic: one write per shard, or several if a shard's part exceeds
        `max_batch_keys` or `max_request_bytes`. `request_id`, `retry`: a router passes its caller's on."""
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
            return (yield from self.write([], "MultiPut", request))
        by_key = dict(items)

        def part(routed: Routed, keys: list[bytes]) -> Plan:
            whole = len(keys) == len(items)
            sub_id = sub_request_id(request_id, routed.shard, keys, whole)
            request = multi_put_request(items if whole else [(k, by_key[k]) for k in keys], sub_id)
            request.retry = retry
            return self.write(keys, "MultiPut", request, split=not atomic, routed=routed)

        keys = [k for k, _ in items]
        responses = yield from self._per_shard(keys, atomic, part, chunked=not atomic, values=by_key)
        return combine_headers(pb.MultiPutResponse(), responses)

    def delete(
        self, keys: list[bytes], atomic: bool = True, request_id: bytes = b"", retry: bool = False
    ) -> Plan:
        request_id = request_id or self.new_request_id()
        if atomic:
            check_one_request(self.limits, len(keys), sum(map(len, keys)), "an atomic delete")
        if self.router:
            request = pb.DeleteRequest(keys=keys, request_id=request_id, non_atomic=not atomic, retry=retry)
            return (yield from self.write([], "Delete", request))

        def part(routed: Routed, group: list[bytes]) -> Plan:
            sub_id = sub_request_id(request_id, routed.shard, group, len(group) == len(keys))
            request = pb.DeleteRequest(keys=group, request_id=sub_id, retry=retry)
            return self.write(group, "Delete", request, split=not atomic, routed=routed)

        responses = yield from self._per_shard(keys, atomic, part, chunked=not atomic)
        combined = combine_headers(pb.DeleteResponse(), responses)
        combined.deleted = sum(r.deleted for r in responses)
        return combined

    def _per_shard(
        self,
        keys: list[bytes],
        atomic: bool,
        part: Callable[[Routed, list[bytes]], Plan],
        writes: bool = True,
        chunked: bool = False,
        values: dict[bytes, bytes] | None = None,
    ) -> Plan:
        """Run `part` once per shard's group of keys, concurrently, and wait for every part. A part
        whose keys turn out to span shards under a refreshed map is regrouped and run again (only
        its keys). If a part fails, a write is reported as failed only if no part may have applied.

        `chunked` (non-atomic operations): a group beyond one request's limits (its keys and their
        `values`) is split into several parts."""
        yield from self._ensure_map()
        remaining, responses = list(keys), []
        for _ in range(MAX_REGROUPS):
            epoch = self.cluster_map.epoch
            groups = self.cluster_map.ring.shards_for(remaining)
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
        consistency: ReadConsistency | None = None,
        session: dict[int, int] | None = None,
    ) -> Plan:
        """One response per shard read (the caller merges them: `combine_multi_get`, or a dict)."""
        level = consistency or self.consistency
        if self.router:
            request = pb.MultiGetRequest(keys=keys)
            return [(yield from self.read(None, None, "MultiGet", request, level, session))]

        def part(routed: Routed, group: list[bytes]) -> Plan:
            request = pb.MultiGetRequest(keys=group)
            return self.read(group, None, "MultiGet", request, level, session, routed)

        return (yield from self._per_shard(keys, False, part, writes=False, chunked=True))

    def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | None = None,
        session: dict[int, int] | None = None,
    ) -> Plan:
        """Keys in order across every shard. The continuation is the last key returned, so it
        stays valid when the cluster map changes between pages."""
        level = consistency or self.consistency
        if limit <= 0:
            raise errors.InvalidArgument(f"scan limit must be positive (got {limit})")

        def request() -> pb.ScanRequest:
            return pb.ScanRequest(start=start, end=end, prefix=prefix, limit=limit, continuation=continuation)

        if self.router:
            return (yield from self.read(None, None, "Scan", request(), level, session))
        cluster_map = yield from self._ensure_map()
        plans = [self.read(None, s.id, "Scan", request(), level, session) for s in cluster_map.shards]
        responses = yield Parallel(plans)
        merged = list(heapq.merge(*(r.kvs for r in responses), key=lambda kv: kv.key))
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
        combined.continuation = page[-1].key if more and page else b""
        return combined

    # ----- one KV request message (`Client.send`: the router, tools that want the headers) --------

    def send(self, request: Any) -> Plan:
        """The plan for one KV request message, run as this client runs its own operations
        (routing, splitting by shard, retries). The request's fields stand: its request id and
        `retry` flag (assigned if empty), `non_atomic`, its read options (a read without session
        tokens uses this client's). The answer is the one response message a node gives: a split
        operation's parts merged under one header (per-shard revisions in `header.revisions`)."""
        if isinstance(request, pb.PutRequest):
            return (yield from self.write([request.key], "Put", request))
        if isinstance(request, pb.CompareAndSetRequest):
            return (yield from self.write([request.key], "CompareAndSet", request))
        if isinstance(request, pb.MultiPutRequest):
            if len(request.keys) != len(request.values):
                raise errors.InvalidArgument(
                    f"{len(request.keys)} keys but {len(request.values)} values: they must pair up"
                )
            items = list(zip(request.keys, request.values, strict=True))
            atomic = not request.non_atomic
            return (yield from self.multi_put(items, atomic, request.request_id, request.retry))
        if isinstance(request, pb.DeleteRequest):
            keys = list(request.keys)
            return (yield from self.delete(keys, not request.non_atomic, request.request_id, request.retry))
        if not isinstance(request, pb.GetRequest | pb.MultiGetRequest | pb.ScanRequest):
            raise TypeError(f"not a KV request message: {type(request).__name__}")
        level = ReadConsistency(request.read.consistency, request.read.max_staleness_seconds)
        session = dict(request.read.session) or None
        if isinstance(request, pb.GetRequest):
            return (yield from self.get(request.key, level, session))
        if isinstance(request, pb.MultiGetRequest):
            keys = list(request.keys)
            return combine_multi_get(keys, (yield from self.multi_get(keys, level, session)))
        plan = self.scan(
            start=request.start,
            end=request.end,
            prefix=request.prefix,
            limit=request.limit,
            continuation=request.continuation,
            consistency=level,
            session=session,
        )
        return (yield from plan)
