"""Multi-key operations split by shard: cutting a shard's group of keys into requests within the
limits, naming each part's request id, running the parts so that none is abandoned, and merging
their answers into one response."""

from __future__ import annotations

import hashlib
from typing import Any

from kvstore import errors
from kvstore.client.plans import Plan
from kvstore.client.retry import RetryPolicy
from kvstore.config import Limits
from kvstore.proto import kvstore_pb2 as pb


def check_one_request(limits: Limits, keys: int, size: int, what: str) -> None:
    if keys > limits.max_batch_keys or size > limits.max_request_bytes:
        raise errors.InvalidArgument(
            f"{what} of {keys} keys and {size} bytes exceeds one request's limits "
            f"({limits.max_batch_keys} keys, {limits.max_request_bytes} bytes of keys and values): "
            "split it, or use put_many/delete_many with atomic=False"
        )


def cut_to_limits(keys: list[bytes], values: dict[bytes, bytes] | None, limits: Limits) -> list[list[bytes]]:
    """`keys` cut into runs within one request's limits (count, and bytes of keys and values)."""
    if len(keys) <= limits.max_batch_keys:
        total = sum(map(len, keys))
        if values is not None:
            total += sum(map(len, map(values.__getitem__, keys)))
        if total <= limits.max_request_bytes:
            return [keys]  # the usual case: one part, sized in C, no per-key Python
    runs: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for key in keys:
        key_size = len(key) + (len(values[key]) if values is not None else 0)
        if current and (len(current) >= limits.max_batch_keys or size + key_size > limits.max_request_bytes):
            runs.append(current)
            current, size = [], 0
        current.append(key)
        size += key_size
    runs.append(current)
    return runs


def within_budget(page: list[Any], budget: int) -> list[Any]:
    """The longest prefix of a scan page whose keys and values fit `budget` (at least one)."""
    size = 0
    for i, kv in enumerate(page):
        size += len(kv.key) + len(kv.value)
        if size > budget and i:
            return page[:i]
    return page


def combine_headers(target: Any, responses: list[Any]) -> Any:
    """One response header for a multi-shard answer: per-shard revisions in `revisions`."""
    for response in responses:
        header = response.header
        target.header.revisions[header.shard] = max(
            header.revision, target.header.revisions.get(header.shard, 0)
        )
        target.header.epoch = max(target.header.epoch, header.epoch)
        for shard, revision in header.revisions.items():
            target.header.revisions[shard] = max(revision, target.header.revisions.get(shard, 0))
    if len(responses) == 1:
        target.header.CopyFrom(responses[0].header)
    return target


def combine_multi_get(keys: list[bytes], responses: list[pb.MultiGetResponse]) -> pb.MultiGetResponse:
    """One MultiGetResponse with the found keys in request order, from one response per shard
    (what `Client.send` answers for a MultiGetRequest, and so the router)."""
    if len(responses) == 1:
        return responses[0]
    found = {k: (v, rev) for r in responses for k, v, rev in zip(r.keys, r.values, r.revisions, strict=True)}
    ordered = [k for k in keys if k in found]
    combined = combine_headers(pb.MultiGetResponse(), responses)
    combined.keys.extend(ordered)
    combined.values.extend(found[k][0] for k in ordered)
    combined.revisions.extend(found[k][1] for k in ordered)
    return combined


def multi_put_request(items: list[tuple[bytes, bytes]], request_id: bytes) -> pb.MultiPutRequest:
    return pb.MultiPutRequest(keys=[k for k, _ in items], values=[v for _, v in items], request_id=request_id)


def sub_request_id(request_id: bytes, shard: int, keys: list[bytes], whole: bool) -> bytes:
    """The id of one shard's part of a split write: the whole write's client id and sequence, and
    8 bytes derived from the shard and the part's keys. Deterministic, so a retry of the whole
    (also one through the router, which splits it) is deduplicated part by part, while a part
    regrouped under a new map (other keys) is not mistaken for an earlier one."""
    if whole:
        return request_id
    digest = hashlib.blake2b(request_id + shard.to_bytes(8, "big"), digest_size=8)
    for key in sorted(keys):
        digest.update(len(key).to_bytes(4, "big") + key)
    return request_id[:24] + digest.digest()


class MapChanged(Exception):
    """A part of a split operation spans shards under a refreshed map: regroup its keys."""


REGROUP = object()
MAX_REGROUPS = 5  # map changes one split operation follows before it gives up


def outcome_of(plan: Plan) -> Plan:
    """Run a part of a split operation, returning its error instead of raising it, so that the
    other parts are waited for and a partial write is never reported as a clean failure."""
    try:
        return (yield from plan)
    except MapChanged:
        return REGROUP
    except errors.KvError as err:
        return err


def combined_failure(
    failures: list[errors.KvError], succeeded: int, is_write: bool, policy: RetryPolicy
) -> errors.KvError:
    """The error of a split operation some of whose parts failed: for a write, UnknownOutcome if
    any part applied or may have (a partial write is never reported as a clean failure)."""
    first = failures[0]
    if not is_write:
        return first
    if succeeded or any(map(policy.may_have_applied, failures)):
        return errors.UnknownOutcome(
            f"{succeeded} shard part(s) applied, {len(failures)} failed ({first.message}): the write is "
            "partly applied; retry it to complete it (each part applies at most once per request id)"
        )
    return first
