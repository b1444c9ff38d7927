"""Tests for the fault-injecting Raft proxy: raw TCP behaviour, then a real 3-node pysyncobj cluster.
(How the proxy reads pysyncobj's frames: tests/unit/test_peer_frames.py.)"""

from __future__ import annotations

import asyncio
import pickle
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf, SyncObjException, replicated

from kvstore.chaos.link_rules import LinkController
from kvstore.chaos.proxy import FaultProxy, ProxyCluster
from kvstore.cluster.local import LocalCluster
from kvstore.replication.peer_frames import encode_frame
from tests.conftest import TEST_RAFT, client, new_leader, wait_until

CLI_ADDR = "127.0.0.1:1"  # the address our test client announces, registered as replica "cli"
NOT_A_FRAME = b"\xff\xff\xff\xff"  # length -1: the proxy knows at once the dialer is anonymous


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    async def bounded() -> None:  # in this task, so a test sees no helper task of ours
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(bounded())


async def closed_soon(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True if the peer closed or reset the connection within timeout (extra bytes are drained)."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            data = await asyncio.wait_for(reader.read(65536), remaining)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        if not data:
            return True
    return False


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Bench:
    """A backend server, one proxy "srv" in front of it, and clients that dial through the proxy."""

    async def __aenter__(self) -> Bench:
        self.accepted: asyncio.Queue[Conn] = asyncio.Queue()
        self.backend = await asyncio.start_server(self._on_backend, "127.0.0.1", 0)
        backend_port = self.backend.sockets[0].getsockname()[1]
        self.controller = LinkController()
        self.controller.register("cli", CLI_ADDR)
        self.proxy = FaultProxy(
            "srv", ("127.0.0.1", 0), ("127.0.0.1", backend_port), self.controller, identify_timeout=0.5
        )
        await self.proxy.start()
        self.writers: list[asyncio.StreamWriter] = []
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.stop()
        for writer in self.writers:
            writer.transport.abort()
        self.backend.close()
        await self.backend.wait_closed()

    def _on_backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.accepted.put_nowait((reader, writer))

    async def dial(self, first: bytes) -> Conn:
        host, port = self.proxy.listen_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        self.writers.append(writer)
        writer.write(first)
        return reader, writer

    async def backend_conn(self, skip: int = 0) -> Conn:
        reader, writer = await asyncio.wait_for(self.accepted.get(), 5.0)
        if skip:
            await asyncio.wait_for(reader.readexactly(skip), 5.0)
        return reader, writer

    async def pair(self, identify: bool = True) -> tuple[Conn, Conn]:
        """(client side, backend side); an identified client announces CLI_ADDR like pysyncobj would."""
        frame = encode_frame(CLI_ADDR) if identify else NOT_A_FRAME
        client = await self.dial(frame)
        return client, await self.backend_conn(skip=len(frame))


# ---------------------------------------------------------------- plain TCP behind the proxy


def test_large_payload_and_many_connections_pass_intact() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            payload = NOT_A_FRAME + random.Random(1).randbytes(1024 * 1024)
            c_r, c_w = await bench.dial(payload)
            b_r, b_w = await bench.backend_conn()
            got = await asyncio.wait_for(b_r.readexactly(len(payload)), 10.0)
            assert got == payload
            b_w.write(got)  # and back the other way
            assert await asyncio.wait_for(c_r.readexactly(len(payload)), 10.0) == payload
            c_w.close()
            b_w.close()

            async def client(i: int) -> None:
                data = NOT_A_FRAME + f"conn-{i}-".encode() * 500
                r, w = await bench.dial(data)
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 10.0) == data  # read() = until EOF

            async def echo_backend(n: int) -> None:
                for _ in range(n):
                    r, w = await bench.backend_conn()
                    w.write(await asyncio.wait_for(r.read(), 10.0))
                    w.close()

            n = 40
            await asyncio.gather(echo_backend(n), *(client(i) for i in range(n)))
            assert bench.proxy.stats.accepted == n + 1
            assert await eventually(lambda: bench.proxy.links() == [])

    run(scenario())


async def read_msg(reader: asyncio.StreamReader, timeout: float = 2.0) -> object:
    """Read one pysyncobj-framed message (our own test data, so plain unpickling is fine)."""
    header = await asyncio.wait_for(reader.readexactly(4), timeout)
    (length,) = struct.unpack("=i", header)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return pickle.loads(zlib.decompress(body))


def test_delay_adds_latency_keeps_order_and_does_not_accumulate() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            (c_r, c_w), (b_r, b_w) = await bench.pair()
            bench.controller.delay("cli", "srv", 0.3)
            loop = asyncio.get_running_loop()
            sent: list[float] = []

            async def sender() -> None:
                for i in range(6):
                    sent.append(loop.time())
                    c_w.write(encode_frame(f"msg{i}"))
                    await asyncio.sleep(0.05)

            async def receiver() -> list[tuple[object, float]]:
                return [(await read_msg(b_r), loop.time()) for _ in range(6)]

            _, arrivals = await asyncio.gather(sender(), receiver())
            assert [msg for msg, _ in arrivals] == [f"msg{i}" for i in range(6)]
            for sent_at, (_, arrived_at) in zip(sent, arrivals, strict=True):
                assert arrived_at - sent_at >= 0.3 - 0.01
            # In-line sleeping would take 6 * 0.3 s; due-time release takes ~0.25 + 0.3 s.
            assert arrivals[-1][1] - sent[0] < 1.0

            start = loop.time()  # the reverse direction is not delayed
            b_w.write(encode_frame("pong"))
            assert await read_msg(c_r) == "pong"
            assert loop.time() - start < 0.2

            bench.controller.delay("cli", "srv", 0)  # removed
            start = loop.time()
            c_w.write(encode_frame("fast"))
            assert await read_msg(b_r) == "fast"
            assert loop.time() - start < 0.2

            bench.controller.delay(None, "srv", 0.2)  # a wildcard source also matches anonymous dialers
            start = loop.time()
            a_r, _ = await bench.dial(NOT_A_FRAME + b"anon")
            a_b_r, _ = await bench.backend_conn()
            assert await asyncio.wait_for(a_b_r.readexactly(8), 2.0) == NOT_A_FRAME + b"anon"
            assert loop.time() - start >= 0.2 - 0.01

    run(scenario())


def test_blackhole_drops_one_direction_only_and_keeps_the_connection() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            (c_r, c_w), (b_r, b_w) = await bench.pair()
            bench.controller.blackhole("cli", "srv")
            c_w.write(encode_frame("lost"))
            b_w.write(encode_frame("hello"))
            assert await read_msg(c_r) == "hello"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b_r.read(100), 0.3)
            assert bench.proxy.stats.bytes_dropped == len(encode_frame("lost"))

            bench.controller.heal()
            c_w.write(encode_frame("back"))
            assert await read_msg(b_r) == "back"

            bench.controller.blackhole("srv", "cli")  # now the other way
            b_w.write(encode_frame("gone"))
            c_w.write(encode_frame("up"))
            assert await read_msg(b_r) == "up"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c_r.read(100), 0.3)
            assert bench.controller.snapshot()["blackholes"] == [["srv", "cli"]]

    run(scenario())


def test_blackhole_drops_whole_frames_and_spares_the_address_frame() -> None:
    """The stream stays parseable across blackhole and heal, even when they fall inside a frame."""

    async def scenario() -> None:
        async with Bench() as bench:
            bench.controller.blackhole("cli", "srv")  # before the dial: the address frame still passes
            c_r, c_w = await bench.dial(encode_frame(CLI_ADDR))
            b_r, _ = await bench.backend_conn()
            assert await read_msg(b_r) == CLI_ADDR
            c_w.write(encode_frame("dropped"))
            await asyncio.sleep(0.05)
            bench.controller.heal()
            first = encode_frame("first " * 50)
            c_w.write(first[:2])  # the header arrives in pieces; the frame starts while healed
            await asyncio.sleep(0.05)
            c_w.write(first[2:30])
            await asyncio.sleep(0.05)
            bench.controller.blackhole("cli", "srv")  # mid-frame: the frame is kept whole...
            c_w.write(first[30:] + encode_frame("second"))  # ...the next one is dropped whole
            await asyncio.sleep(0.05)
            bench.controller.heal()
            c_w.write(encode_frame("third"))
            assert await read_msg(b_r) == "first " * 50
            assert await read_msg(b_r) == "third"
            dropped = len(encode_frame("dropped")) + len(encode_frame("second"))
            assert bench.proxy.stats.bytes_dropped == dropped

    run(scenario())


def test_cut_closes_both_sides_refuses_new_dials_and_heals() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            (c_r, _), (b_r, _) = await bench.pair()
            (a_r, a_w), _anon_backend = await bench.pair(identify=False)
            bench.controller.partition(["cli"], ["srv"])
            assert await closed_soon(c_r, 1.0)
            assert await closed_soon(b_r, 1.0)
            assert not await closed_soon(a_r, 0.2)  # an unidentified dialer is not in the partition

            r, _ = await bench.dial(encode_frame(CLI_ADDR))  # a new dial is reset before reaching srv
            assert await closed_soon(r, 1.0)
            assert bench.accepted.empty()
            assert bench.proxy.stats.refused == 1

            bench.controller.isolate("srv")  # isolation cuts even unidentified dialers
            assert await closed_soon(a_r, 1.0)
            assert bench.controller.snapshot()["isolated"] == ["srv"]

            bench.controller.heal()
            (c_r, c_w), (b_r, _) = await bench.pair()
            c_w.write(b"again")
            assert await asyncio.wait_for(b_r.readexactly(5), 2.0) == b"again"
            assert bench.proxy.links() == [("cli", "srv", CLI_ADDR)]

    run(scenario())


def test_half_close_and_peer_reset() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            (c_r, c_w), (b_r, b_w) = await bench.pair()
            c_w.write(b"request")
            c_w.write_eof()
            assert await asyncio.wait_for(b_r.read(), 2.0) == b"request"  # read() = until EOF
            b_w.write(b"response")  # the other direction still flows after the half-close
            b_w.close()
            assert await asyncio.wait_for(c_r.read(), 2.0) == b"response"
            assert await eventually(lambda: not bench.proxy.links())

            (_, c_w), (b_r, _) = await bench.pair()
            linger0 = struct.pack("ii", 1, 0)  # makes close() send a RST
            c_w.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            c_w.transport.abort()
            with pytest.raises(ConnectionResetError):  # the reset reaches the target as a reset
                await asyncio.wait_for(b_r.read(100), 1.0)
            assert await eventually(lambda: not bench.proxy.links())

    run(scenario())


def test_stop_closes_everything_and_leaks_no_task() -> None:
    async def scenario() -> None:
        async with Bench() as bench:
            conns = [await bench.pair(identify=i % 2 == 0) for i in range(4)]
            bench.controller.delay(None, None, 5.0)  # leave chunks queued inside the proxy
            conns[0][0][1].write(b"queued")
            await asyncio.sleep(0.05)
            await bench.proxy.stop()
            for (c_r, _), (b_r, _) in conns:
                assert await closed_soon(c_r, 1.0)
                assert await closed_soon(b_r, 1.0)
            host, port = bench.proxy.listen_address.rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(host, int(port))
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []
            assert bench.proxy.links() == []

    run(scenario())


# ---------------------------------------------------------------- real pysyncobj through the proxies


class Counter(SyncObj):
    def __init__(self, self_addr: str, others: list[str], conf: SyncObjConf) -> None:
        self._count = 0  # before SyncObj.__init__: the tick thread starts (and may apply) inside it
        super().__init__(self_addr, others, conf)

    @replicated
    def incr(self) -> int:
        self._count += 1
        return self._count

    def count(self) -> int:
        return self._count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def agreed_leader(nodes: list[Counter]) -> str | None:
    """The address every given node names as leader, if they agree and that node is one of them."""
    leaders = {node._getLeader().address if node._getLeader() else None for node in nodes}
    if len(leaders) != 1 or None in leaders:
        return None
    leader = leaders.pop()
    return leader if any(n.selfNode.address == leader and n._isLeader() for n in nodes) else None


def start_nodes(advertised: dict[str, str], real: dict[str, str]) -> dict[str, Counter]:
    nodes: dict[str, Counter] = {}
    for name, address in advertised.items():
        # validate() asserts raftMinTimeout > 3 * appendEntriesPeriod (default 0.1): 0.3 needs < 0.1.
        conf = SyncObjConf(
            autoTick=True,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=0.05,
            raftMinTimeout=0.3,
            raftMaxTimeout=0.6,
            connectionRetryTime=0.2,
            leaderFallbackTimeout=1.5,
            bindAddress=real[name],
        )
        others = [a for n, a in advertised.items() if n != name]
        nodes[name] = Counter(address, others, conf)
    return nodes


def stop_nodes(nodes: dict[str, Counter]) -> None:
    for node in nodes.values():
        node.destroy()
    assert wait_for(lambda: not any(n.tick_thread_alive() for n in nodes.values()), 5.0)


def test_raft_cluster_through_proxies_survives_leader_isolation() -> None:
    real = {f"n{i}": f"127.0.0.1:{free_port()}" for i in range(3)}
    cluster = ProxyCluster(real)
    nodes: dict[str, Counter] = {}
    try:
        advertised = cluster.start()
        name_of = {address: name for name, address in advertised.items()}
        nodes = start_nodes(advertised, real)
        everyone = list(nodes.values())
        assert wait_for(lambda: agreed_leader(everyone) is not None, 10.0)

        # Every proxy identified its dialers: exactly the nodes whose address string is greater.
        expected = {n: {m for m in advertised if advertised[m] > advertised[n]} for n in advertised}
        assert wait_for(
            lambda: {n: {src for src, _, _ in links} for n, links in cluster.links().items()} == expected, 5.0
        ), cluster.links()

        old_name = name_of[agreed_leader(everyone) or ""]
        old = nodes[old_name]
        for _ in range(5):
            old.incr(sync=True, timeout=3.0)
        assert wait_for(lambda: all(n.count() == 5 for n in everyone), 5.0)

        isolated_at = time.monotonic()
        cluster.controller.isolate(old_name)
        with pytest.raises(SyncObjException):  # cannot reach a majority: no commit
            old.incr(sync=True, timeout=1.0)
        majority = [n for name, n in nodes.items() if name != old_name]
        assert wait_for(lambda: agreed_leader(majority) not in (None, advertised[old_name]), 5.0)
        assert time.monotonic() - isolated_at < 5.0
        new = nodes[name_of[agreed_leader(majority) or ""]]
        for _ in range(5):
            new.incr(sync=True, timeout=3.0)
        assert wait_for(lambda: all(n.count() == 10 for n in majority), 5.0)
        assert old.count() == 5
        # The old leader's open links were cut, and its peers (or it) kept redialing and were refused.
        stats = cluster.stats().values()
        assert sum(s["cut"] for s in stats) >= 1 and sum(s["refused"] for s in stats) >= 1, stats

        cluster.controller.heal()
        assert wait_for(lambda: [n.count() for n in everyone] == [10, 10, 10], 10.0), [
            n.count() for n in everyone
        ]
        assert wait_for(lambda: agreed_leader(everyone) is not None, 5.0)
        new.incr(sync=True, timeout=3.0)  # traffic flows again to all three
        assert wait_for(lambda: [n.count() for n in everyone] == [11, 11, 11], 5.0)
    finally:
        stop_nodes(nodes)
        cluster.stop()


# ---------------------------------------------------------------- real kvstore nodes, secured (the default)


def test_partition_cuts_links_on_a_secured_cluster(tmp_path: Path) -> None:
    """Raft traffic is encrypted by default: the proxies read who dials from the decrypted handshake
    (they get the shard's secret file), so partitions between named replicas still cut links."""
    cluster = LocalCluster(tmp_path / "c")
    started: list[ProxyCluster] = []
    advertised: dict[str, str] = {}

    def via_proxies(binds: dict[str, str]) -> dict[str, str]:
        for _ in range(10):
            proxies = ProxyCluster(binds, secret_files=cluster.secret_files)
            addresses = proxies.start()
            if not {int(a.rsplit(":", 1)[1]) for a in addresses.values()} & cluster.reserved_ports:
                started.append(proxies)
                advertised.update(addresses)
                return addresses
            proxies.stop()
        raise RuntimeError("could not place the proxies")

    try:
        cluster.create(shards=1, replicas=3, raft=TEST_RAFT, advertise_for=via_proxies)
        assert set(cluster.secret_files) == {"s0r0", "s0r1", "s0r2"}
        assert cluster.node_config("s0r0").raft.secret_file
        proxies = started[0]
        cluster.start_all()
        cluster.wait_for_leaders(30)
        # Every link was identified through the encrypted handshake.
        expected = {n: {m for m in advertised if advertised[m] > advertised[n]} for n in advertised}
        assert wait_for(
            lambda: {n: {src for src, _, _ in links} for n, links in proxies.links().items()} == expected,
            10.0,
        ), proxies.links()

        old = cluster.leader_of(0)
        assert old is not None
        others = [n for n in advertised if n != old]
        proxies.controller.partition([old], others)
        new = new_leader(cluster, 0, not_name=old, timeout=20.0)
        assert new in others
        stats = proxies.stats().values()
        assert sum(s["cut"] for s in stats) >= 1, stats
        crossing = [
            (src, dst) for links in proxies.links().values() for src, dst, _ in links if old in (src, dst)
        ]
        assert crossing == []
        with client(cluster) as kv:
            kv.put(b"during-partition", b"majority")
        proxies.controller.heal()
        with client(cluster) as kv:
            kv.put(b"after-heal", b"everyone")
        assert wait_until(
            lambda: len({r["applied_index"] for r in cluster.status()[0]["replicas"]}) == 1, 20.0
        )
    finally:
        cluster.down()
        for proxies in started:
            proxies.stop()
