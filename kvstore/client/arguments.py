"""The SDK's argument checks: every argument of a public call is checked here before anything is
sent, and a wrong one raises `errors.InvalidArgument` naming the argument and what it may be.

Both front doors reach these through the core's operations (core.py), so they refuse the same
things with the same words. Sizes are checked against the client's `Limits` (the nodes' defaults
unless the client was given others): what a node would refuse anyway, refused without a round
trip. Checks of many keys run in C (`map`, `set`); the per-key loop only runs to name a culprit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from kvstore.config import Limits
from kvstore.consistency import Consistency, ReadConsistency
from kvstore.errors import InvalidArgument

# The wire's revision fields are uint64, but a revision is a Raft log index: far below 2**63.
MAX_REVISION = 2**63 - 1


def _kind(value: Any) -> str:
    return type(value).__name__


def key(value: Any, limits: Limits, what: str = "key") -> bytes:
    if type(value) is not bytes:
        hint = " (encode it, e.g. 'name'.encode())" if isinstance(value, str) else ""
        raise InvalidArgument(f"{what} must be bytes, not {_kind(value)}{hint}")
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > limits.max_key_bytes:
        raise InvalidArgument(f"{what} is {len(value)} bytes; the limit is {limits.max_key_bytes}")
    return value


def value(data: Any, limits: Limits) -> bytes:
    if type(data) is not bytes:
        hint = " (encode it, e.g. 'text'.encode())" if isinstance(data, str) else ""
        raise InvalidArgument(f"value must be bytes, not {_kind(data)}{hint}")
    if len(data) > limits.max_value_bytes:
        raise InvalidArgument(f"value is {len(data)} bytes; the limit is {limits.max_value_bytes}")
    return data


def keys(values: Any, limits: Limits, unique: bool = False) -> list[bytes]:
    """A list of keys (any iterable of bytes; none at all is allowed: nothing to do). `unique`:
    a write's keys, each named once (a node refuses a write that names a key twice)."""
    if isinstance(values, bytes | str) or not isinstance(values, Iterable):
        raise InvalidArgument(f"keys must be a list of bytes, not {_kind(values)}")
    listed = list(values)
    if set(map(type, listed)) - {bytes}:
        for k in listed:
            key(k, limits)
    lengths = list(map(len, listed))
    if lengths and (min(lengths) == 0 or max(lengths) > limits.max_key_bytes):
        for k in listed:
            key(k, limits)
    if unique and len(set(listed)) != len(listed):
        raise InvalidArgument("the same key appears twice in one write")
    return listed


def items(pairs: Any, limits: Limits) -> list[tuple[bytes, bytes]]:
    """Key/value pairs: a mapping, or a list of (key, value) pairs with no key twice."""
    if isinstance(pairs, Mapping):
        listed = list(pairs.items())
    elif isinstance(pairs, bytes | str) or not isinstance(pairs, Iterable):
        raise InvalidArgument(f"items must be a mapping or a list of (key, value) pairs, not {_kind(pairs)}")
    else:
        listed = list(pairs)
        if set(map(type, listed)) - {tuple} or set(map(len, listed)) - {2}:
            raise InvalidArgument("items must be a mapping or a list of (key, value) pairs")
    if not listed:
        return listed
    keys([k for k, _ in listed], limits, unique=True)
    values = [v for _, v in listed]
    if set(map(type, values)) - {bytes} or max(map(len, values)) > limits.max_value_bytes:
        for v in values:
            value(v, limits)
    return listed


def revision(expected: Any) -> int:
    if type(expected) is not int:
        raise InvalidArgument(f"expected_revision must be an int, not {_kind(expected)}")
    if not 0 <= expected <= MAX_REVISION:
        raise InvalidArgument(
            f"expected_revision must be 0 (the key must not exist) or a revision the key had, not {expected}"
        )
    return expected


def flag(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise InvalidArgument(f"{name} must be True or False, not {value!r}")
    return value


def scan_limit(limit: Any, limits: Limits) -> int:
    if type(limit) is not int:
        raise InvalidArgument(f"scan limit must be an int, not {_kind(limit)}")
    if not 1 <= limit <= limits.max_scan_limit:
        raise InvalidArgument(f"scan limit must be between 1 and {limits.max_scan_limit} (got {limit})")
    return limit


def scan_bound(value: Any, name: str) -> bytes:
    if type(value) is not bytes:
        raise InvalidArgument(f"scan {name} must be bytes, not {_kind(value)}")
    return value


def timeout(seconds: Any, name: str = "timeout") -> float | None:
    """None (the client's), or a positive, finite number of seconds."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise InvalidArgument(f"{name} must be a positive number of seconds, not {seconds!r}")
    if seconds <= 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, not {seconds!r}")
    return float(seconds)


def consistency(level: Any) -> ReadConsistency | None:
    """None (the client's), a `ReadConsistency` (`Consistency.STRONG`, `Consistency.bounded(0.5)`),
    or its name ('strong', 'session', 'eventual', 'bounded:0.5s')."""
    if level is None:
        return None
    try:
        return Consistency.coerce(level)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(str(exc)) from None


def endpoints(value: Any) -> list[str]:
    """Seed addresses, 'host:port' (a node's client, gRPC, port), one string or a list of them."""
    listed = [value] if isinstance(value, str) else value
    if isinstance(listed, bytes) or not isinstance(listed, Iterable):
        raise InvalidArgument(f"endpoints must be 'host:port' strings, not {_kind(value)}")
    listed = list(listed)
    for address in listed:
        if not isinstance(address, str):
            raise InvalidArgument(f"an endpoint must be a 'host:port' string, not {_kind(address)}")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"endpoint {address!r} is not 'host:port' (e.g. '127.0.0.1:7000')")
    return listed
