"""The apply path with real pysyncobj and LMDB (a one-replica shard): nothing storage does wedges it.

- An op storage refuses deterministically (a key over LMDB's 511 bytes) gets an error result, writes
  nothing (not even the other keys of its multi-put), and the log moves on, also after a restart.
- A transient storage failure is retried with backoff (not every tick), reported by
  `storage_problem()`, and the proposer still gets its result once storage works again.
- Failures that last past storage.io_failure_limit_seconds stop the node (on_fatal), once.
- A snapshot whose start fails releases its read transaction (map growth keeps working).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from kvstore import errors


def test_a_512_byte_key_is_refused_at_once_and_the_shard_keeps_going(make_cluster: Any) -> None:
    """Issue 12's reproduction: this put used to end in UnknownOutcome after 10 s and wedge the shard
    (applied index stuck behind commit, on every replica, across restarts)."""
    from tests.conftest import client, wait_until

    cluster = make_cluster()
    with client(cluster) as kv:
        started = time.monotonic()
        with pytest.raises(errors.InvalidArgument, match="512 bytes"):
            kv.put(b"k" * 512, b"v")
        assert time.monotonic() - started < 2.0
        kv.put(b"k" * 511, b"longest")  # the limit itself is fine
        last = kv.put(b"next", b"1")
        assert kv.get(b"k" * 511) == b"longest" and kv.get(b"next") == b"1"  # strong reads

    def caught_up() -> bool:
        # Every replica applied the last write (read barriers are not stored in LMDB's index).
        replicas = cluster.status()[0]["replicas"]
        return all(r["applied_index"] == last and r["key_count"] == 2 for r in replicas)

    wait_until(caught_up, 10)


def test_a_node_configured_with_keys_longer_than_lmdb_takes_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kvstore.cluster.local import LocalCluster

    cluster = LocalCluster(tmp_path / "c")
    cluster.create(shards=1, replicas=1)
    config_path = cluster.dir / "nodes" / "s0r0.toml"
    config_path.write_text(config_path.read_text().replace("max_key_bytes = 511", "max_key_bytes = 4096"))
    run = subprocess.run(
        [sys.executable, "-m", "kvstore", "node", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "limits.max_key_bytes = 4096" in run.stderr and "at most 511" in run.stderr
