"""Timestamps along a write's path, for `loadtests/trace_put.py` (development only).

Python imports `sitecustomize` at start from the path; trace_put.py puts this directory on the
PYTHONPATH of the nodes it starts and sets KVSTORE_TRACE_DIR. Each process then appends
`<monotonic ns> <pid> <event>` lines to `<dir>/<pid>.log`. CLOCK_MONOTONIC is one clock for every
process on a host, so the lines of the client and the three replicas merge into one timeline.
Without KVSTORE_TRACE_DIR this module does nothing."""

from __future__ import annotations

import os
import time
from typing import Any

_DIR = os.environ.get("KVSTORE_TRACE_DIR")


def _install(directory: str) -> None:
    import pysyncobj.transport as pysyncobj_transport

    from kvstore.replication import freshness, shard, state_machine
    from kvstore.server import node

    out = open(os.path.join(directory, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    pid = os.getpid()

    def event(name: str) -> None:
        out.write(f"{time.monotonic_ns()} {pid} {name}\n")

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.monotonic_ns()
        result = fn(*args)
        took = time.monotonic_ns() - start
        if took > 20_000:  # a no-op (nothing to sync or apply) is not an event
            event(f"{name} {took / 1e6:.3f}")
        return result

    handler = node.KVServicer.Put

    async def traced_handler(self: Any, *args: Any) -> Any:
        event("handler")
        return await handler(self, *args)

    node.KVServicer.Put = traced_handler  # type: ignore[method-assign]
    write = node.KVServicer._write

    async def traced_write(self: Any, *args: Any) -> Any:
        event("put.start")
        result = await write(self, *args)
        event("put.end")
        return result

    node.KVServicer._write = traced_write  # type: ignore[method-assign]

    flush, deliver = shard.Shard._flush, shard.Shard._deliver
    shard.Shard._flush = lambda self: (event("flush"), flush(self))[1]  # type: ignore[method-assign]
    shard.Shard._deliver = lambda self, c, i: (event("deliver"), deliver(self, c, i))[1]  # type: ignore[method-assign]

    send = freshness.FreshnessStampingTransport.send

    def traced_send(self: Any, to: Any, message: Any) -> Any:
        event(f"send {message.get('type') if isinstance(message, dict) else '?'}")
        return send(self, to, message)

    freshness.FreshnessStampingTransport.send = traced_send  # type: ignore[method-assign]

    received = pysyncobj_transport.Transport._onMessageReceived

    def traced_received(self: Any, frm: Any, message: Any) -> Any:
        event(f"recv {message.get('type') if isinstance(message, dict) else '?'}")
        return received(self, frm, message)

    pysyncobj_transport.Transport._onMessageReceived = traced_received  # type: ignore[method-assign]

    machine = state_machine.ShardStateMachine
    tick, sync, apply = machine._onTick, machine._sync_log, machine._SyncObj__applyLogEntries

    def traced_tick(self: Any, *args: Any) -> Any:
        event("tick")
        return tick(self, *args)

    def traced_apply(self: Any) -> Any:
        if self.raftCommitIndex > self.raftLastApplied:
            event("apply.start")
        return timed("apply", apply, self)

    machine._onTick = traced_tick  # type: ignore[method-assign]
    machine._sync_log = lambda self: timed("sync", sync, self)  # type: ignore[method-assign]
    machine._SyncObj__applyLogEntries = traced_apply  # type: ignore[attr-defined]

    import builtins

    builtins.kvstore_trace_event = event  # type: ignore[attr-defined]  # for the driver's own lines


if _DIR:
    _install(_DIR)
