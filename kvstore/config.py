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

    # LMDB refuses longer keys (its max_key_size()); a node refuses to start with a larger value.
    max_key_bytes: int = 511
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
    # Encrypts and authenticates Raft traffic (pysyncobj's Fernet); without it, anyone who reaches a
    # Raft port can run code in the node. Needs the `cryptography` package (extra: kvstore[secure]).
    password: str = ""


@dataclass
class StorageSettings:
    map_size_bytes: int = 256 << 20  # initial LMDB map; doubled whenever it is half full...
    max_map_size_bytes: int = 16 << 30  # ...up to this and the spare disk; writes are refused near it
    # Free-space watermark: the leader refuses writes (DiskFull, RESOURCE_EXHAUSTED) while the data
    # disk has less free than the larger of these; reads go on, writes resume once space is freed.
    # The reserve is what the Raft journal, read barriers and entries already in flight still need.
    min_free_bytes: int = 256 << 20
    min_free_fraction: float = 0.01
    # A storage failure that may pass (I/O error, ENOSPC) is retried with exponential backoff up to
    # this many seconds apart; once failures have lasted io_failure_limit_seconds the node exits.
    io_retry_max_backoff: float = 5.0
    io_failure_limit_seconds: float = 120.0
    fsync: bool = True  # fsync each group commit (one per apply batch)
    # Client sessions (de-duplicating retried writes, docs/architecture.md): a write's outcome is
    # kept this long, by the leader's clock, whatever the traffic. It must exceed the longest
    # time a client retries one write (the SDK's `timeout`, 10 s by default, never more than
    # 30 s for a write): a retry after it gets SessionExpired, never a second apply.
    dedup_retention_seconds: float = 60.0
    # Sessions (clients that wrote within the retention) kept; beyond it the least recently
    # active is evicted, and its retries get SessionExpired. ~100 bytes of LMDB each.
    max_dedup_sessions: int = 100_000
    # Every replica of a shard must use the same two values, or they could disagree on a retry.

    def __post_init__(self) -> None:
        _check_range("storage.dedup_retention_seconds", self.dedup_retention_seconds, 40.0, 86_400.0)
        _check_range("storage.max_dedup_sessions", self.max_dedup_sessions, 1, 10_000_000)


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
    # Health (grpc.health.v1): NOT_SERVING once the Raft tick thread has not ticked, or applies have
    # not moved while committed entries wait, for this long. Above a GIL stall on a busy machine.
    health_stall_seconds: float = 5.0
    # FAULT INJECTION, for testing the health service; never set it in a real deployment: SIGUSR1
    # toggles a freeze of applies (Raft keeps ticking), SIGUSR2 a stall of the Raft tick thread.
    fault_injection_signals: bool = False


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
    # host:port of a plaintext port serving only grpc.health.v1, for probes that cannot present a
    # client certificate (kubelet's gRPC probe); empty: health is served on `listen` only.
    health_listen: str = ""
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


_SESSIONS_NOW = "max_dedup_sessions (retention is now dedup_retention_seconds per client session)"
_RENAMED = {"dedup_window_entries": _SESSIONS_NOW, "dedup_window_ids": _SESSIONS_NOW}


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g} (got {value!r})")


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
