"""Configuration range checks (issue 12, item 8): every numeric setting has a range, checked
whenever a section is built (TOML load, flags, code), with an error naming the setting, its value
and the range; a node with a bad setting does not start."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import ConfigError, Limits, NodeConfig, RaftSettings, ServerSettings, StorageSettings
from tests.conftest import write_node_config

_SECTIONS = {"limits": Limits, "raft": RaftSettings, "storage": StorageSettings, "server": ServerSettings}


def test_every_numeric_setting_has_a_range_that_holds_its_default() -> None:
    for cls in (*_SECTIONS.values(), NodeConfig):
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float"):
                assert "range" in f.metadata, f"{cls.__name__}.{f.name} has no range (use config.setting)"
                lo, hi = f.metadata["range"]
                if f.default is not dataclasses.MISSING:
                    assert lo <= f.default <= hi, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize(
    ("section", "setting", "value", "message"),
    [
        (
            "storage",
            "max_dedup_sessions",
            0,
            "storage.max_dedup_sessions = 0 is out of range: it must be in [1, ",
        ),
        ("storage", "dedup_retention_seconds", -5, "storage.dedup_retention_seconds = -5 is out of range"),
        ("raft", "min_timeout", -1.0, "raft.min_timeout = -1.0 is out of range: it must be in [0.05, 60.0]"),
        ("server", "write_timeout", float("nan"), "server.write_timeout = nan is out of range"),
        ("server", "max_concurrent_rpcs", 0, "server.max_concurrent_rpcs = 0 is out of range"),
        ("server", "max_entry_bytes", 32 << 20, "server.max_entry_bytes = 33554432 is out of range"),
        ("limits", "max_request_bytes", 64 << 20, "limits.max_request_bytes = 67108864 is out of range"),
        ("limits", "max_batch_keys", "many", "limits.max_batch_keys must be an integer, not 'many'"),
        ("limits", "max_batch_keys", 1.5, "limits.max_batch_keys must be an integer"),
        ("raft", "insecure", 1, "raft.insecure must be true or false"),
        ("storage", "durability", "sometimes", "storage.durability = 'sometimes': must be one of fsync"),
        ("storage", "fsync", False, 'setting fsync was renamed durability ("fsync" or "none"'),
        ("raft", "max_timeout", 0.5, "raft.min_timeout (0.8) must be below raft.max_timeout (0.5)"),
        ("limits", "default_scan_limit", 20_000, "limits.default_scan_limit (20000) must not exceed"),
        (
            "limits",
            "max_value_bytes",
            8 << 20,
            "limits.max_request_bytes (8388608) must hold one key and value",
        ),
        ("server", "max_concurrent_ops", 5000, "server.max_concurrent_ops (5000) must allow one Batch of"),
    ],
)
def test_out_of_range_settings_are_refused_at_load(
    tmp_path: Path, section: str, setting: str, value: Any, message: str
) -> None:
    path = write_node_config(tmp_path, **{section: {setting: value}})
    with pytest.raises(ConfigError) as info:
        NodeConfig.load(path)
    assert message in str(info.value)


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="server.max_pending_proposals = 0"):
        ServerSettings(max_pending_proposals=0)
    with pytest.raises(ConfigError, match="server.max_pending_bytes"):
        NodeConfig(
            name="n",
            shard=0,
            listen="a",
            raft_bind="b",
            raft_advertise="b",
            peers=[],
            data_dir="d",
            cluster_map="m",
            server=ServerSettings(max_pending_bytes=4 << 20),
        )


def test_a_removed_setting_is_refused_with_the_reason(tmp_path: Path) -> None:
    """limits.max_request_id_bytes is gone (a request id has a fixed shape, checked in one place):
    a config that still names it does not start, and the error says why instead of 'unknown'."""
    path = write_node_config(tmp_path, limits={"max_request_id_bytes": 64})
    with pytest.raises(ConfigError, match="max_request_id_bytes was removed: a request id has a fixed shape"):
        NodeConfig.load(path)
