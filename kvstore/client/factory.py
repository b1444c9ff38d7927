"""Building a `ClientCore` from the front doors' arguments (`Client(...)`, `Client.from_cluster`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore.client.core import ClientCore, ClientSettings, Consistency, ReadConsistency, ReadPolicy
from kvstore.client.retry import RetryPolicy
from kvstore.routing.cluster_map import ClusterMap


def make_core(
    endpoints: list[str] | str | None,
    router: str | None,
    cluster_map: ClusterMap | None,
    consistency: ReadConsistency,
    read_policy: ReadPolicy,
    session: str | None,
    timeout: float,
    zone: str,
    retry: RetryPolicy | None = None,
) -> ClientCore:
    seeds = [endpoints] if isinstance(endpoints, str) else list(endpoints or [])
    return ClientCore(
        seeds=seeds,
        cluster_map=cluster_map,
        router=router,
        consistency=consistency,
        read_policy=read_policy,
        session=session,
        # An attempt that gets no answer moves on to another replica well before the deadline
        # (a cut-off old leader accepts writes it can never commit).
        settings=ClientSettings(timeout=timeout, rpc_timeout=min(5.0, max(0.5, timeout / 3)), zone=zone),
        retry=retry,
    )


def core_from_cluster(directory: str | Path, options: dict[str, Any]) -> ClientCore:
    """The core of `Client.from_cluster` / `AsyncClient.from_cluster`: the map read from disk.
    Pops the core's options from `options`, leaving the front door's own."""
    return make_core(
        None,
        None,
        load_cluster_map(directory),
        options.pop("consistency", Consistency.STRONG),
        options.pop("read_policy", ReadPolicy.LEADER),
        options.pop("session", None),
        options.pop("timeout", 10.0),
        options.pop("zone", ""),
        options.pop("retry", None),
    )


def load_cluster_map(directory: str | Path) -> ClusterMap:
    path = Path(directory) / "cluster.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no cluster map at {path}: start one with `kvstore cluster up --dir {directory}`"
        )
    return ClusterMap.load(path)
