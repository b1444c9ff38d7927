"""The sans-I/O protocol between the client core and its two front doors (sync and async).

The core writes each operation as a generator ("plan") that yields what it needs done and gets the
outcome sent back:
- `Call`     one unary RPC; the runner sends back the response, or throws the `KvError` it raised;
- `Sleep`    a back-off pause;
- `Parallel` several sub-plans at once (one per shard); the runner sends back their results in
             order, or throws the first error.
The plan's return value is the operation's result. Retries, redirects, map refreshes and
consistency all live in the plans, so `Client` and `AsyncClient` cannot drift apart: they only
differ in how they perform a `Call`, a `Sleep` and a `Parallel` (see sync.py and aio.py).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from kvstore import errors


@dataclass
class Call:
    address: str
    service: str  # "KV" or "Admin"
    method: str  # e.g. "Put"
    request: Message
    timeout: float
    # ("kvstore-cluster-id", id) once the client knows its cluster's id (errors.CLUSTER_ID_KEY)
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass
class Sleep:
    seconds: float


@dataclass
class Parallel:
    plans: list[Plan]


Step = Call | Sleep | Parallel
Plan = Generator[Step, Any, Any]


def drive(plan: Plan, perform: Callable[[Step], Any]) -> Any:
    """Run `plan` to its result, blocking: `perform` does each step and returns its outcome or
    raises the `KvError` the plan is then thrown (the sync client; tests with scripted steps)."""
    try:
        step = next(plan)
        while True:
            try:
                outcome = perform(step)
            except errors.KvError as err:
                step = plan.throw(err)
            else:
                step = plan.send(outcome)
    except StopIteration as done:
        return done.value
