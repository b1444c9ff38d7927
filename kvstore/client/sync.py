"""`Client`: the blocking front door. Runs the core's plans with grpc's synchronous channels."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from kvstore import errors
from kvstore.client import arguments as check
from kvstore.client import factory, results
from kvstore.client.core import ClientCore, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.plans import Call, Parallel, Plan, Sleep, drive
from kvstore.client.results import CasResult, Item, Items, ScanPage
from kvstore.client.retry import RetryPolicy
from kvstore.client.transport import STUBS
from kvstore.config import Limits
from kvstore.routing.cluster_map import ClusterMap


class Client:
    """Blocking kvstore client. Same API and behaviour as `AsyncClient` (both run `ClientCore`).

    Where the cluster is, exactly one of (anything else: `InvalidArgument`):
        Client(["127.0.0.1:7000", ...])       smart client: nodes' client (gRPC) addresses as seeds
        Client.from_cluster(".kvstore/demo")  smart client, map read from a local cluster directory
        Client(router="127.0.0.1:7400")       thin client through a router (no read_policy, zone)

    `consistency` (a `Consistency` level or its name: "strong", "session", "eventual",
    "bounded:0.5s") is the default of every read; `read_policy` and `zone` choose replicas;
    `session` is a token from another client's `session_token()`. `timeout` (seconds) bounds each
    call, retries included; every method also takes its own `timeout=`. `retry` (a `RetryPolicy`)
    says how it retries; the default retries what is safe to retry until the timeout. `limits`:
    the nodes' `[limits]` if the cluster changed them (sizes are checked against them before
    sending; `from_cluster` reads them from the directory's node configs).

    Every argument is checked before anything is sent (`errors.InvalidArgument`). Safe to share
    between threads (one per process is the intent: it keeps one channel per node). After
    `close()` (or the `with` block) every call raises `errors.ClientClosed`.
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        router: str | None = None,
        consistency: ReadConsistency | str = Consistency.STRONG,
        read_policy: ReadPolicy | str = ReadPolicy.LEADER,
        session: str | None = None,
        timeout: float = factory.DEFAULT_TIMEOUT,
        zone: str = "",
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        _core: ClientCore | None = None,
    ) -> None:
        if _core is not None and (endpoints is not None or router is not None):
            raise errors.InvalidArgument(factory.WHERE)
        self.core = _core or factory.make_core(
            endpoints, router, None, consistency, read_policy, session, timeout, zone, retry, limits
        )
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def from_cluster(cls, directory: str | Path, **kwargs: Any) -> Client:
        """A smart client for the local cluster in `directory` (what `kvstore cluster up --dir`
        made): the map, and so every node's client address, is read from its cluster.json.
        `kwargs`: the constructor's options (not `endpoints` or `router`)."""
        core = factory.core_from_cluster(directory, kwargs)
        return cls(_core=core, **kwargs)

    # ----- running plans ---------------------------------------------------------------------

    def _run(self, plan: Plan) -> Any:
        if self._closed:
            plan.close()
            raise errors.ClientClosed("the client is closed: nothing was sent")
        return drive(plan, self._perform)

    def _perform(self, step: Any) -> Any:
        if isinstance(step, Call):
            stub = self._stub(step.address, step.service)
            try:
                return getattr(stub, step.method)(
                    step.request, timeout=step.timeout, metadata=step.metadata or None
                )
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
            if self._closed:
                raise errors.ClientClosed("the client was closed during the call; a write may still apply")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvstore-client")
            return self._pool

    def _stub(self, address: str, service: str) -> Any:
        key = (address, service)
        stub = self._stubs.get(key)
        if stub is None or self._closed:
            with self._lock:
                if self._closed:
                    raise errors.ClientClosed(
                        "the client was closed during the call; a write may still apply"
                    )
                channel = self._channels.get(address)
                if channel is None:
                    channel = self._channels[address] = grpc.insecure_channel(
                        address, options=self.core.limits.grpc_options()
                    )
                stub = self._stubs[key] = STUBS[service](channel)
        return stub

    def close(self) -> None:
        """Close the channels. Calls in other threads fail with `ClientClosed` (a write among them
        may or may not apply); every later call raises it, unsent. Closing is final; closing
        twice is harmless."""
        with self._lock:
            self._closed = True
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

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> int:
        """Write `value` under `key`; return the write's revision (its shard's Raft log index).

        Retried under one request id until applied, refused, or `timeout` (seconds; None: the
        client's) runs out: it applies at most once. Raises `UnknownOutcome` when it may or may
        not have applied (read the key back, or write again: a put is idempotent)."""
        return self._run(self.core.put(key, value, timeout)).header.revision

    def get(
        self, key: bytes, *, consistency: ReadConsistency | str | None = None, timeout: float | None = None
    ) -> bytes | None:
        """The value of `key`, or None if it does not exist. `consistency`: this read's level (a
        `Consistency` level or its name; None: the client's); `timeout` in seconds (None: the
        client's). Raises `Timeout` if no replica answered in time."""
        return results.get_result(self._run(self.core.get(key, consistency, timeout=timeout)))

    def get_item(
        self, key: bytes, *, consistency: ReadConsistency | str | None = None, timeout: float | None = None
    ) -> Item | None:
        """`key` with its value and revision (what `compare_and_set` expects), or None if it
        does not exist. Arguments as for `get`."""
        return results.get_item_result(self._run(self.core.get(key, consistency, timeout=timeout)))

    def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Delete `key`; True if it existed. Retried as `put` is (at most once; `UnknownOutcome`
        when it may or may not have applied)."""
        return self._run(self.core.delete([key], timeout=timeout)).deleted == 1

    def delete_many(self, keys: list[bytes], *, atomic: bool, timeout: float | None = None) -> int:
        """Delete `keys`; return how many existed. `atomic` must be said: True, one Raft entry on
        one shard (keys that span shards raise `CrossShardWrite`: give them a shared {hash tag});
        False, one write per shard (and per request's limits), each atomic on its own. A failure
        after some part applied raises `UnknownOutcome` (retry: each part applies at most once)."""
        return self._run(self.core.delete(keys, atomic, timeout=timeout)).deleted

    def compare_and_set(
        self, key: bytes, value: bytes, *, expected_revision: int, timeout: float | None = None
    ) -> CasResult:
        """Write `value` only if `key`'s revision is `expected_revision` (0: only if it does not
        exist). Returns a `CasResult`: `succeeded`; on success `revision` (the write's); on
        failure `revision` is None and `current` is what the key holds now (None: absent), whose
        `current_revision` to retry against. Retried as `put` is."""
        return results.cas_result(
            self._run(self.core.compare_and_set(key, value, expected_revision, timeout))
        )

    def multi_put(self, items: Items, *, timeout: float | None = None) -> int:
        """Write all `items` (a mapping, or (key, value) pairs) atomically: one Raft entry, so
        the keys must share a shard (a shared {hash tag}, else `CrossShardWrite`) and fit one
        request's limits. Returns its revision (every key gets it)."""
        return self._run(self.core.multi_put(items, atomic=True, timeout=timeout)).header.revision

    def put_many(self, items: Items, *, atomic: bool, timeout: float | None = None) -> dict[int, int]:
        """Write `items` (a mapping, or (key, value) pairs) that may span shards. `atomic` must
        be said: True, as `multi_put` (one shard, one entry); False, one write per shard (and per
        request's limits), each atomic on its own. Returns {shard: revision} for each shard
        written. A failure after some part applied raises `UnknownOutcome` (retry: each part
        applies at most once)."""
        return results.revisions(self._run(self.core.multi_put(items, atomic=atomic, timeout=timeout)))

    def multi_get(
        self,
        keys: list[bytes],
        *,
        consistency: ReadConsistency | str | None = None,
        timeout: float | None = None,
    ) -> dict[bytes, bytes]:
        """The values of the `keys` that exist, {key: value} in the order asked (keys may span
        shards: read from each in parallel). Arguments as for `get`."""
        keys = check.keys(keys, self.core.limits)
        return results.multi_get_result(
            keys, self._run(self.core.multi_get(keys, consistency, timeout=timeout))
        )

    def scan(
        self,
        *,
        start: bytes = b"",
        end: bytes = b"",
        prefix: bytes = b"",
        limit: int = 1000,
        continuation: bytes = b"",
        consistency: ReadConsistency | str | None = None,
        timeout: float | None = None,
    ) -> ScanPage:
        """One page of keys in key order across every shard: those from `start` (inclusive) to
        `end` (exclusive; b"": no end) that begin with `prefix`, at most `limit` (1 to 10,000).
        The page's `continuation` (b"" on the last page) passed back as `continuation=` gives
        the next page. Arguments as for `get`."""
        plan = self.core.scan(
            start=start,
            end=end,
            prefix=prefix,
            limit=limit,
            continuation=continuation,
            consistency=consistency,
            timeout=timeout,
        )
        return results.scan_result(self._run(plan))

    def send(self, request: Message, *, timeout: float | None = None) -> Message:
        """Send one KV request message (a `kvstore.proto.kvstore_pb2` PutRequest, GetRequest,
        MultiPutRequest, MultiGetRequest, DeleteRequest, CompareAndSetRequest or ScanRequest)
        the way this client sends its own calls (routing, split by shard, retries), and return the
        response message with its header: for proxies (the router) and tools that need revisions
        the typed methods do not return (`ClientCore.send` says which request fields count)."""
        return self._run(self.core.send(request, timeout))

    def session_token(self) -> str:
        """This client's session token: the revisions it has written or read, per shard. Give it
        to another client (`Client(..., session=token, consistency="session")`) and that client
        reads at least what this one wrote. Local: nothing is sent."""
        return self.core.session_token()

    def cluster_map(self, *, timeout: float | None = None) -> ClusterMap:
        """The cluster map (shards, their replicas' addresses, the map's epoch), fetched afresh
        from the nodes (the newest a node holds; the one this client has if none answers)."""
        return self._run(self.core.refresh_map(deadline=self.core.deadline(check.timeout(timeout))))
