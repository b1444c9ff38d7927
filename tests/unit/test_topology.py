"""Topology files (the top-level cluster/ folder): each shipped file loads; unknown keys, wrong
types and values out of range are refused with the file and the setting named; a topology lays
out ports and zones as documented (cluster/README.md); the shape flags of `cluster up` build the
same object and are refused alongside a file. No processes: `create` only writes files."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from kvstore import cli
from kvstore.cluster.local import LocalCluster
from kvstore.cluster.topology import (
    DEFAULT_ZONES,
    TOPOLOGY_DIR,
    Topology,
    load_topology,
    named_topology,
    resolve_topology,
)
from kvstore.config import ConfigError, NodeConfig


def test_every_shipped_topology_file_loads() -> None:
    files = sorted(TOPOLOGY_DIR.glob("*.toml"))
    assert {f.stem for f in files} >= {"local-1x3", "local-3x3", "local-2x3-zones"}
    for path in files:
        topology = load_topology(path)
        assert topology.name == path.stem
    assert (named_topology("local-1x3").shards, named_topology("local-1x3").replicas) == (1, 3)
    assert (named_topology("local-3x3").shards, named_topology("local-3x3").replicas) == (3, 3)
    zones = named_topology("local-2x3-zones")
    assert (zones.shards, zones.replicas, len(zones.zones), zones.base_port) == (2, 3, 3, 7200)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("shard = 3\n", "unknown Topology setting(s): shard"),
        ("shards = 0\n", "topology.shards = 0 is out of range: it must be in [1, 64]"),
        ("shards = 65\n", "topology.shards = 65 is out of range"),
        ('shards = "3"\n', "topology.shards must be an integer, not '3'"),
        ("replicas = 10\n", "topology.replicas = 10 is out of range: it must be in [1, 9]"),
        ("replicas = 2.5\n", "topology.replicas must be an integer"),
        ("replicas = true\n", "topology.replicas must be an integer, not True"),
        ("vnodes = 0\n", "topology.vnodes = 0 is out of range"),
        ("zones = []\n", "topology.zones must be a non-empty list"),
        ('zones = "zone-a"\n', "topology.zones must be a non-empty list"),
        ('zones = ["a", "a"]\n', "topology.zones names a zone twice"),
        ('zones = ["a", ""]\n', "every zone must be a non-empty string"),
        ("zones = [1]\n", "every zone must be a non-empty string, not 1"),
        ("base_port = 80\n", "topology.base_port = 80: 3 replicas and 3 metadata replicas need ports 80..97"),
        ("shards = 3\nbase_port = 65520\n", "9 replicas and 3 metadata replicas need ports 65520..65555"),
        ("base_port = 70000\n", "topology.base_port = 70000 is out of range"),
        ("name = 3\n", "topology.name must be a string"),
        ("shards = \n", "cannot be read"),
    ],
)
def test_a_bad_topology_file_is_refused_naming_file_and_setting(
    tmp_path: Path, text: str, named: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_topology(path)
    assert str(path) in str(err.value) and named in str(err.value), str(err.value)


def test_a_missing_topology_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no topology file at .*nowhere.toml"):
        load_topology(tmp_path / "nowhere.toml")


def test_defaults_are_those_of_cluster_up_without_flags(tmp_path: Path) -> None:
    empty = load_topology(_write(tmp_path, "# nothing\n"))
    assert (empty.shards, empty.replicas, empty.vnodes, empty.base_port) == (1, 3, 256, 0)
    assert empty.zones == list(DEFAULT_ZONES) and empty.name == "t"
    assert resolve_topology(None) == Topology()
    assert resolve_topology(None, shards=2, vnodes=16) == Topology(shards=2, vnodes=16)


def test_fixed_ports_and_zones_are_laid_out_as_documented(tmp_path: Path) -> None:
    topology = named_topology("local-2x3-zones")
    cluster = LocalCluster(tmp_path / "c")
    cluster_map = cluster.create(topology=topology)
    base, n = topology.base_port, topology.replica_count
    assert [s.id for s in cluster_map.shards] == [0, 1] and cluster_map.vnodes_per_shard == topology.vnodes
    for shard in cluster_map.shards:
        assert [r.zone for r in shard.replicas] == topology.zones  # one replica per zone
        for r, replica in enumerate(shard.replicas):
            i = shard.id * topology.replicas + r
            config = NodeConfig.load(tmp_path / "c" / "nodes" / f"{replica.name}.toml")
            assert config.listen == replica.address == f"127.0.0.1:{base + 2 * i}"
            assert config.raft_bind == replica.raft_address == f"127.0.0.1:{base + 2 * i + 1}"
            assert config.health_listen == f"127.0.0.1:{base + 2 * n + i}"
            assert config.zone == topology.zones[r]
    # The directory keeps what it was made from.
    assert load_topology(cluster.topology_path) == topology


def test_free_ports_when_no_base_port(tmp_path: Path) -> None:
    cluster_map = LocalCluster(tmp_path / "c").create(topology=named_topology("local-3x3"))
    addresses = [a for s in cluster_map.shards for r in s.replicas for a in (r.address, r.raft_address)]
    assert len(addresses) == 18 and len(set(addresses)) == 18
    assert [r.zone for r in cluster_map.shards[2].replicas] == ["zone-a", "zone-b", "zone-c"]


def test_create_refuses_a_shape_and_a_topology_together(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"shards \(--shards\) given alongside the topology local-3x3"):
        cluster.create(shards=2, topology=named_topology("local-3x3"))
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="topology.replicas = 0 is out of range"):
        cluster.create(replicas=0)  # the flags' shape is checked the same way
    assert not (tmp_path / "c").exists()


def _up(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["cluster", "up", "--dir", str(tmp_path / "c"), *args])
    return code, capsys.readouterr().err


def test_cli_refuses_shape_flags_beside_a_topology(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = str(TOPOLOGY_DIR / "local-3x3.toml")
    code, err = _up(tmp_path, capsys, "--topology", file, "--shards", "2", "--base-port", "7000")
    assert code == 2
    assert "shards (--shards), base_port (--base-port) given alongside the topology local-3x3" in err
    assert not (tmp_path / "c").exists()  # refused before anything was written or started


def test_cli_names_a_bad_file_and_a_bad_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps({"shards": 2, "replica": 3}))
    code, err = _up(tmp_path, capsys, "--topology", str(bad))
    assert code == 2 and f"topology file {bad}: unknown Topology setting(s): replica" in err
    code, err = _up(tmp_path, capsys, "--shards", "0")
    assert code == 2 and "topology.shards = 0 is out of range: it must be in [1, 64]" in err
    assert not (tmp_path / "c").exists()


def test_demo_refuses_a_topology_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "one.toml"
    one.write_text("shards = 1\n")
    args = ["demo", "--topology", str(one), "--dir", str(tmp_path / "d"), "--results", str(tmp_path / "r")]
    assert cli.main(args) == 2
    assert "the demo needs at least 2 shards" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    # Its default is the shipped 3 x 3 file.
    from kvstore.demo import _topology

    assert _topology(None) == named_topology("local-3x3")
