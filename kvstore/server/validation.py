"""Request checks done before anything is proposed: a rejected request changes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvstore.config import Limits
from kvstore.consistency import ConsistencyLevel
from kvstore.errors import InvalidArgument

MAX_STALENESS_SECONDS = 3600.0
_CONSISTENCY_LEVELS = frozenset(ConsistencyLevel)  # once: every read request is checked


def check_key(key: bytes, limits: Limits) -> None:
    if not key:
        raise InvalidArgument("key must not be empty")
    if len(key) > limits.max_key_bytes:
        raise InvalidArgument(f"key is {len(key)} bytes; the limit is {limits.max_key_bytes}")


def check_value(value: bytes, limits: Limits) -> None:
    if len(value) > limits.max_value_bytes:
        raise InvalidArgument(f"value is {len(value)} bytes; the limit is {limits.max_value_bytes}")


def check_pairs(
    keys: Iterable[bytes], values: Iterable[bytes], limits: Limits
) -> tuple[list[bytes], list[bytes]]:
    """A multi-put's parallel lists: as many values as keys, each within its limit, and all of
    them together within `max_request_bytes` (one write is one Raft proposal)."""
    keys, values = list(keys), list(values)
    check_paired(keys, values)
    value_bytes = sum(map(len, values))  # in C; the per-value loop only runs to name a culprit
    keys = check_keys(keys, limits, extra_bytes=value_bytes)
    check_values(values, limits)
    return keys, values


def check_paired(keys: Sequence[bytes], values: Sequence[bytes]) -> None:
    if len(values) != len(keys):
        raise InvalidArgument(f"{len(keys)} keys but {len(values)} values: they must pair up")


def check_values(values: list[bytes], limits: Limits) -> None:
    if values and max(map(len, values)) > limits.max_value_bytes:
        for value in values:
            check_value(value, limits)  # raises with the offending size


def check_keys(keys: Iterable[bytes], limits: Limits, extra_bytes: int = 0) -> list[bytes]:
    """At least one key, at most `max_batch_keys`, each within its limit; the keys (plus
    `extra_bytes` of values) within `max_request_bytes`."""
    keys = list(keys)
    if not keys:
        raise InvalidArgument("at least one key is required")
    if len(keys) > limits.max_batch_keys:
        raise InvalidArgument(f"{len(keys)} keys in one request; the limit is {limits.max_batch_keys}")
    lengths = list(map(len, keys))  # checked in C first; the per-key loop only finds the culprit
    if min(lengths) == 0 or max(lengths) > limits.max_key_bytes:
        for key in keys:
            check_key(key, limits)
    total = sum(lengths) + extra_bytes
    if total > limits.max_request_bytes:
        raise InvalidArgument(
            f"{len(keys)} keys{' and their values' if extra_bytes else ''} are {total} bytes in one "
            f"request; the limit is {limits.max_request_bytes} (split it into several requests)"
        )
    return keys


def distinct(keys: list[bytes]) -> list[bytes]:
    """The keys without repeats, in first-seen order (a read names each key once in its answer,
    so a key named twice is read and copied once)."""
    unique = dict.fromkeys(keys)
    return keys if len(unique) == len(keys) else list(unique)


def check_unique(keys: list[bytes]) -> None:
    if len(set(keys)) != len(keys):
        raise InvalidArgument("the same key appears twice in one write")


def check_batch(ops: int, limits: Limits) -> None:
    if ops > limits.max_batch_ops:
        raise InvalidArgument(f"{ops} ops in one batch; the limit is {limits.max_batch_ops}")


def check_read(consistency: int, max_staleness: float) -> None:
    if consistency not in _CONSISTENCY_LEVELS:
        raise InvalidArgument(f"unknown consistency level {consistency}")
    if consistency == ConsistencyLevel.BOUNDED and not (0 < max_staleness <= MAX_STALENESS_SECONDS):
        raise InvalidArgument(
            f"bounded reads need 0 < max_staleness_seconds <= {MAX_STALENESS_SECONDS} (got {max_staleness})"
        )


def check_scan_limit(limit: int, limits: Limits) -> int:
    if limit == 0:
        return limits.default_scan_limit
    if limit > limits.max_scan_limit:
        raise InvalidArgument(f"scan limit {limit} exceeds {limits.max_scan_limit}")
    return limit
