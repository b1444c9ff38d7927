"""Configuration range checks (issue 12, item 8): every numeric setting has a range, checked
whenever a section is built (TOML load, flags, code), with an error naming the setting, its value
and the range; a node with a bad setting does not start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import write_node_config


def test_a_node_with_an_out_of_range_setting_does_not_start(tmp_path: Path) -> None:
    path = write_node_config(tmp_path, storage={"max_dedup_sessions": 0})
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "storage.max_dedup_sessions = 0 is out of range" in result.stderr
