"""Retries as a policy: how long and how often the SDK tries one operation, which errors it tries
again, and whether a write that failed may nevertheless have applied.

`RetryPolicy` is the configuration (`Client(..., retry=RetryPolicy(...))`); `Attempts` is one
operation's use of it (its deadline, its attempts so far, its last error). The plans in core.py
decide *where* the next attempt goes (the hinted leader, another replica, a refreshed map); this
module decides *whether* there is one and how long to wait before it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from kvstore import errors
from kvstore.client.plans import Sleep

# The longest a write is retried under one request id: the servers surely still hold its outcome
# for that long (storage.dedup_retention_seconds >= 40 s); past it, a retry could only end in
# SessionExpired.
MAX_WRITE_RETRY_SECONDS = 30.0

# Errors that ask the sender to route again (another leader, a newer map, another replica). A
# router answers them only once its own routing gave up, so to a thin client they are final.
_ROUTING_ERRORS = (errors.NotLeader, errors.WrongShard, errors.ReplicaBehind)


class Deadline(NamedTuple):
    """One operation's time, shared by all its parts (each shard's part of a split operation, the
    map fetches it needs): when it ends on the policy's clock, and the most one call may take.
    Every call's timeout and every pause is cut to what remains, so the operation as a whole ends
    by `at` (plus the time to raise), whatever its retries, parts and map refreshes."""

    at: float
    seconds: float
    rpc_timeout: float


@dataclass(frozen=True)
class RetryPolicy:
    """How the SDK retries one operation (the defaults: what is safe to retry, until the deadline).

    An attempt is one try at the target: a write's call to its shard's leader, a read's pass over
    the shard's replicas. Between attempts the plan pauses `backoff_initial * 2**n`, at most
    `backoff_max`, less a random part of up to `jitter` of it (so clients that failed together do
    not retry together). A redirect to a named leader or to a newer map is followed at once, up to
    `free_redirects` times per operation."""

    #: Most attempts per operation (None: as many as the deadline allows).
    attempts: int | None = None
    #: Seconds per operation, retries included (None: the client's `timeout`).
    deadline: float | None = None
    #: A write's deadline is at most this (see MAX_WRITE_RETRY_SECONDS).
    write_deadline: float = MAX_WRITE_RETRY_SECONDS
    backoff_initial: float = 0.02
    backoff_max: float = 0.5
    jitter: float = 0.5
    free_redirects: int = 2
    #: The monotonic clock deadlines are measured with (tests pass a fake one).
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"deadline must be positive, not {self.deadline}")
        if self.write_deadline <= 0:
            raise ValueError(f"write_deadline must be positive, not {self.write_deadline}")
        if self.backoff_initial < 0 or self.backoff_max < 0:
            raise ValueError("back-off pauses must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter is a fraction of the pause (0..1), not {self.jitter}")
        if self.free_redirects < 0:
            raise ValueError(f"free_redirects must not be negative, not {self.free_redirects}")

    @staticmethod
    def retryable(error: errors.KvError, *, through_router: bool = False) -> bool:
        """May the same request be sent again (elsewhere or later) without risk? What the error
        class says (`KvError.retryable`); through a router, a routing error is the router's final
        answer (it already followed redirects and refreshed its map)."""
        if through_router and isinstance(error, _ROUTING_ERRORS):
            return False
        return error.retryable

    @staticmethod
    def may_have_applied(error: errors.KvError) -> bool:
        """For a write that failed with `error`: may it nevertheless have applied? Yes when the
        outcome is unknown, when the server no longer holds the session of an earlier attempt
        (`SessionExpired`), and when no kvstore server said it (the transport failed: the request
        may have reached one). Every other error is a server's definite "not applied"."""
        return isinstance(error, errors.UnknownOutcome | errors.SessionExpired) or not error.from_server

    def pause(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` (0-based) failed."""
        ceiling = min(self.backoff_max, self.backoff_initial * (2**attempt))
        return random.uniform(ceiling * (1.0 - self.jitter), ceiling)

    def deadline_for(self, timeout: float | None, client_timeout: float, rpc_timeout: float) -> Deadline:
        """An operation's deadline, from now: its own `timeout` if the call gave one, else this
        policy's `deadline`, else the client's. A call's own timeout also shortens its attempts (a
        third of it, at least 0.5 s, at most `rpc_timeout`), so a short call still tries another
        replica when one does not answer."""
        if timeout is not None:
            seconds = timeout
            rpc_timeout = min(rpc_timeout, max(0.5, timeout / 3))
        else:
            seconds = self.deadline if self.deadline is not None else client_timeout
        if not (isinstance(seconds, int | float) and not isinstance(seconds, bool)) or not (
            math.isfinite(seconds) and seconds > 0
        ):
            raise errors.InvalidArgument(f"timeout must be a positive number of seconds, not {seconds!r}")
        return Deadline(self.clock() + seconds, float(seconds), rpc_timeout)

    def start(
        self,
        timeout: float,
        rpc_timeout: float,
        *,
        write: bool = False,
        deadline: Deadline | None = None,
    ) -> Attempts:
        """One operation's (or one part's) attempts. `deadline`: the operation's (`deadline_for`);
        without one, from now: `timeout` (the client's) unless this policy sets `deadline`, and
        `rpc_timeout` the most one call may take. A write's attempts end `write_deadline` after
        they start at the latest."""
        if deadline is None:
            deadline = self.deadline_for(None, timeout, rpc_timeout)
        ends = deadline.at
        if write:
            ends = min(ends, self.clock() + self.write_deadline)
        return Attempts(self, ends, deadline.seconds, deadline.rpc_timeout, write)


class Attempts:
    """One operation's attempts under a `RetryPolicy`: its deadline, how many attempts it made,
    its last error, and (for a write) whether any attempt may have applied.

    A plan calls `begin()` before each attempt, `failed(error)` after each retryable failure,
    and asks `exhausted()` before pausing (`pause()`) for the next."""

    def __init__(
        self, policy: RetryPolicy, ends: float, seconds: float, rpc_timeout: float, write: bool
    ) -> None:
        self.policy = policy
        self.seconds = seconds  # the operation's timeout (for messages)
        self.rpc_timeout = rpc_timeout
        self.write = write
        self.deadline = ends
        self.made = 0  # attempts begun
        self.last: errors.KvError | None = None
        #: A write: some attempt may have applied, so later ones must say `retry` (and a failure
        #: in the end is UnknownOutcome, never a clean one).
        self.may_have_applied = False
        self._redirects = policy.free_redirects

    def begin(self) -> None:
        """Before each attempt. Past the deadline (after a pause cut to it), no further attempt:
        the operation's error is raised (a call with no time left could only fail, and for a
        write that failure would read as "may have applied")."""
        if self.expired():
            if not self.made:  # the time went on the way (a map fetch, an earlier part)
                raise errors.Timeout(f"no time left for an attempt (timeout {self.seconds}s)")
            raise self.give_up("no attempt made")
        self.made += 1

    def expired(self) -> bool:
        return self.policy.clock() >= self.deadline

    def exhausted(self) -> bool:
        """No further attempt: the deadline passed, or the policy's attempts are used up."""
        limit = self.policy.attempts
        return self.expired() or (limit is not None and self.made >= limit)

    def call_timeout(self) -> float:
        """The timeout of the next call: one call's at most, and never past the deadline."""
        return max(0.001, min(self.rpc_timeout, self.deadline - self.policy.clock()))

    def remaining(self) -> Deadline:
        """What is left of this operation's time, for what it needs on the way (a map fetch)."""
        return Deadline(self.deadline, self.seconds, self.rpc_timeout)

    def failed(self, error: errors.KvError) -> None:
        self.last = error
        if self.write and self.policy.may_have_applied(error):
            self.may_have_applied = True

    def redirect(self) -> bool:
        """Follow a redirect at once (no pause)? While free redirects and attempts remain."""
        if self._redirects > 0 and not self.exhausted():
            self._redirects -= 1
            return True
        return False

    def pause(self) -> Sleep:
        """The back-off before the next attempt, never past the deadline."""
        remaining = max(0.0, self.deadline - self.policy.clock())
        return Sleep(min(self.policy.pause(self.made - 1), remaining))

    def give_up(self, nothing_tried: str) -> errors.KvError:
        """The operation's error once no attempt is left."""
        if self.may_have_applied:
            return errors.UnknownOutcome(f"write outcome unknown after {self.seconds}s: {self.last}")
        return self.last or errors.Unavailable(nothing_tried)
