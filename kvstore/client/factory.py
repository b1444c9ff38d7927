"""Building a `ClientCore` from the front doors' arguments (`Client(...)`, `Client.from_cluster`),
checking them first: a wrong or conflicting argument is refused with `InvalidArgument` saying
which combination is allowed, before any connection is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.client import arguments as check
from kvstore.client.core import ClientCore, ClientSettings, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.retry import RetryPolicy
from kvstore.client.session import decode_session
from kvstore.config import Limits, NodeConfig
from kvstore.routing.cluster_map import ClusterMap

DEFAULT_TIMEOUT = 10.0

# The three ways to say where the cluster is; exactly one of them.
WHERE = (
    "give exactly one of: endpoints (nodes' client addresses, 'host:port': a smart client), "
    "router='host:port' (a thin client through a router), or Client.from_cluster(directory)"
)


def make_core(
    endpoints: list[str] | str | None,
    router: str | None,
    cluster_map: ClusterMap | None,
    consistency: ReadConsistency | str,
    read_policy: ReadPolicy | str,
    session: str | None,
    timeout: float,
    zone: str,
    retry: RetryPolicy | None = None,
    limits: Limits | None = None,
) -> ClientCore:
    places = (("endpoints", endpoints), ("router", router), ("a cluster", cluster_map))
    given = [name for name, value in places if value is not None]
    if len(given) != 1:
        raise errors.InvalidArgument(f"{WHERE} (given: {', '.join(given) or 'none'})")
    seeds = check.endpoints(endpoints) if endpoints is not None else []
    if endpoints is not None and not seeds:
        raise errors.InvalidArgument(f"endpoints is empty; {WHERE}")
    if router is not None:
        check.endpoints(router)
    level = check.consistency(consistency)
    if level is None:
        raise errors.InvalidArgument("consistency must be a level (e.g. Consistency.STRONG or 'strong')")
    policy = _read_policy(read_policy)
    if not isinstance(zone, str):
        raise errors.InvalidArgument(f"zone must be a string, not {type(zone).__name__}")
    if router is not None and (policy != ReadPolicy.LEADER or zone):
        raise errors.InvalidArgument(
            "read_policy and zone choose replicas, which a smart client does; through a router "
            "the router chooses: give them with endpoints or from_cluster, not with router"
        )
    seconds = check.timeout(timeout)
    if seconds is None:
        raise errors.InvalidArgument("timeout must be a positive number of seconds, not None")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise errors.InvalidArgument(f"retry must be a RetryPolicy, not {type(retry).__name__}")
    if limits is not None and not isinstance(limits, Limits):
        raise errors.InvalidArgument(f"limits must be a kvstore.config.Limits, not {type(limits).__name__}")
    if session is not None:
        try:
            decode_session(session)
        except (ValueError, TypeError, AttributeError) as exc:
            raise errors.InvalidArgument(
                f"session must be a token from session_token() (kvs1....): {exc}"
            ) from None
    return ClientCore(
        seeds=seeds,
        cluster_map=cluster_map,
        router=router,
        consistency=level,
        read_policy=policy,
        session=session,
        # An attempt that gets no answer moves on to another replica well before the deadline
        # (a cut-off old leader accepts writes it can never commit).
        settings=ClientSettings(timeout=seconds, rpc_timeout=min(5.0, max(0.5, seconds / 3)), zone=zone),
        retry=retry,
        limits=limits,
    )


def _read_policy(value: ReadPolicy | str) -> ReadPolicy:
    if isinstance(value, ReadPolicy):
        return value
    try:
        return ReadPolicy(value)
    except ValueError:
        valid = ", ".join(p.value for p in ReadPolicy)
        raise errors.InvalidArgument(
            f"read_policy must be a ReadPolicy or one of {valid}, not {value!r}"
        ) from None


def core_from_cluster(directory: str | Path, options: dict[str, Any]) -> ClientCore:
    """The core of `Client.from_cluster` / `AsyncClient.from_cluster`: the map read from disk.
    Pops the core's options from `options`, leaving the front door's own."""
    for name in ("endpoints", "router"):
        if name in options:
            raise errors.InvalidArgument(
                f"from_cluster reads the nodes' addresses from {directory}: give no {name} ({WHERE})"
            )
    cluster_map = load_cluster_map(directory)
    return make_core(
        None,
        None,
        cluster_map,
        options.pop("consistency", Consistency.STRONG),
        options.pop("read_policy", ReadPolicy.LEADER),
        options.pop("session", None),
        options.pop("timeout", DEFAULT_TIMEOUT),
        options.pop("zone", ""),
        options.pop("retry", None),
        options.pop("limits", None) or cluster_limits(directory, cluster_map),
    )


def cluster_limits(directory: str | Path, cluster_map: ClusterMap) -> Limits | None:
    """The nodes' limits, from the first node's config in the cluster directory (`kvstore cluster
    up` writes them to nodes/<name>.toml); None (the defaults) when the directory has none."""
    path = Path(directory) / "nodes" / f"{cluster_map.shards[0].replicas[0].name}.toml"
    return NodeConfig.load(path).limits if path.exists() else None


def load_cluster_map(directory: str | Path) -> ClusterMap:
    path = Path(directory) / "cluster.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no cluster map at {path}: start one with `kvstore cluster up --dir {directory}`"
        )
    return ClusterMap.load(path)
