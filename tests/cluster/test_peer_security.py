"""Issue 12 item 2: nothing from an unauthenticated peer is deserialized (real node processes).

Every attack dials a default `cluster up` node's Raft port directly, as anyone on the host could."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.cluster.local import LocalCluster
from kvstore.replication.peer_cipher import PeerCipher
from kvstore.replication.peer_frames import hello, read_hello
from kvstore.replication.peer_transport import read_secret
from kvstore.storage.identity import IDENTITY_FILE
from tests.conftest import TEST_RAFT, client, running_cluster, wait_until

FRAME = struct.Struct("=i")


class _Touch:
    """Unpickling this runs `touch <path>`: the issue's os.system reproduction, made harmless."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def exploit_frame(marker: Path, cipher: Any = None) -> bytes:
    data = zlib.compress(pickle.dumps(_Touch(marker), 2), 3)
    if cipher is not None:
        data = cipher.encrypt_at_time(data, int(time.monotonic()))
    return FRAME.pack(len(data)) + data


class RaftDialer:
    """Speaks pysyncobj 0.3.17's framing and (with a password) its encrypted handshake."""

    def __init__(self, address: str, password: str | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5.0)
        self.cipher = PeerCipher(password.encode()) if password else None
        self.send_key: bytes | None = None
        self.recv_key: bytes | None = None

    def frame(self, message: Any) -> bytes:
        if self.send_key is not None:
            message = (self.send_key, message)
        data = zlib.compress(pickle.dumps(message, 5), 3)
        if self.cipher is not None:
            data = self.cipher.encrypt_at_time(data, int(time.monotonic()))
        return FRAME.pack(len(data)) + data

    def send(self, message: Any) -> None:
        self.sock.sendall(self.frame(message))

    def recv(self, timeout: float = 3.0) -> Any:
        """The next message, or raises ConnectionError when the node closed the connection."""
        self.sock.settimeout(timeout)
        header = self._exactly(FRAME.size)
        data = self._exactly(FRAME.unpack(header)[0])
        if self.cipher is not None:
            data = self.cipher.decrypt(data)
        message = pickle.loads(zlib.decompress(data))  # from our own node, in a test
        if self.recv_key is not None:
            key, message = message
            assert key == self.recv_key
        return message

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the node")
            out += chunk
        return out

    def handshake(self) -> None:
        self.recv_key = os.urandom(32)
        self.send(self.recv_key)
        self.send_key = self.recv()

    def closed_by_node(self, timeout: float = 5.0) -> bool:
        """True once the node closed the connection (anything it sends first is drained)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A default (secured) 2 shards x 3 replicas cluster."""
    with running_cluster(tmp_path_factory.mktemp("secured"), shards=2) as cluster:
        yield cluster


def raft_port(cluster: LocalCluster, name: str) -> str:
    return cluster.node_config(name).raft_bind


def password(cluster: LocalCluster, shard: int) -> str:
    return read_secret(cluster.secret_path(shard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def assert_serves(cluster: LocalCluster, key: bytes) -> None:
    with client(cluster) as kv:
        kv.put(key, b"still-here")
        assert kv.get(key) == b"still-here"


def test_secrets_are_per_shard_files_0600_and_configs_only_name_them(secured: LocalCluster) -> None:
    paths = [secured.secret_path(s) for s in (0, 1)]
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == ["0o600", "0o600"]
    assert oct(paths[0].parent.stat().st_mode & 0o777) == "0o700"
    assert password(secured, 0) != password(secured, 1)
    for name in secured.node_names():
        text = (secured.dir / "nodes" / f"{name}.toml").read_text()
        assert "password" not in text
        assert password(secured, int(name[1])) not in text
        assert f'secret_file = "{secured.secret_path(int(name[1]))}"' in text


def test_pickled_os_system_frame_does_not_run(secured: LocalCluster, tmp_path: Path) -> None:
    """The issue's reproduction: plain, encrypted with a wrong secret, and with the right secret
    (then the restricted unpickler refuses the global). None runs; each connection is closed."""
    target = raft_port(secured, "s0r0")
    cases = {
        "plain": None,
        "wrong secret": PeerCipher(b"not-the-secret-" * 4),
        "right secret": PeerCipher(password(secured, 0).encode()),
    }
    for case, cipher in cases.items():
        marker = tmp_path / f"pwned-{case.replace(' ', '-')}"
        frame = exploit_frame(marker, cipher)
        if cipher is None:
            assert len(frame) < 120  # the frame was 93 bytes
        dialer = RaftDialer(target)
        dialer.sock.sendall(frame)
        assert dialer.closed_by_node(), case
        dialer.close()
        time.sleep(0.3)
        assert not marker.exists(), f"{case}: the pickled call ran"
    assert_serves(secured, b"after-exploit")


def test_readonly_peer_with_the_secret_gets_nothing(secured: LocalCluster) -> None:
    dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 0))
    dialer.handshake()  # the secret is right: the handshake itself works
    dialer.send("readonly")
    assert dialer.closed_by_node()
    dialer.close()


@pytest.mark.parametrize("admin", [["status"], ["add", "127.0.0.1:1"], ["transfer", "127.0.0.1:1"]])
def test_admin_messages_are_refused(secured: LocalCluster, admin: list[str]) -> None:
    dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 0))
    dialer.handshake()
    dialer.send(admin)
    with pytest.raises(ConnectionError):
        dialer.recv()  # no answer: closed
    dialer.close()


def test_a_node_of_another_shard_cannot_talk_to_this_one(secured: LocalCluster) -> None:
    shard0_member = secured.node_config("s0r1").raft_advertise
    # Shard 1's secret does not even get through the handshake with a shard 0 node.
    dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 1))
    dialer.recv_key = os.urandom(32)
    dialer.send(dialer.recv_key)
    with pytest.raises(ConnectionError):
        dialer.recv()
    dialer.close()
    # With shard 0's secret, a shard 1 member's address is not a member here.
    dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 0))
    dialer.handshake()
    dialer.send(secured.node_config("s1r0").raft_advertise)
    assert dialer.closed_by_node()
    dialer.close()
    # A shard 0 member's address without its hello (cluster id, incarnation), or with another
    # cluster's id or another incarnation (its data wiped), is refused too.
    member_hello = _hello_of(secured, "s0r1")
    for wrong in [
        None,
        {**member_hello, "cluster": "another-cluster"},
        {**member_hello, "incarnation": "0" * 16},
    ]:
        dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 0))
        dialer.handshake()
        padding = {"type": "test_padding", "pad": b"x"}
        dialer.sock.sendall(dialer.frame(shard0_member) + dialer.frame(wrong or padding))
        assert dialer.closed_by_node(), wrong
        dialer.close()
    # Control: the same handshake naming a shard 0 member, with its hello, is accepted (the
    # connection stays open, and the node answers with its own hello), also with a 1 MiB message
    # pipelined right behind, as a member may send it.
    dialer = RaftDialer(raft_port(secured, "s0r0"), password(secured, 0))
    dialer.handshake()
    padding = {"type": "test_padding", "pad": os.urandom(1 << 20)}  # a type pysyncobj ignores
    dialer.sock.sendall(dialer.frame(shard0_member) + dialer.frame(member_hello) + dialer.frame(padding))
    answer = read_hello(dialer.recv())
    assert answer is not None and answer.name == "s0r0" and answer.cluster == member_hello["cluster"]
    assert not dialer.closed_by_node(timeout=1.0)
    dialer.close()
    assert_serves(secured, b"after-shard-1")


def _hello_of(cluster: LocalCluster, name: str) -> dict[str, Any]:
    """The hello member `name` sends (its data dir's identity), as peer_transport does."""
    config = cluster.node_config(name)
    identity = json.loads((Path(config.data_dir) / IDENTITY_FILE).read_text())
    return hello(config.cluster.id, identity["incarnation"], name)


def test_connection_that_never_identifies_is_closed(secured: LocalCluster) -> None:
    timeout = secured.node_config("s0r0").raft.connection_timeout
    dialer = RaftDialer(raft_port(secured, "s0r0"))
    started = time.monotonic()
    assert dialer.closed_by_node(timeout=timeout + 3.0)
    assert time.monotonic() - started >= timeout * 0.9
    dialer.close()


def test_a_flood_of_idle_connections_does_not_keep_members_out(secured: LocalCluster) -> None:
    """More unidentified connections than the node holds: the oldest are closed, and members (which
    reconnect after a leader change) still get in."""
    flood = [RaftDialer(raft_port(secured, "s0r0")) for _ in range(80)]
    try:
        assert flood[0].closed_by_node(timeout=1.0)  # evicted at once by the newer ones
        leader = secured.leader_of(0)
        assert leader
        secured.kill(leader)  # every link to it drops; the rest redial the new leader
        secured.start(leader)
        assert_serves(secured, b"after-flood")
    finally:
        for dialer in flood:
            dialer.close()


def test_huge_frame_claims_are_refused_before_buffering(secured: LocalCluster) -> None:
    """A 2 GiB length claim, then 256 MiB streamed: the node closes at the header; RSS stays flat."""
    pid = secured.pid("s0r0")
    assert pid
    before = rss_kib(pid)
    sent = 0
    dialer = RaftDialer(raft_port(secured, "s0r0"))
    chunk = os.urandom(1 << 20)
    with pytest.raises(OSError):  # reset by the node long before 256 MiB
        dialer.sock.sendall(FRAME.pack(2**31 - 1))
        for _ in range(256):
            dialer.sock.sendall(chunk)
            sent += len(chunk)
    dialer.close()
    after = rss_kib(pid)
    print(
        f"2 GiB claim: {sent >> 20} MiB accepted by the socket before the reset; RSS {before} -> {after} KiB"
    )
    assert sent < 64 << 20
    assert after - before < 16 << 10  # KiB: nothing near the claimed size was buffered
    # A decompression bomb with the right secret: 4 KiB on the wire, 64 MiB inflated.
    cipher = PeerCipher(password(secured, 0).encode())
    bomb = cipher.encrypt_at_time(zlib.compress(b"\0" * (64 << 20), 9), int(time.monotonic()))
    dialer = RaftDialer(raft_port(secured, "s0r0"))
    dialer.sock.sendall(FRAME.pack(len(bomb)) + bomb)
    assert dialer.closed_by_node()
    dialer.close()
    assert rss_kib(pid) - before < 16 << 10
    assert_serves(secured, b"after-huge-frames")


def _node(cluster: LocalCluster, name: str, *extra: str) -> subprocess.Popen[str]:
    config = cluster.dir / "nodes" / f"{name}.toml"
    return subprocess.Popen(
        [sys.executable, "-m", "kvstore", "node", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        return None, out


def test_node_refuses_to_start_without_a_secret_unless_insecure(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    cluster.create(shards=1, replicas=1)
    config = cluster.dir / "nodes" / "s0r0.toml"
    text = config.read_text()
    config.write_text(text.replace(f'secret_file = "{cluster.secret_path(0)}"', 'secret_file = ""'))
    code, out = _finish(_node(cluster, "s0r0"), 60)
    assert code not in (0, None), out
    assert "no Raft secret" in out and "--insecure" in out

    # --insecure: starts (single replica, loopback) and says it is insecure.
    proc = _node(cluster, "s0r0", "--insecure")
    time.sleep(4.0)
    assert proc.poll() is None
    proc.terminate()
    _, out = _finish(proc, 20)
    assert "INSECURE" in out and "WARNING" in out

    # --insecure off loopback is refused.
    config.write_text(text.replace('raft_bind = "127.0.0.1:', 'raft_bind = "0.0.0.0:'))
    code, out = _finish(_node(cluster, "s0r0", "--insecure"), 60)
    assert code not in (0, None), out
    assert "loopback only" in out

    # An old config carrying `password` is refused with a pointer to secret_file.
    config.write_text(text.replace("[raft]\n", '[raft]\npassword = ""\n'))
    code, out = _finish(_node(cluster, "s0r0"), 60)
    assert code not in (0, None) and "secret_file" in out, out


def test_insecure_cluster_still_refuses_readonly_and_admin(tmp_path: Path) -> None:
    raft = dataclasses.replace(TEST_RAFT, insecure=True)
    with running_cluster(tmp_path / "insecure", raft=raft) as cluster:
        # No Raft secret (only the admin secret, which is not about Raft peers).
        assert sorted(p.name for p in (cluster.dir / "secrets").iterdir()) == ["admin.key"]
        assert "INSECURE" in cluster.log_path("s0r0").read_text()
        for first in ("readonly", ["status"]):
            dialer = RaftDialer(raft_port(cluster, "s0r0"))
            dialer.send(first)
            assert dialer.closed_by_node(), first
            dialer.close()
        marker = tmp_path / "pwned-insecure"
        dialer = RaftDialer(raft_port(cluster, "s0r0"))
        dialer.sock.sendall(exploit_frame(marker))
        assert dialer.closed_by_node()
        dialer.close()
        assert not marker.exists()
        assert_serves(cluster, b"insecure-still-serves")


def test_member_catches_up_through_large_encrypted_appends(tmp_path: Path) -> None:
    """The caps leave room for large legal messages: a follower that missed 16 MiB of entries (no
    snapshot in between) gets them in append-entries messages of several MiB and catches up.
    (Catching up this way churns elections, with or without encryption: pysyncobj has no PreVote and
    a multi-MiB batch holds the follower's tick thread past its election timeout.)"""
    raft = dataclasses.replace(TEST_RAFT, compaction_max_bytes=256 << 20)
    with running_cluster(tmp_path / "big", raft=raft) as cluster:
        leader = cluster.leader_of(0)
        lagging = next(n for n in cluster.node_names() if n != leader)
        cluster.kill(lagging)
        with client(cluster) as kv:
            for i in range(32):
                kv.put(b"big-%d" % i, os.urandom(512 << 10))
        cluster.start(lagging)

        def caught_up() -> bool:
            applied = [r["applied_index"] for r in cluster.status()[0]["replicas"]]
            return min(applied) == max(applied) > 32

        wait_until(caught_up, 90.0)
        logs = "".join(cluster.log_path(name).read_text() for name in cluster.node_names())
        assert "Raft peer connection closed" not in logs
        assert "installing snapshot" not in cluster.log_path(lagging).read_text()
