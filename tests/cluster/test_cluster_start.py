"""`kvstore cluster up` and `cluster start NODE` succeed only when every node they started serves as
a member of its Raft group; otherwise they exit 1 naming each node that does not, with the line of
its log that says why, and stop what they started. A node refuses a taken port at start with one
line naming the setting and the address (kvstore/ports.py). Real node processes on loopback; a port
is "taken" by a listening socket this test holds on the port a replica is configured to use."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.cluster.local import LocalCluster
from kvstore.cluster.status import last_error_line, start_problem
from kvstore.ports import ListenError, check_can_listen
from tests.conftest import TEST_RAFT, running_cluster, wait_until

SETTINGS = ("listen", "raft_bind", "health_listen")  # every address a node listens on


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def _holding(address: str) -> Iterator[socket.socket]:
    """Listen on `address` (as another program would) until the block ends. SO_REUSEADDR: the
    port may still have TIME_WAIT connections of a node just killed; retried for a few seconds
    while the kernel still holds the killed node's closing connections (FIN_WAIT) on it."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 15
        while True:
            try:
                s.bind((host, int(port)))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        s.listen()
        yield s


def _free_block(count: int) -> int:
    """A base port with `count` consecutive ports free now, below Linux's ephemeral range."""
    for _ in range(200):
        base = random.randrange(20_000, 32_000 - count)
        try:
            for port in range(base, base + count):
                check_can_listen("probe", f"127.0.0.1:{port}")
        except ListenError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def _message(setting: str, address: str) -> str:
    return f"cannot listen on {address} (setting {setting!r}): the port is in use by another process"


def _created(directory: Path) -> LocalCluster:
    cluster = LocalCluster(directory)
    cluster.create(shards=1, replicas=3, raft=TEST_RAFT)
    return cluster


def _replica(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return next(r for s in cluster.status() for r in s["replicas"] if r["node"] == name)


def _nothing_running(cluster: LocalCluster) -> bool:
    return all(cluster.pid(name) is None for name in cluster.node_names())


def test_a_healthy_cluster_up_exits_0_with_every_replica_a_member(tmp_path: Path) -> None:
    """Fixed ports (`--base-port`, a free block found now); then `cluster status` exits 1 with a
    node dead, 0 once `cluster start` has brought it back; `--json` exits 0 either way."""
    directory = tmp_path / "c"
    base = _free_block(3 * (6 + 3))  # 2 x 3 replicas and the metadata group's 3
    cluster = LocalCluster(directory)
    try:
        started = time.monotonic()
        up = _cli("cluster", "up", "--dir", str(directory), "--shards", "2", "--base-port", str(base))
        up_seconds = time.monotonic() - started
        assert up.returncode == 0, up.stdout + up.stderr
        assert "cluster up:" in up.stdout and up.stdout.count("health=serving") == 6 + 3
        print(f"cluster up 2x3: {up_seconds:.2f}s")
        # Right after `up` returns, every replica is a serving member (no waiting here).
        shards = cluster.status()
        for shard in shards:
            assert shard["leader"]
            for replica in shard["replicas"]:
                assert start_problem(replica, shard["leader"]) is None, replica
                assert replica["term"] >= 1 and replica["health"] == "serving"
        document = json.loads(_cli("cluster", "status", "--dir", str(directory), "--json").stdout)
        assert document["healthy"] is True
        assert all(r["caught_up"] for s in document["shards"] for r in s["replicas"])
        assert cluster.node_config("s0r0").listen == f"127.0.0.1:{base}"
        assert _cli("cluster", "status", "--dir", str(directory)).returncode == 0
        # Again on a running cluster: nothing to start, every node checked, exit 0.
        again = _cli("cluster", "up", "--dir", str(directory))
        assert again.returncode == 0 and "cluster up:" in again.stdout, again.stdout + again.stderr
        # A running node that does not answer fails it too, and what was running keeps running.
        assert _cli("cluster", "kill", "--dir", str(directory), "s0r0", "--signal", "STOP").returncode == 0
        try:
            paused = _cli("cluster", "up", "--dir", str(directory), "--timeout", "2")
        finally:
            assert (
                _cli("cluster", "kill", "--dir", str(directory), "s0r0", "--signal", "CONT").returncode == 0
            )
        assert paused.returncode == 1, paused.stdout + paused.stderr
        assert "within 2s:\n  s0r0: paused; its log says: " in paused.stderr, paused.stderr
        assert "cluster up: stopped nothing" in paused.stderr
        assert all(cluster.pid(name) for name in cluster.node_names())
        wait_until(lambda: start_problem(_replica(cluster, "s0r0"), cluster.leader_of(0)) is None, 15, 0.5)

        victim = "s1r1"
        assert _cli("cluster", "kill", "--dir", str(directory), victim).returncode == 0
        table = _cli("cluster", "status", "--dir", str(directory))
        assert table.returncode == 1 and f"{victim} is down" in table.stderr, table.stderr
        as_json = _cli("cluster", "status", "--dir", str(directory), "--json")
        assert as_json.returncode == 0 and json.loads(as_json.stdout)["healthy"] is False

        start = _cli("cluster", "start", "--dir", str(directory), victim)
        assert start.returncode == 0, start.stdout + start.stderr
        assert "a member of its Raft group" in start.stdout
        replica = _replica(cluster, victim)
        assert start_problem(replica, cluster.leader_of(1)) is None, replica
        # Caught up at once; the table needs every node serving and every shard led.
        wait_until(lambda: _cli("cluster", "status", "--dir", str(directory)).returncode == 0, 15, 0.5)
    finally:
        cluster.down()


@pytest.mark.parametrize("setting", ["listen", "raft_bind"])
def test_cluster_up_fails_naming_the_node_whose_port_is_taken(tmp_path: Path, setting: str) -> None:
    cluster = _created(tmp_path / "c")
    address = getattr(cluster.node_config("s0r1"), setting)
    try:
        with _holding(address):
            started = time.monotonic()
            up = _cli("cluster", "up", "--dir", str(cluster.dir), "--timeout", "60")
            seconds = time.monotonic() - started
        print(f"cluster up with {setting} of s0r1 taken: exit {up.returncode} after {seconds:.2f}s")
        assert up.returncode == 1, up.stdout + up.stderr
        assert "cluster up:" not in up.stdout  # no success line
        assert re.search(
            rf"s0r1: exited with code 2; its log says: error: {re.escape(_message(setting, address))}",
            up.stderr,
        ), up.stderr
        assert "s0r0:" not in up.stderr and "s0r2:" not in up.stderr  # they came up: not named
        assert "stopped the 3 node(s) it started (s0r0, s0r1, s0r2)" in up.stderr
        assert seconds < 30  # it fails when the node exits, not at the timeout
        assert _nothing_running(cluster)
    finally:
        cluster.down()


@pytest.mark.parametrize("setting", ["listen", "raft_bind"])
def test_cluster_start_fails_naming_the_node_whose_port_is_taken(tmp_path: Path, setting: str) -> None:
    with running_cluster(tmp_path / "c", raft=TEST_RAFT) as cluster:
        name = "s0r2"
        cluster.kill(name)
        address = getattr(cluster.node_config(name), setting)
        with _holding(address):
            start = _cli("cluster", "start", "--dir", str(cluster.dir), name, "--timeout", "60")
        assert start.returncode == 1, start.stdout + start.stderr
        assert (
            f"{name}: exited with code 2; its log says: error: {_message(setting, address)}" in start.stderr
        )
        assert f"stopped the 1 node(s) it started ({name})" in start.stderr
        assert cluster.pid(name) is None
        assert cluster.pid("s0r0") and cluster.pid("s0r1")  # what was running stays
        # The port free again, the same command succeeds.
        again = _cli("cluster", "start", "--dir", str(cluster.dir), name)
        assert again.returncode == 0, again.stdout + again.stderr


def test_cluster_start_fails_for_a_node_that_runs_outside_its_raft_group(tmp_path: Path) -> None:
    """A node that runs and serves gRPC but never joins its group (both peers frozen: no leader to
    join) is not "started": named with its role and term at the timeout, then stopped."""
    with running_cluster(tmp_path / "c", raft=TEST_RAFT) as cluster:
        name, frozen = "s0r2", ["s0r0", "s0r1"]
        cluster.kill(name)
        for peer in frozen:
            cluster.kill(peer, "STOP")
        try:
            started = time.monotonic()
            start = _cli("cluster", "start", "--dir", str(cluster.dir), name, "--timeout", "5")
            seconds = time.monotonic() - started
        finally:
            for peer in frozen:
                cluster.kill(peer, "CONT")
        assert start.returncode == 1, start.stdout + start.stderr
        assert (
            f"not serving as members of their Raft group within 5s:\n  {name}: running but not a member"
            in start.stderr
        )
        assert "leader=-" in start.stderr
        assert 5 <= seconds < 20
        assert cluster.pid(name) is None


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_node_started_directly_refuses_a_taken_port(tmp_path: Path, setting: str) -> None:
    cluster = _created(tmp_path / "c")
    config = cluster.node_config("s0r0")
    address = getattr(config, setting)
    with _holding(address):
        node = _cli("node", "--config", str(tmp_path / "c" / "nodes" / "s0r0.toml"), timeout=60)
    assert node.returncode == 2, node.stderr
    assert node.stderr.strip().splitlines()[-1].startswith(f"error: {_message(setting, address)}")
    assert node.stderr.count("error:") == 1 and "Traceback" not in node.stderr


# The window between the node's check and the servers' own bind: skip the check once, so the
# servers' bind is what fails (the port is held the whole time). The re-check that explains the
# failure runs for real.
_SKIP_FIRST_CHECK = textwrap.dedent(
    """
    import socket, sys
    import kvstore.server.node as node
    from kvstore.cli import main
    real, skipped = node.check_can_listen, []
    def check_once(setting, address, patience=0.0):
        if setting == sys.argv[2] and not skipped:
            skipped.append(setting)
            return
        real(setting, address, patience)
    node.check_can_listen = check_once
    sys.exit(main(["node", "--config", sys.argv[1]]))
    """
)


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_port_taken_after_the_check_is_still_a_clear_exit(tmp_path: Path, setting: str) -> None:
    """pysyncobj would retry the Raft bind forever in silence, grpc raise "Failed to bind"."""
    cluster = _created(tmp_path / "c")
    address = getattr(cluster.node_config("s0r0"), setting)
    script = tmp_path / "skip_check.py"
    script.write_text(_SKIP_FIRST_CHECK)
    with _holding(address):
        started = time.monotonic()
        node = subprocess.run(
            [sys.executable, str(script), str(cluster.dir / "nodes" / "s0r0.toml"), setting],
            capture_output=True,
            text=True,
            timeout=60,
        )
        seconds = time.monotonic() - started
    assert node.returncode == 2, node.stderr
    assert node.stderr.strip().splitlines()[-1].startswith(f"error: {_message(setting, address)}")
    assert seconds < 20


def test_the_log_line_that_says_why(tmp_path: Path) -> None:
    log = tmp_path / "n.log"
    log.write_text(
        "2026-01-01 INFO kvstore.server.node: starting\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1\n'
        "RuntimeError: Failed to bind to address 127.0.0.1:7100; set GRPC_VERBOSITY=debug\n"
        "2026-01-01 INFO kvstore.server.node: shutting down\n"
    )
    assert last_error_line(log).startswith("RuntimeError: Failed to bind to address 127.0.0.1:7100")
    log.write_text("old run: error: something\n2026-01-01 INFO x: fine\n")
    assert last_error_line(log, start=len("old run: error: something\n")) == "2026-01-01 INFO x: fine"
    assert last_error_line(tmp_path / "none.log") == "(no log)"


def test_a_second_cluster_on_the_ports_of_a_running_one_fails_and_never_borrows_its_nodes(
    tmp_path: Path,
) -> None:
    """Found by a new-user walk: `cluster up` of a second cluster on a running cluster's ports
    reported success, its status showed the first cluster's nodes as its own, and its clients
    read the first cluster's data. Now each node's Admin.Status carries its pid: a node of
    another process answering at a replica's address is `foreign`, and `up` fails naming every
    node with the reason from its log."""
    base = _free_block(3 * 3)
    first = LocalCluster(tmp_path / "first")
    first.create(shards=1, replicas=3, base_port=base, raft=TEST_RAFT)
    second = LocalCluster(tmp_path / "second")
    second.create(shards=1, replicas=3, base_port=base, raft=TEST_RAFT)
    try:
        up = _cli("cluster", "up", "--dir", str(first.dir))
        assert up.returncode == 0, up.stdout + up.stderr
        again = _cli("cluster", "up", "--dir", str(second.dir), "--timeout", "60")
        assert again.returncode == 1, again.stdout + again.stderr
        assert "cluster up:" not in again.stdout
        for name in ("s0r0", "s0r1", "s0r2"):
            assert re.search(
                rf"{name}: exited with code 2; its log says: error: cannot listen on", again.stderr
            )
        assert _nothing_running(second)
        # The status of the stopped second cluster shows no node of the first as its own.
        status = _cli("cluster", "status", "--dir", str(second.dir), "--json")
        document = json.loads(status.stdout)
        roles = {r["node"]: r["role"] for s in document["shards"] for r in s["replicas"]}
        assert set(roles.values()) == {"down"} and document["healthy"] is False
        # And while a second-cluster node is alive but another process answers at its address,
        # the status says so instead of reporting the other node's state.
        second.start("s0r1")  # exits within seconds (its port is taken)
        replica = next(r for s in second.status(timeout=1.0) for r in s["replicas"] if r["node"] == "s0r1")
        assert replica["role"] in ("foreign", "down"), replica
        if replica["role"] == "foreign":
            assert "another process (pid" in replica["health"] and start_problem(replica, "s0r0")
    finally:
        second.down()
        first.down()


def test_cluster_start_brings_back_a_whole_shard_at_once(tmp_path: Path) -> None:
    """Every replica of a shard stopped: one alone cannot become a member (no quorum), so `cluster
    start` takes several nodes, starts them all, then waits for each."""
    with running_cluster(tmp_path / "c", raft=TEST_RAFT) as cluster:
        names = cluster.node_names()
        for name in names:
            cluster.kill(name, "TERM")
        wait_until(lambda: _nothing_running(cluster), timeout=30)
        start = _cli("cluster", "start", "--dir", str(cluster.dir), *names, "--timeout", "60")
        assert start.returncode == 0, start.stdout + start.stderr
        for name in names:
            assert f"started {name} (pid " in start.stdout
        shards = cluster.status(timeout=1.0)
        assert all(start_problem(r, s["leader"]) is None for s in shards for r in s["replicas"])
