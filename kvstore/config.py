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


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or outside its range (the message names it)."""


def setting(default: Any, lo: float, hi: float) -> Any:
    """A numeric setting and its legal range [lo, hi], checked whenever the section is built.

    Every int and float field of a section must be declared with it (tests/cluster/test_bounds.py checks),
    so a typo in a TOML file or a flag (`max_dedup_sessions = 0`, a timeout of -1) stops the node at
    start with the setting's name, value and range, instead of quietly changing its behaviour."""
    return field(default=default, metadata={"range": (lo, hi)})


class Section:
    """Range-checks its fields on construction (`setting`), then `check()`s how they relate.

    The base of every settings table: the node's (below) and the local cluster's topology
    (kvstore/cluster/topology.py)."""

    section = ""  # the TOML table name, for messages

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(self.section, f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Relations between this section's settings; raise ConfigError."""


def _check_field(section: str, f: dataclasses.Field[Any], value: Any) -> None:
    name = f"{section}.{f.name}" if section else f.name
    bounds = f.metadata.get("range")
    if f.type in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}")
        return
    if f.type in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return
    if f.type in ("int", "float", int, float):
        integral = f.type in ("int", int)
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise ConfigError(f"{name} must be {'an integer' if integral else 'a number'}, not {value!r}")
        if bounds is None:
            return  # declared without `setting`: tests/cluster/test_bounds.py names it
        lo, hi = bounds
        if not lo <= value <= hi:  # also refuses NaN
            raise ConfigError(f"{name} = {value!r} is out of range: it must be in [{lo}, {hi}]")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


MiB = 1 << 20
# pysyncobj sends an entry larger than `appendEntriesBatchSizeBytes` (16 MiB, state_machine.py) in
# 64 KiB "transmission" chunks, a path the raft_fixes do not cover. One Raft entry carries one
# write of at most `max_request_bytes`, or proposals grouped up to `max_entry_bytes`, plus pickling
# overhead (a few bytes a key): both stay under this, leaving 4 MiB of headroom.
MAX_PROPOSAL_BYTES = 12 * MiB
MAX_VALUE_BYTES = 8 * MiB  # the largest `limits.max_value_bytes` a node may be given


@dataclass
class Limits(Section):
    """Checked before anything is proposed or read: a rejected request changes nothing."""

    section = "limits"

    # LMDB refuses longer keys (its max_key_size()); a node refuses to start with a larger value.
    max_key_bytes: int = setting(511, 1, 4096)
    max_value_bytes: int = setting(1 * MiB, 1, MAX_VALUE_BYTES)
    max_batch_keys: int = setting(10_000, 1, 100_000)  # keys in one MultiGet/MultiPut/Delete
    max_batch_ops: int = setting(10_000, 1, 100_000)  # ops in one Batch RPC
    max_scan_limit: int = setting(10_000, 1, 100_000)
    default_scan_limit: int = setting(1_000, 1, 100_000)
    # Keys plus values of one request (a MultiPut's pairs, a Delete's or MultiGet's keys). A write
    # is one Raft proposal, so this also keeps every proposal below pysyncobj's chunked path.
    max_request_bytes: int = setting(8 * MiB, 64 << 10, MAX_PROPOSAL_BYTES)
    # Keys plus values one answer may carry (a MultiGet, a Scan page, the results of a Batch).
    # Checked while the answer is read, so an oversized one costs at most this much memory:
    # a MultiGet fails with RESOURCE_EXHAUSTED, a Scan page ends early (with a continuation),
    # a Batch answers the ops that fit and defers the rest (the client sends them again).
    max_response_bytes: int = setting(8 * MiB, 64 << 10, 256 * MiB)

    def check(self) -> None:
        _require(
            self.default_scan_limit <= self.max_scan_limit,
            f"limits.default_scan_limit ({self.default_scan_limit}) must not exceed "
            f"limits.max_scan_limit ({self.max_scan_limit})",
        )
        largest_record = self.max_key_bytes + self.max_value_bytes
        _require(
            largest_record <= self.max_request_bytes,
            f"limits.max_request_bytes ({self.max_request_bytes}) must hold one key and value "
            f"at their limits ({largest_record} bytes): a single put would be refused",
        )
        _require(
            largest_record <= self.max_response_bytes,
            f"limits.max_response_bytes ({self.max_response_bytes}) must hold one key and value "
            f"at their limits ({largest_record} bytes): a single get could never be answered",
        )

    @property
    def max_message_bytes(self) -> int:
        """gRPC's message size limit, both ways, derived from the limits above: the largest legal
        request or answer (keys and values) plus protobuf framing for every key and op (a tag and
        a length per field, a revision, a response header per batched op: far below 256 bytes)."""
        payload = max(self.max_request_bytes, self.max_response_bytes)
        return payload + max(self.max_batch_keys, self.max_batch_ops) * 256 + (64 << 10)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel and server options for these limits (nodes, router and SDK use the same)."""
        return grpc_message_options(self.max_message_bytes)


def grpc_message_options(size: int) -> list[tuple[str, int]]:
    """gRPC channel or server options capping messages at `size` bytes both ways (the only place
    these options are spelled: `Limits.grpc_options()` for kvstore's own processes; tools and
    tests that must send or accept more pass their own size)."""
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


@dataclass
class RaftSettings(Section):
    section = "raft"

    # Election timeouts: wide enough that a GIL stall on a busy 2-core machine does not start an
    # election, short enough that a failover takes a couple of seconds.
    min_timeout: float = setting(0.8, 0.05, 60.0)
    max_timeout: float = setting(1.6, 0.05, 60.0)
    # How long a leader that hears from no majority keeps calling itself leader. Reads never
    # trust this (strong reads use barriers); it only bounds how long writes queue on a cut-off node.
    leader_fallback_timeout: float = setting(2.5, 0.05, 600.0)
    connection_retry: float = setting(0.5, 0.01, 60.0)
    connection_timeout: float = setting(2.0, 0.05, 600.0)
    # Compact the log (LMDB snapshot) after this many entries, or this many seconds.
    compaction_min_entries: int = setting(20_000, 10, 100_000_000)
    compaction_min_time: float = setting(300.0, 0.1, 7 * 86_400.0)
    # ... or once this many bytes of keys and values have been applied since the last snapshot:
    # pysyncobj keeps the whole log in memory (and in its journal file) until a snapshot, so this
    # is what keeps a replica's memory flat under sustained writes.
    # 8 MiB: the leader's in-memory log swings 23 -> 44 MB between snapshots at 16 MiB, half that here.
    compaction_max_bytes: int = setting(8 * MiB, 64 << 10, 16 << 30)
    # Peers are dialled by name: re-resolve soon, so a restarted pod with a new IP is found
    # (pysyncobj's defaults cache answers for 600 s).
    dns_cache_time: float = setting(5.0, 0.0, 86_400.0)
    dns_fail_cache_time: float = setting(1.0, 0.0, 86_400.0)
    # File holding this shard's Raft secret (one per shard; `cluster up` writes
    # <dir>/secrets/shard-<N>.key with mode 0600; deploy mounts a Kubernetes Secret). It keys the
    # encryption and authentication of all Raft traffic (kvstore/replication/peer_transport.py).
    secret_file: str = ""
    # No secret, no encryption: loopback only, warned about at every start (flag --insecure).
    insecure: bool = False

    def check(self) -> None:
        _require(
            self.min_timeout < self.max_timeout,
            f"raft.min_timeout ({self.min_timeout}) must be below raft.max_timeout ({self.max_timeout})",
        )


DURABILITY_MODES = ("fsync", "none")  # storage.durability


@dataclass
class StorageSettings(Section):
    section = "storage"

    # Initial LMDB map; doubled whenever it is half full, up to max_map_size_bytes and the spare
    # disk; writes are refused near the cap.
    map_size_bytes: int = setting(256 * MiB, 1 * MiB, 1 << 40)
    max_map_size_bytes: int = setting(16 << 30, 1 * MiB, 1 << 44)
    # Free-space watermark: the leader refuses writes (DiskFull, RESOURCE_EXHAUSTED) while the data
    # disk has less free than the larger of these; reads go on, writes resume once space is freed.
    # The reserve is what the Raft journal, read barriers and entries already in flight still need.
    min_free_bytes: int = setting(256 * MiB, 0, 1 << 40)
    min_free_fraction: float = setting(0.01, 0.0, 0.5)
    # A storage failure that may pass (I/O error, ENOSPC) is retried with exponential backoff up to
    # this many seconds apart; once failures have lasted io_failure_limit_seconds the node exits.
    io_retry_max_backoff: float = setting(5.0, 0.05, 600.0)
    io_failure_limit_seconds: float = setting(120.0, 0.5, 86_400.0)
    # "fsync": a replica's Raft log is on stable storage before it acknowledges entries or counts
    # its own copy toward a commit, its term and vote before it acts on them, and every apply
    # batch is synced (one fsync per tick each: group commit). "none" syncs nothing: a power cut
    # can lose acknowledged writes and let replicas diverge. For throwaway test clusters only: a
    # node started with it warns at every start.
    durability: str = "fsync"
    # Client sessions (de-duplicating retried writes, docs/architecture.md): a write's outcome is
    # kept this long, by the leader's clock, whatever the traffic. It must exceed the longest
    # time a client retries one write (the SDK's `timeout`, 10 s by default, never more than
    # 30 s for a write): a retry after it gets SessionExpired, never a second apply.
    dedup_retention_seconds: float = setting(60.0, 40.0, 86_400.0)
    # Sessions (clients that wrote within the retention) kept; beyond it the least recently
    # active is evicted, and its retries get SessionExpired. ~100 bytes of LMDB each.
    # Every replica of a shard must use the same two values, or they could disagree on a retry.
    max_dedup_sessions: int = setting(100_000, 1, 10_000_000)

    def check(self) -> None:
        _require(
            self.durability in DURABILITY_MODES,
            f"storage.durability = {self.durability!r}: must be one of {', '.join(DURABILITY_MODES)}",
        )
        _require(
            self.map_size_bytes <= self.max_map_size_bytes,
            f"storage.map_size_bytes ({self.map_size_bytes}) must not exceed "
            f"storage.max_map_size_bytes ({self.max_map_size_bytes})",
        )


@dataclass
class ServerSettings(Section):
    section = "server"

    # A proposal not applied by then is reported as unknown outcome.
    write_timeout: float = setting(5.0, 0.05, 600.0)
    # How long a strong read waits for its read index (leader) or barrier (follower): then unavailable.
    read_barrier_timeout: float = setting(3.0, 0.05, 600.0)
    # How long a replica waits to reach a session token before redirecting.
    session_wait: float = setting(0.5, 0.0, 60.0)
    # Group commit: proposals coalesced into one Raft entry (a larger single write goes alone).
    max_entry_proposals: int = setting(256, 1, 100_000)
    max_entry_bytes: int = setting(4 * MiB, 64 << 10, MAX_PROPOSAL_BYTES)
    # KV RPCs served at once (status.ConcurrencyGate; the router has the same cap): one more is
    # refused at once with RESOURCE_EXHAUSTED "overloaded", which the SDK retries after a back-off.
    # Together with the message and answer limits it bounds what requests in progress can hold.
    max_concurrent_rpcs: int = setting(1_000, 1, 100_000)
    # ... and ops in progress, a Batch counting one per op (each op costs a task and an answer,
    # ~6 KB, for ~20 bytes on the wire). At least limits.max_batch_ops.
    max_concurrent_ops: int = setting(20_000, 1, 10_000_000)
    # Writes proposed and not yet applied (or timed out): a write beyond either bound is refused
    # with "overloaded" (nothing proposed) instead of growing the leader's queues and memory.
    # A compare-and-set counts limits.max_value_bytes more: if it fails, its answer carries the
    # key's current value, copied when it applies.
    max_pending_proposals: int = setting(20_000, 1, 10_000_000)
    max_pending_bytes: int = setting(64 * MiB, 1 * MiB, 64 << 30)
    # FAULT INJECTION, for proving the chaos checker works; never set it in a real deployment:
    # serve strong reads locally whenever this replica believes it leads (no barrier), the classic
    # stale-read bug of a deposed leader.
    unsafe_local_strong_reads: bool = False
    # Health (grpc.health.v1): NOT_SERVING once the Raft tick thread has not ticked, or applies have
    # not moved while committed entries wait, for this long. Above a GIL stall on a busy machine.
    health_stall_seconds: float = setting(5.0, 0.1, 3600.0)
    # FAULT INJECTION, for testing the health service; never set it in a real deployment: SIGUSR1
    # toggles a freeze of applies (Raft keeps ticking), SIGUSR2 a stall of the Raft tick thread.
    fault_injection_signals: bool = False
    # File holding the cluster's admin secret (`cluster up` writes <dir>/secrets/admin.key, mode
    # 0600). Calls that change placement or read data in bulk (the slot-move steps; writes to the
    # metadata group) must carry it (`kvstore-admin-token`); empty: this node refuses them all.
    admin_secret_file: str = ""


@dataclass
class ClusterSettings(Section):
    section = "cluster"

    # The cluster's id, the same in every node's config (`cluster up` generates one; a restore
    # gets a new one). Stored in the data dir on first start (kvstore/storage/identity.py): a node
    # whose data dir holds another id refuses to start. Sent in every Raft handshake and checked
    # on gRPC requests that carry it, so a copy of a cluster can never talk to the original.
    id: str = ""


@dataclass
class NodeConfig(Section):
    name: str
    shard: int = field(metadata={"range": (0, 1_000_000)})
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
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: Limits = field(default_factory=Limits)
    raft: RaftSettings = field(default_factory=RaftSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    def check(self) -> None:
        for name, section_cls in _SECTIONS.items():
            _require(
                isinstance(getattr(self, name), section_cls),
                f"[{name}] must be a table of settings, not {getattr(self, name)!r}",
            )
        _require(
            self.limits.max_batch_ops <= self.server.max_concurrent_ops,
            f"server.max_concurrent_ops ({self.server.max_concurrent_ops}) must allow one Batch of "
            f"limits.max_batch_ops ({self.limits.max_batch_ops})",
        )
        _require(
            self.limits.max_request_bytes <= self.server.max_pending_bytes,
            f"server.max_pending_bytes ({self.server.max_pending_bytes}) must hold at least one write "
            f"of limits.max_request_bytes ({self.limits.max_request_bytes})",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        kwargs = dict(data)
        for name, section_cls in _SECTIONS.items():
            kwargs[name] = build_section(section_cls, kwargs.get(name, {}))
        return build_section(cls, kwargs)

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
_RENAMED = {
    "fsync": 'durability ("fsync" or "none"; fsync = false is durability = "none")',
    "dedup_window_entries": _SESSIONS_NOW,
    "dedup_window_ids": _SESSIONS_NOW,
    "password": "secret_file (a file holding the shard's secret; never the secret itself)",
}
# Settings that no longer exist and have no successor: a config naming one is refused, saying why.
_REMOVED = {
    "max_request_id_bytes": "a request id has a fixed shape (empty, or a 16-byte client id + an 8-byte "
    "sequence [+ an 8-byte part]): nothing to configure",
}


def build_section(cls: type, data: Any) -> Any:
    """A `Section` from a TOML table: unknown keys, missing or ill-typed settings raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} settings must be a table, not {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    for old in unknown & set(_RENAMED):
        raise ConfigError(f"{cls.__name__} setting {old} was renamed {_RENAMED[old]}")
    for old in unknown & set(_REMOVED):
        raise ConfigError(f"{cls.__name__} setting {old} was removed: {_REMOVED[old]}")
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required setting is missing
        raise ConfigError(f"{cls.__name__}: {exc}") from None


_SECTIONS: dict[str, type] = {
    "cluster": ClusterSettings,
    "limits": Limits,
    "raft": RaftSettings,
    "storage": StorageSettings,
    "server": ServerSettings,
}
