"""`Client`: the blocking front door. Runs the core's plans with grpc's synchronous channels."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from kvstore import errors
from kvstore.client import factory, results
from kvstore.client.core import ClientCore, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.plans import Call, Parallel, Plan, Sleep, drive
from kvstore.client.retry import RetryPolicy
from kvstore.client.transport import CHANNEL_OPTIONS, STUBS


class Client:
    """Blocking kvstore client. Same API and behaviour as `AsyncClient` (both run `ClientCore`).

    Client(["127.0.0.1:7001", ...])        smart client, map fetched from any seed
    Client.from_cluster(".kvstore/demo")    smart client, map read from a local cluster directory
    Client(router="127.0.0.1:7400")         thin client through a router

    `timeout` bounds each call, retries included; `retry` (a `RetryPolicy`) says how it retries
    (attempts, back-off, deadline). The default retries what is safe to retry until the timeout.
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        router: str | None = None,
        consistency: ReadConsistency = Consistency.STRONG,
        read_policy: ReadPolicy = ReadPolicy.LEADER,
        session: str | None = None,
        timeout: float = 10.0,
        zone: str = "",
        retry: RetryPolicy | None = None,
        _core: ClientCore | None = None,
    ) -> None:
        self.core = _core or factory.make_core(
            endpoints, router, None, consistency, read_policy, session, timeout, zone, retry
        )
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_cluster(cls, directory: str | Path, **kwargs: Any) -> Client:
        core = factory.core_from_cluster(directory, kwargs)
        return cls(_core=core, **kwargs)

    # ----- running plans ---------------------------------------------------------------------

    def _run(self, plan: Plan) -> Any:
        return drive(plan, self._perform)

    def _perform(self, step: Any) -> Any:
        if isinstance(step, Call):
            stub = self._stub(step.address, step.service)
            try:
                return getattr(stub, step.method)(step.request, timeout=step.timeout)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc) from None
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Parallel):
            if len(step.plans) == 1:
                return [self._run(step.plans[0])]
            futures = [self._executor().submit(self._run, p) for p in step.plans]
            return [f.result() for f in futures]
        raise TypeError(f"unknown plan step {step!r}")

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvstore-client")
            return self._pool

    def _stub(self, address: str, service: str) -> Any:
        key = (address, service)
        stub = self._stubs.get(key)
        if stub is None:
            with self._lock:
                channel = self._channels.get(address)
                if channel is None:
                    channel = self._channels[address] = grpc.insecure_channel(
                        address, options=CHANNEL_OPTIONS
                    )
                stub = self._stubs[key] = STUBS[service](channel)
        return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the API (keep in step with aio.AsyncClient) ------------------------------------------

    def put(self, key: bytes, value: bytes) -> int:
        """Write `value`; returns the write's revision. Raises UnknownOutcome if it may or may not apply."""
        return self._run(self.core.put(key, value)).header.revision

    def get(self, key: bytes, *, consistency: ReadConsistency | None = None) -> bytes | None:
        return results.get_result(self._run(self.core.get(key, consistency)))

    def get_item(self, key: bytes, *, consistency: ReadConsistency | None = None) -> results.Item | None:
        return results.get_item_result(self._run(self.core.get(key, consistency)))

    def delete(self, key: bytes) -> bool:
        return self._run(self.core.delete([key])).deleted == 1

    def delete_many(self, keys: list[bytes], *, atomic: bool = True) -> int:
        return self._run(self.core.delete(list(keys), atomic)).deleted

    def compare_and_set(self, key: bytes, value: bytes, *, expected_revision: int) -> results.CasResult:
        return results.cas_result(self._run(self.core.compare_and_set(key, value, expected_revision)))

    def multi_put(self, items: Mapping[bytes, bytes] | list[tuple[bytes, bytes]]) -> int:
        """Atomic write of keys on one shard (use a shared {hash tag}); returns its revision."""
        return self._run(self.core.multi_put(results.as_items(items), atomic=True)).header.revision

    def put_many(
        self, items: Mapping[bytes, bytes] | list[tuple[bytes, bytes]], *, atomic: bool = False
    ) -> dict[int, int]:
        """Write keys that may span shards: atomic per shard only. Returns {shard: revision}."""
        return results.revisions(self._run(self.core.multi_put(results.as_items(items), atomic=atomic)))

    def multi_get(
        self, keys: list[bytes], *, consistency: ReadConsistency | None = None
    ) -> dict[bytes, bytes]:
        keys = list(keys)
        return results.multi_get_result(keys, self._run(self.core.multi_get(keys, consistency)))

    def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | None = None,
    ) -> results.ScanPage:
        plan = self.core.scan(
            start=start,
            end=end,
            prefix=prefix,
            limit=limit,
            continuation=continuation,
            consistency=consistency,
        )
        return results.scan_result(self._run(plan))

    def send(self, request: Message) -> Message:
        """Send one KV request message (a `kvstore.proto.kvstore_pb2` PutRequest, GetRequest,
        MultiPutRequest, MultiGetRequest, DeleteRequest, CompareAndSetRequest or ScanRequest)
        the way this client sends its own calls (routing, split by shard, retries), and return the
        response message with its header: for proxies (the router) and tools that need revisions
        the typed methods do not return (`ClientCore.send` says which request fields count)."""
        return self._run(self.core.send(request))

    def session_token(self) -> str:
        return self.core.session_token()

    def cluster_map(self) -> Any:
        return self._run(self.core.refresh_map())
