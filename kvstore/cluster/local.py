"""A local multi-process cluster under one directory: what `kvstore cluster ...` drives.

Layout of `<dir>`:
- `cluster.json`        the cluster map (shards, replicas, addresses, epoch)
- `topology.toml`       the topology it was created from (kvstore/cluster/topology.py)
- `nodes/<name>.toml`   each replica's NodeConfig (it names its shard's secret file, never the secret)
- `secrets/shard-<N>.key` each shard's generated Raft secret (mode 0600; none with --insecure)
- `data/<name>/`        each replica's LMDB and Raft journal/snapshot
- `logs/<name>.log`     each replica's output
- `run/<name>.pid`      each running replica's PID (processes are detached: they outlive the CLI)

Every replica is its own process: pysyncobj's tick thread must not share a GIL with a busy neighbour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from kvstore import errors
from kvstore.cluster.processes import alive, free_ports, is_kvstore_process, wait_gone
from kvstore.cluster.status import (
    NodesNotServing,
    StatusDocument,
    ask_replica,
    last_error_line,
    start_problem,
    status_document,
)
from kvstore.cluster.topology import PORTS_PER_REPLICA, Topology, resolve_topology
from kvstore.config import ClusterSettings, NodeConfig, RaftSettings, ServerSettings, StorageSettings
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.routing.cluster_map import META_SHARD, ClusterMap, ReplicaInfo, ShardInfo
from kvstore.storage.identity import new_cluster_id

PROXY_DAEMON = "fault-proxies"  # name of the proxy daemon's log and PID files
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT}


class LocalCluster:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).absolute()
        self.reserved_ports: set[int] = set()  # chosen by create() for nodes not yet started
        self.secret_files: dict[str, Path] = {}  # replica name -> its shard's secret file (create())
        # Processes this object started: their exit codes, and where their logs stood at start.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._log_starts: dict[str, int] = {}

    # ----- paths -----

    @property
    def map_path(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def topology_path(self) -> Path:
        return self.dir / "topology.toml"

    def _config_path(self, name: str) -> Path:
        return self.dir / "nodes" / f"{name}.toml"

    def _pid_path(self, name: str) -> Path:
        return self.dir / "run" / f"{name}.pid"

    def secret_path(self, shard: int | str) -> Path:
        return self.dir / "secrets" / f"shard-{shard}.key"

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def cluster_map(self) -> ClusterMap:
        if not self.map_path.exists():
            raise FileNotFoundError(f"no cluster at {self.dir} (run `kvstore cluster up --dir {self.dir}`)")
        return ClusterMap.load(self.map_path)

    def node_names(self) -> list[str]:
        """The shards' nodes (`all_node_names` adds the metadata group's)."""
        return [r.name for s in self.cluster_map().shards for r in s.replicas]

    def all_node_names(self) -> list[str]:
        """Every node process: the metadata group's replicas first (the shards' nodes follow its map)."""
        return [r.name for r in self.cluster_map().meta] + self.node_names()

    def node_config(self, name: str) -> NodeConfig:
        return NodeConfig.load(self._config_path(name))

    # ----- create -----

    def create(
        self,
        shards: int | None = None,
        replicas: int | None = None,
        base_port: int | None = None,
        vnodes: int | None = None,
        raft: RaftSettings | None = None,
        proxied_raft: dict[str, str] | None = None,
        storage: StorageSettings | None = None,
        advertise_for: Callable[[dict[str, str]], dict[str, str]] | None = None,
        server: ServerSettings | None = None,
        faults: bool = False,
        topology: Topology | None = None,
        meta_replicas: int | None = None,
    ) -> ClusterMap:
        """Write the map and node configs.

        The shape comes from `topology` (kvstore/cluster/topology.py) or from `shards`, `replicas`,
        `base_port` and `vnodes` (defaults: 1 x 3, free ports, 256 vnodes), never both.
        A replica binds its Raft port but may advertise another address (a fault proxy's):
        `proxied_raft` maps replica name -> advertised address, or `advertise_for` is called with
        name -> bound Raft address and returns that mapping (so proxies can be started in between).

        `meta_replicas`: the metadata group's size (the map's authority; kvstore/meta/store.py).
        A topology says its own (3 unless it says otherwise); built from the shape arguments the
        default is 0, no group and a fixed map: the smallest cluster a test needs."""
        if topology is None and meta_replicas is None:
            meta_replicas = 0
        topology = resolve_topology(topology, shards, replicas, vnodes, base_port, meta_replicas)
        if self.map_path.exists():
            raise FileExistsError(f"a cluster already exists at {self.dir}")
        shards, replicas = topology.shards, topology.replicas
        count = topology.replica_count
        # gRPC and Raft port of each replica in turn, then each replica's health port, then the
        # metadata group's (gRPC, Raft, health for each).
        wanted = PORTS_PER_REPLICA * (count + topology.meta_replicas)
        ports = [topology.base_port + i for i in range(wanted)] if topology.base_port else free_ports(wanted)
        # Ports handed out above are free but unbound until the nodes start: whoever binds next
        # (a fault proxy on port 0) must not take one of them.
        self.reserved_ports = set(ports)
        health_ports = {f"s{i // replicas}r{i % replicas}": ports[2 * count + i] for i in range(count)}
        raft = raft or RaftSettings()
        # One secret per shard: a replica of one shard cannot pose as a member of another.
        self.secret_files = {}
        if not raft.insecure:
            for shard in range(shards):
                path = self._write_secret(shard)
                self.secret_files.update({f"s{shard}r{r}": path for r in range(replicas)})
        if advertise_for is not None:
            binds = {
                f"s{i // replicas}r{i % replicas}": f"127.0.0.1:{ports[2 * i + 1]}" for i in range(count)
            }
            proxied_raft = advertise_for(binds)
        elif faults:
            proxied_raft = self._plan_fault_proxies(count, replicas, ports)
        # A new cluster, a new id (a restore too): its nodes and clients never talk to another's.
        cluster = ClusterSettings(id=new_cluster_id())
        # The admin secret slot moves and metadata changes need (kvstore-admin-token).
        server = dataclasses.replace(
            server or ServerSettings(), admin_secret_file=str(self._write_admin_secret())
        )
        shard_infos = []
        configs = []
        for shard in range(shards):
            members = []
            for r in range(replicas):
                i = shard * replicas + r
                name = f"s{shard}r{r}"
                grpc_addr, raft_addr = f"127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}"
                advertise = (proxied_raft or {}).get(name, raft_addr)
                members.append((name, grpc_addr, raft_addr, advertise, topology.zone_of(r)))
            shard_infos.append(ShardInfo(shard, tuple(ReplicaInfo(m[0], m[1], m[3], m[4]) for m in members)))
            for name, grpc_addr, raft_addr, advertise, zone in members:
                configs.append(
                    NodeConfig(
                        name=name,
                        shard=shard,
                        listen=grpc_addr,
                        raft_bind=raft_addr,
                        raft_advertise=advertise,
                        peers=[m[3] for m in members if m[0] != name],
                        data_dir=str(self.dir / "data" / name),
                        cluster_map=str(self.map_path),
                        zone=zone,
                        health_listen=f"127.0.0.1:{health_ports[name]}",
                        cluster=cluster,
                        raft=dataclasses.replace(raft, secret_file=str(self.secret_files.get(name, ""))),
                        storage=storage or StorageSettings(),
                        server=server,
                    )
                )
        meta, meta_configs = self._plan_meta(topology, ports[PORTS_PER_REPLICA * count :], configs[0])
        configs += meta_configs
        for sub in ("nodes", "data", "logs", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for config in configs:
            self._config_path(config.name).write_text(config.to_toml())
        # What the cluster was made from, for whoever looks later (the map is what nodes read).
        self.topology_path.write_text(topology.to_toml())
        cluster_map = ClusterMap(
            epoch=1,
            shards=tuple(shard_infos),
            vnodes_per_shard=topology.vnodes,
            cluster_id=cluster.id,
            meta=meta,
        )
        cluster_map.save(self.map_path)
        return cluster_map

    def _plan_meta(
        self, topology: Topology, ports: list[int], like: NodeConfig
    ) -> tuple[tuple[ReplicaInfo, ...], list[NodeConfig]]:
        """The metadata group's replicas (m0, m1, ...) and their configs (`plan_group`), with a
        secret of their own (no shard's replica can join the group, nor the group's a shard)."""
        if not topology.meta_replicas:
            return (), []
        secret = "" if like.raft.insecure else str(self._write_secret("meta"))
        names = [f"m{j}" for j in range(topology.meta_replicas)]
        zones = [topology.zone_of(j) for j in range(topology.meta_replicas)]
        return self.plan_group(like, META_SHARD, names, zones, ports, secret)

    def plan_group(
        self, like: NodeConfig, shard: int, names: list[str], zones: list[str], ports: list[int], secret: str
    ) -> tuple[tuple[ReplicaInfo, ...], list[NodeConfig]]:
        """A Raft group of replicas `names` in `zones` on `ports` (gRPC, Raft, health each, in
        turn), serving as `shard`: their map entries and configs, made like `like`'s (the same
        cluster, limits and settings) with the Raft secret file `secret` ("": --insecure)."""
        members = [
            (name, *(f"127.0.0.1:{p}" for p in ports[PORTS_PER_REPLICA * j : PORTS_PER_REPLICA * (j + 1)]))
            for j, name in enumerate(names)
        ]
        configs = [
            dataclasses.replace(
                like,
                name=name,
                shard=shard,
                listen=grpc_addr,
                raft_bind=raft_addr,
                raft_advertise=raft_addr,
                peers=[m[2] for m in members if m[0] != name],
                data_dir=str(self.dir / "data" / name),
                zone=zone,
                health_listen=health_addr,
                raft=dataclasses.replace(like.raft, secret_file=secret),
            )
            for (name, grpc_addr, raft_addr, health_addr), zone in zip(members, zones, strict=True)
        ]
        replicas = tuple(ReplicaInfo(m[0], m[1], m[2], zone) for m, zone in zip(members, zones, strict=True))
        return replicas, configs

    @property
    def admin_secret_path(self) -> Path:
        return self.dir / "secrets" / "admin.key"

    def admin_token(self) -> str:
        """The cluster's admin secret (what `kvstore cluster move-slots` and the like send)."""
        return self.admin_secret_path.read_text().strip()

    def _write_admin_secret(self) -> Path:
        return self._write_secret_file(self.admin_secret_path)

    def _write_secret(self, shard: int | str) -> Path:
        return self._write_secret_file(self.secret_path(shard))

    def write_shard_secret(self, shard: int) -> Path:
        """A new shard's Raft secret file (refused if it exists): `cluster add-shard`."""
        return self._write_secret(shard)

    def write_node_config(self, config: NodeConfig) -> None:
        """A new node's config file (`cluster add-shard`); its data and log directories exist."""
        self._config_path(config.name).write_text(config.to_toml())

    def _write_secret_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 (never briefly readable by others), refused if it already exists.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        return path

    def _plan_fault_proxies(self, count: int, replicas: int, ports: list[int]) -> dict[str, str]:
        """One proxy address per replica, recorded for the proxy daemon (kvstore.chaos.proxy_daemon)."""
        taken = set(ports)
        proxy_ports = [p for p in free_ports(2 * count) if p not in taken][:count]
        layout = {}
        for i in range(count):
            name = f"s{i // replicas}r{i % replicas}"
            layout[name] = {
                "listen": f"127.0.0.1:{proxy_ports[i]}",
                "target": f"127.0.0.1:{ports[2 * i + 1]}",
                # The proxy reads who dials from the encrypted handshake (kvstore.chaos.proxy).
                "secret_file": str(self.secret_files.get(name, "")),
            }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "proxies.json").write_text(json.dumps(layout, indent=2))
        return {name: ends["listen"] for name, ends in layout.items()}

    @property
    def has_fault_proxies(self) -> bool:
        return (self.dir / "proxies.json").exists()

    # ----- processes -----

    def pid(self, name: str) -> int | None:
        path = self._pid_path(name)
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        # A PID file outlives its process, and the PID may be reused: trust it only if that
        # process is still one of ours.
        return pid if pid and alive(pid) and is_kvstore_process(pid) else None

    def start(self, name: str) -> int:
        if name not in self.all_node_names():
            raise KeyError(
                f"no node named {name!r} in {self.dir} (nodes: {', '.join(self.all_node_names())})"
            )
        if self.pid(name):
            raise RuntimeError(f"{name} is already running (pid {self.pid(name)})")
        return self._spawn(name, ["kvstore", "node", "--config", str(self._config_path(name))])

    def _spawn(self, name: str, module_args: list[str]) -> int:
        """Start `python -m MODULE ARGS` detached, output to logs/<name>.log, PID to run/<name>.pid."""
        log = open(self.log_path(name), "ab")
        self._log_starts[name] = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", *module_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._children[name] = proc
        self._pid_path(name).write_text(str(proc.pid))
        return proc.pid

    def start_all(self) -> list[str]:
        """Start every node not running (and the fault proxies); the names of the nodes started."""
        if self.has_fault_proxies and not self.pid(PROXY_DAEMON):
            self._spawn(PROXY_DAEMON, ["kvstore.chaos.proxy_daemon", "--dir", str(self.dir)])
        started = [name for name in self.all_node_names() if not self.pid(name)]
        for name in started:
            self.start(name)
        return started

    def kill(self, name: str, sig: str = "KILL") -> int:
        if name not in self.all_node_names():
            raise KeyError(
                f"no node named {name!r} in {self.dir} (nodes: {', '.join(self.all_node_names())})"
            )
        pid = self.pid(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        os.kill(pid, SIGNALS[sig.upper()])
        if sig.upper() in ("KILL", "TERM"):
            wait_gone(pid, 10.0)
            if sig.upper() == "KILL" or not alive(pid):
                self._pid_path(name).unlink(missing_ok=True)
        return pid

    def down(self, timeout: float = 10.0, names: list[str] | None = None) -> None:
        """SIGTERM every node (SIGCONT first, in case it is paused), SIGKILL whatever lingers.
        `names`: only these nodes (the fault proxies stay)."""
        everything = [*self.all_node_names(), PROXY_DAEMON]
        pids = {name: self.pid(name) for name in (everything if names is None else names)}
        for pid in filter(None, pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, pid in pids.items():
            if pid:
                wait_gone(pid, max(0.1, deadline - time.monotonic()))
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, 5.0)
            self._pid_path(name).unlink(missing_ok=True)

    # ----- status -----

    def status(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Per shard: leader name (or None) and each replica's status."""
        cluster_map = self.cluster_map()
        return [
            self._group_status(s.id, s.replicas, cluster_map.vnodes_per_shard, timeout)
            for s in cluster_map.shards
        ]

    def meta_status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The metadata group's status, as a shard's in `status()` (None: the cluster has none)."""
        cluster_map = self.cluster_map()
        return self._group_status(META_SHARD, cluster_map.meta, 1, timeout) if cluster_map.meta else None

    def _all_status(self, timeout: float) -> list[dict[str, Any]]:
        meta = self.meta_status(timeout)
        return self.status(timeout) + ([meta] if meta else [])

    def _group_status(
        self, shard: int, members: tuple[ReplicaInfo, ...], vnodes: int, timeout: float
    ) -> dict[str, Any]:
        replicas = [ask_replica(shard, r, self.pid(r.name), timeout) for r in members]
        leaders = [r for r in replicas if r.role == "leader"]
        # Two self-declared leaders can coexist briefly (a cut-off old one): trust the higher term.
        leader = max(leaders, key=lambda r: r.term).node if leaders else None
        return {
            "shard": shard,
            "leader": leader,
            "vnodes": vnodes,
            "key_count": max((r.key_count for r in replicas), default=0),
            "replicas": [r.as_dict() for r in replicas],
        }

    def status_document(self, timeout: float = 1.0) -> StatusDocument:
        """What `cluster status --json` prints: the schema of docs/cluster-status.md."""
        cluster_map = self.current_map(timeout)
        return status_document(cluster_map, self.status(timeout), self.dir, self.meta_status(timeout))

    def current_map(self, timeout: float = 1.0) -> ClusterMap:
        """The newest map any node answers (the metadata group's, which every node follows within
        a second), written to cluster.json if it is newer: the file is a cache, the group the
        authority. The file's map when no node answers."""
        cached = self.cluster_map()
        newest = cached
        for replica in [*cached.meta, *(r for s in cached.shards for r in s.replicas)]:
            if self.pid(replica.name) is None:
                continue
            try:
                with grpc.insecure_channel(replica.address) as channel:
                    answer = pb_grpc.AdminStub(channel).ClusterMap(pb.ClusterMapRequest(), timeout=timeout)
                answered = ClusterMap.from_proto(answer)
            except (grpc.RpcError, errors.KvError):
                continue
            if answered.cluster_id == cached.cluster_id and answered.epoch > newest.epoch:
                newest = answered
            if cached.meta:
                break  # every node follows the group: the first answer is as new as any
        if newest.epoch > cached.epoch:
            newest.save(self.map_path)
        return newest

    def wait_for_leaders(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until every shard (and the metadata group) has a replica that reports itself leader."""
        deadline = time.monotonic() + timeout
        while True:
            shards = self._all_status(timeout=0.5)
            if all(s["leader"] for s in shards):
                return [s for s in shards if s["shard"] != META_SHARD]  # as status() says
            if time.monotonic() > deadline:
                missing = [s["shard"] for s in shards if not s["leader"]]
                raise TimeoutError(
                    f"shards without a leader after {timeout}s: {missing} (logs: {self.dir}/logs)"
                )
            time.sleep(0.2)

    def wait_until_serving(
        self, names: list[str] | None = None, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Block until each of `names` (default: every node) serves as a member of its Raft group
        (`status.start_problem`); returns `status()`. Raises `NodesNotServing`, naming each node
        that is not with the line of its log that says why, as soon as every node left has exited
        (a taken port, a bad config: waiting longer cannot help), or after `timeout` seconds."""
        wanted = set(names or self.all_node_names())
        deadline = time.monotonic() + timeout
        while True:
            shards = self._all_status(timeout=0.5)
            problems = {
                r["node"]: problem
                for s in shards
                for r in s["replicas"]
                if r["node"] in wanted and (problem := start_problem(r, s["leader"]))
            }
            for name in wanted:  # a node this object started that has exited is down, whoever answers
                child = self._children.get(name)
                if child is not None and child.poll() is not None:
                    problems[name] = "down"
            if not problems:
                return [s for s in shards if s["shard"] != META_SHARD]  # as status() says
            exited = {name for name, problem in problems.items() if problem == "down"}
            if exited == set(problems) or time.monotonic() > deadline:
                waited = "" if exited == set(problems) else f" within {timeout:g}s"
                raise NodesNotServing(
                    {
                        name: (self._why_down(name) if name in exited else problem)
                        for name, problem in problems.items()
                    },
                    {name: self.log_reason(name) for name in problems},
                    waited,
                )
            time.sleep(0.2)

    def _why_down(self, name: str) -> str:
        proc = self._children.get(name)
        code = proc.poll() if proc is not None else None  # also reaps it
        return f"exited with code {code}" if code is not None else "not running"

    def log_reason(self, name: str) -> str:
        """The line of a node's log (since this object started it) that best says what went wrong:
        the last error line (a node's own one-line `error: ...`, a traceback's last line, a logged
        ERROR), else its last line."""
        path = self.log_path(name)
        start = self._log_starts.get(name, max(0, path.stat().st_size - 65536) if path.exists() else 0)
        return last_error_line(path, start)

    def leader_of(self, shard: int) -> str | None:
        for s in self.status(timeout=0.5):
            if s["shard"] == shard:
                return s["leader"]
        raise KeyError(shard)
