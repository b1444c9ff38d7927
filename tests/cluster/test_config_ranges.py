"""Configuration range checks (issue 12, item 8): every numeric setting has a range, checked
whenever a section is built (TOML load, flags, code), with an error naming the setting, its value
and the range; a node with a bad setting does not start."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from kvstore.config import NodeConfig


def _node(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    config = NodeConfig(
        name="n",
        shard=0,
        listen="127.0.0.1:1",
        raft_bind="127.0.0.1:2",
        raft_advertise="127.0.0.1:2",
        peers=[],
        data_dir=str(tmp_path / "d"),
        cluster_map=str(tmp_path / "m.json"),
    )
    data = dataclasses.asdict(config)
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_a_node_with_an_out_of_range_setting_does_not_start(tmp_path: Path) -> None:
    path = _node(tmp_path, storage={"max_dedup_sessions": 0})
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "storage.max_dedup_sessions = 0 is out of range" in result.stderr
