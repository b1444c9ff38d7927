"""The adapter tests/cluster/test_sdk_doors.py runs its suite through: one test body, both doors."""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvstore import AsyncClient, Client, errors
from kvstore.cluster.local import LocalCluster

SHARDS = 2  # the suite's cluster: 2 shards x 3 replicas


class Door:
    """Calls a Client or an AsyncClient the same way: an AsyncClient's coroutines run to completion
    on this adapter's private event loop (every AsyncClient it makes lives on that one loop)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.cls: type[Client] | type[AsyncClient] = AsyncClient if kind == "async" else Client
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.made: list[Client | AsyncClient] = []

    def run(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            assert self.loop is not None
            return self.loop.run_until_complete(result)
        return result

    def make(self, *args: Any, **kwargs: Any) -> Client | AsyncClient:
        client = self.cls(*args, **kwargs)
        self.made.append(client)
        return client

    def from_cluster(self, directory: Path, **kwargs: Any) -> Client | AsyncClient:
        client = self.cls.from_cluster(directory, **kwargs)
        self.made.append(client)
        return client

    def call(self, client: Client | AsyncClient, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.run(getattr(client, method)(*args, **kwargs))

    def timed(
        self, client: Client | AsyncClient, method: str, *args: Any, **kwargs: Any
    ) -> tuple[float, Any]:
        """(seconds the call took, its result or the KvError it raised)."""
        started = time.monotonic()
        try:
            outcome: Any = self.call(client, method, *args, **kwargs)
        except errors.KvError as err:
            outcome = err
        return time.monotonic() - started, outcome

    def while_calling(
        self, client: Client | AsyncClient, method: str, args: tuple[Any, ...], after: float, action: Any
    ) -> tuple[float, Any]:
        """Start a call, run `action()` (it may return an awaitable) `after` seconds into it, and
        return (seconds the call took, its result or the KvError it raised). The call runs in a
        thread for a Client, in a task on the adapter's loop for an AsyncClient."""
        started = time.monotonic()
        if self.loop is None:
            outcome: list[Any] = []

            def call() -> None:
                try:
                    outcome.append(getattr(client, method)(*args))
                except errors.KvError as err:
                    outcome.append(err)
                outcome.append(time.monotonic() - started)

            thread = threading.Thread(target=call)
            thread.start()
            time.sleep(after)
            action()
            thread.join(30)
            assert len(outcome) == 2, "the call did not return"
            return outcome[1], outcome[0]

        async def both() -> tuple[float, Any]:
            task = asyncio.ensure_future(getattr(client, method)(*args))
            await asyncio.sleep(after)
            done = action()
            if inspect.isawaitable(done):
                await done
            try:
                result: Any = await asyncio.wait_for(task, 30)
            except errors.KvError as err:
                result = err
            return time.monotonic() - started, result

        return self.run(both())

    def close(self) -> None:
        for client in self.made:
            self.run(client.close())
        if self.loop is not None:
            self.loop.close()


class Bound:
    """One client of a door: `bound.method(...)` calls it and waits for the result."""

    def __init__(self, door: Door, client: Client | AsyncClient) -> None:
        self.door, self.client = door, client

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.door.call(self.client, method, *args, **kwargs)


def prefix(door: Door) -> str:
    return f"doors:{door.kind}:"


def key(door: Door, name: str) -> bytes:
    return (prefix(door) + name).encode()


def key_on_shard(cluster: LocalCluster, shard: int, start: str) -> bytes:
    ring = cluster.cluster_map().slots
    for i in range(10_000):
        candidate = f"{start}:{i}".encode()
        if ring.shard_for(candidate) == shard:
            return candidate
    raise AssertionError(f"no key for shard {shard}")


def keys_on_both_shards(cluster: LocalCluster, door: Door, name: str, count: int) -> list[bytes]:
    keys = [key(door, f"{name}:{i:02d}") for i in range(count)]
    assert {cluster.cluster_map().slots.shard_for(k) for k in keys} == set(range(SHARDS))
    return keys


def black_hole_addresses(count: int) -> Iterator[list[str]]:
    """Addresses that accept TCP connections and never answer (no HTTP/2 handshake)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
        yield [f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks]
    finally:
        for sock in socks:
            sock.close()
