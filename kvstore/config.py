"""Configuration: one typed object per node, loaded from a TOML file and overridden by CLI flags.

`kvstore cluster up` writes one TOML file per replica (`<dir>/nodes/<name>.toml`); `kvstore node
--config FILE` loads it. Every tunable lives here, never in module globals.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


@dataclass
class Limits:
    """Checked before anything is proposed: a rejected request changes nothing."""

    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 20
    max_batch_keys: int = 10_000
    max_request_id_bytes: int = 64
    max_scan_limit: int = 10_000
    default_scan_limit: int = 1_000

    @property
    def max_message_bytes(self) -> int:
        # A MultiPut of large values is the biggest legal message; gRPC rejects anything larger.
        return 64 << 20


@dataclass
class RaftSettings:
    # Election timeouts: wide enough that a GIL stall on a busy 2-core machine does not start an
    # election, short enough that a failover takes a couple of seconds.
    min_timeout: float = 0.8
    max_timeout: float = 1.6
    # How long a leader that hears from no majority keeps calling itself leader. Reads never
    # trust this (strong reads use barriers); it only bounds how long writes queue on a cut-off node.
    leader_fallback_timeout: float = 2.5
    connection_retry: float = 0.5
    connection_timeout: float = 2.0
    # Compact the log (LMDB snapshot) after this many entries, or this many seconds.
    compaction_min_entries: int = 20_000
    compaction_min_time: float = 300.0
    # ... or once this many bytes of keys and values have been applied since the last snapshot:
    # pysyncobj keeps the whole log in memory (and in its journal file) until a snapshot, so this
    # is what keeps a replica's memory flat under sustained writes.
    # 8 MiB: the leader's in-memory log swings 23 -> 44 MB between snapshots at 16 MiB, half that here.
    compaction_max_bytes: int = 8 << 20
    # Peers are dialled by name: re-resolve soon, so a restarted pod with a new IP is found
    # (pysyncobj's defaults cache answers for 600 s).
    dns_cache_time: float = 5.0
    dns_fail_cache_time: float = 1.0
    # File holding this shard's Raft secret (one per shard; `cluster up` writes
    # <dir>/secrets/shard-<N>.key with mode 0600; deploy mounts a Kubernetes Secret). It keys the
    # encryption and authentication of all Raft traffic (kvstore/replication/peer_transport.py).
    secret_file: str = ""
    # No secret, no encryption: loopback only, warned about at every start (flag --insecure).
    insecure: bool = False


@dataclass
class StorageSettings:
    map_size_bytes: int = 256 << 20  # initial LMDB map; doubled whenever it is half full
    fsync: bool = True  # fsync each group commit (one per apply batch)
    # How many of the latest request ids are remembered for de-duplicating retried writes. A
    # retry is recognised while fewer than this many other writes applied since its first try:
    # ~15 s of writes at 7k/s, above the SDK's 10 s operation timeout; raise it for faster hosts.
    # Every replica of a shard must use the same value, or they could disagree on a retry.
    dedup_window_ids: int = 100_000


@dataclass
class ServerSettings:
    write_timeout: float = 5.0  # a proposal not applied by then is reported as unknown outcome
    read_barrier_timeout: float = 3.0
    session_wait: float = 0.5  # how long a replica waits to reach a session token before redirecting
    max_entry_proposals: int = 256  # group commit: proposals coalesced into one Raft entry
    max_entry_bytes: int = 4 << 20
    # FAULT INJECTION, for proving the chaos checker works; never set it in a real deployment:
    # serve strong reads locally whenever this replica believes it leads (no barrier), the classic
    # stale-read bug of a deposed leader.
    unsafe_local_strong_reads: bool = False


@dataclass
class NodeConfig:
    name: str
    shard: int
    listen: str  # gRPC host:port
    raft_bind: str  # host:port pysyncobj binds
    raft_advertise: str  # host:port peers dial (a fault proxy's, or raft_bind)
    peers: list[str]  # advertised Raft addresses of the other replicas of this shard
    data_dir: str
    cluster_map: str  # path of the cluster map JSON file
    zone: str = ""
    limits: Limits = field(default_factory=Limits)
    raft: RaftSettings = field(default_factory=RaftSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        kwargs = dict(data)
        for name, section_cls in _SECTIONS.items():
            kwargs[name] = _build(section_cls, kwargs.get(name, {}))
        return _build(cls, kwargs)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> NodeConfig:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for key, value in (overrides or {}).items():
            if value is not None:
                data[key] = value
        return cls.from_dict(data)

    def to_toml(self) -> str:
        return tomli_w.dumps(dataclasses.asdict(self))


_RENAMED = {
    "dedup_window_entries": "dedup_window_ids (now counted in request ids, not log entries)",
    "password": "secret_file (a file holding the shard's secret; never the secret itself)",
}


def _build(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    for old in unknown & set(_RENAMED):
        raise ValueError(f"{cls.__name__} setting {old} was renamed {_RENAMED[old]}")
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    return cls(**data)


_SECTIONS: dict[str, type] = {
    "limits": Limits,
    "raft": RaftSettings,
    "storage": StorageSettings,
    "server": ServerSettings,
}
