"""A local cluster's topology: how many shards, replicas per shard, their zones, and its ports.

Kept in TOML files under the repository's top-level `cluster/` folder (`cluster/local-3x3.toml`)
and read by `kvstore cluster up --topology FILE`, `kvstore demo` and the tests' cluster helpers.
The `cluster up` flags (`--shards`, `--replicas`, `--vnodes`, `--base-port`) build the same object;
they are refused alongside a file rather than merged into it, so a file named `local-3x3` always
starts 3 x 3. Unknown keys, wrong types and values out of range raise `ConfigError` naming the
file, the setting and its range (the node configuration's mechanism, kvstore/config.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from kvstore.config import ConfigError, Section, build_section, setting

# The repository's topology files (a source checkout: the demo and the tests read them).
TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "cluster"
DEFAULT_ZONES = ("zone-a", "zone-b", "zone-c", "zone-d", "zone-e")
MAX_SHARDS = 64  # every replica is a process on this one machine
MAX_REPLICAS = 9  # a Raft group this size already spends most of its time replicating
PORTS_PER_REPLICA = 3  # gRPC, Raft, plaintext health


@dataclass
class Topology(Section):
    section = "topology"

    # Shown in messages; `load_topology` fills it with the file's stem when the file leaves it out.
    name: str = ""
    shards: int = setting(1, 1, MAX_SHARDS)
    replicas: int = setting(3, 1, MAX_REPLICAS)  # per shard; odd counts tolerate as many failures
    vnodes: int = setting(256, 1, 65_536)  # ring points per shard (kvstore/routing/ring.py)
    # Replica r of every shard is placed in zones[r % len(zones)], so each shard spans the zones.
    zones: list[str] = field(default_factory=lambda: list(DEFAULT_ZONES))
    # 0: free ports chosen when the cluster is created. Otherwise replica i (shard * replicas + r)
    # gets gRPC base_port + 2i and Raft base_port + 2i + 1, then every replica a health port,
    # base_port + 2n + i (n replicas in all): 3n consecutive ports.
    base_port: int = setting(0, 0, 65_535)
    # Replicas of the metadata group (kvstore/meta/store.py), the authority on the cluster map,
    # after the shards' ports when base_port is set (gRPC, Raft, health each). 0: no group, and the
    # map can never change.
    meta_replicas: int = setting(3, 0, MAX_REPLICAS)

    def check(self) -> None:
        if not isinstance(self.zones, list) or not self.zones:
            raise ConfigError(f"topology.zones must be a non-empty list of zone names, not {self.zones!r}")
        for zone in self.zones:
            if not isinstance(zone, str) or not zone.strip():
                raise ConfigError(f"topology.zones: every zone must be a non-empty string, not {zone!r}")
        if len(set(self.zones)) != len(self.zones):
            raise ConfigError(f"topology.zones names a zone twice: {self.zones}")
        if self.base_port:
            last = self.base_port + PORTS_PER_REPLICA * (self.replica_count + self.meta_replicas) - 1
            if self.base_port < 1024 or last > 65_535:
                raise ConfigError(
                    f"topology.base_port = {self.base_port}: {self.replica_count} replicas and "
                    f"{self.meta_replicas} metadata replicas need ports "
                    f"{self.base_port}..{last}, which must lie in [1024, 65535] (or 0 for free ports)"
                )

    @property
    def replica_count(self) -> int:
        return self.shards * self.replicas

    def zone_of(self, replica: int) -> str:
        return self.zones[replica % len(self.zones)]

    @property
    def label(self) -> str:
        return f"{self.name or 'topology'} ({self.shards} shard(s) x {self.replicas} replica(s))"

    def to_toml(self) -> str:
        data = {
            f: getattr(self, f)
            for f in ("name", "shards", "replicas", "vnodes", "zones", "base_port", "meta_replicas")
        }
        return tomli_w.dumps(data)


def load_topology(path: str | Path) -> Topology:
    """Read a topology file; every problem is a ConfigError that names the file."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no topology file at {path} (see the repository's cluster/)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"topology file {path} cannot be read: {err}") from None
    data.setdefault("name", path.stem)
    try:
        return build_section(Topology, data)
    except ConfigError as err:
        raise ConfigError(f"topology file {path}: {err}") from None


def named_topology(name: str) -> Topology:
    """One of the repository's topology files by name: `named_topology("local-3x3")`."""
    return load_topology(TOPOLOGY_DIR / f"{name}.toml")


def resolve_topology(
    topology: Topology | None,
    shards: int | None = None,
    replicas: int | None = None,
    vnodes: int | None = None,
    base_port: int | None = None,
    meta_replicas: int | None = None,
) -> Topology:
    """The topology a cluster is created with: the given one, or one built from the shape flags.

    Both at once is refused: silently overriding a file's shape with a flag would start a cluster
    the file's name does not describe, and a file silently winning would ignore what was typed."""
    flags = {
        "shards": shards,
        "replicas": replicas,
        "vnodes": vnodes,
        "base_port": base_port,
        "meta_replicas": meta_replicas,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    if topology is None:
        return Topology(**given)
    if given:
        names = ", ".join(f"{name} (--{name.replace('_', '-')})" for name in given)
        raise ConfigError(
            f"{names} given alongside the topology {topology.label}: the topology sets the cluster's "
            "shape; edit its file, or leave out one of the two"
        )
    return topology
