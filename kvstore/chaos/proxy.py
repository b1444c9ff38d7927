"""Fault-injecting TCP proxy in front of pysyncobj Raft ports (the etcd ``pkg/proxy`` approach, no root).

Topology: replica R binds its real Raft port (``SyncObjConf(bindAddress=real)``) while every node, R
included, names R by the address of R's proxy (``selfNode``/``otherNodes``). pysyncobj's node identity is
that string, so peers dial R's proxy and the proxy forwards to R's real port.

Who is dialing: the dialer announces its advertised address in its handshake (the frame format and the
handshake are in ``kvstore.replication.peer_frames``, with the rest of pysyncobj's wire format).
- Without a secret (``--insecure``, and raw pysyncobj tests), the address is the dialer's first frame:
  the proxy reads it before it connects upstream.
- With a secret (the default), the address comes after a key exchange with the target. A proxy given
  the group's secret file (``secret_file``) connects upstream at once, relays the two key frames,
  decrypts the third and only then applies the rules (a cut link is reset at that point).
Handshake frames are decoded with an unpickler that refuses every global (peer bytes can only build
plain str/list/tuple, never run code), and the address is mapped to a replica name through the
``LinkController`` registry (``link_rules``); the frames are forwarded unchanged.

Connections it cannot identify get source ``None``: an encrypted handshake without the secret, admin tools
(``syncobj_admin``) that send a list, other clients that send anything. Only rules that need no source apply
to them: ``isolate`` of the target and delays with ``src=None``.

Faults: a cut link is reset on both sides (RST) and new dials on it are reset before reaching the target;
pysyncobj notices at once and redials every ``connectionRetryTime``. A one-way blackhole keeps the
connection open and drops whole pysyncobj frames in one direction (never the dialer's address frame), so
the stream stays parseable after a heal. Note that pysyncobj drops a connection on which it has read
nothing for ``connectionTimeout`` (checked when it sends), so a long blackhole also means reconnects.
A delay releases each chunk at receive time + delay, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from kvstore.chaos.link_rules import LinkController
from kvstore.replication import peer_frames
from kvstore.replication.peer_frames import FRAME_HEADER, HANDSHAKE_MAX_BYTES

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK = 64 * 1024
# Per-direction queue bound, in chunks. A delayed direction holds delay * throughput bytes; past this bound
# the reader stops reading and TCP flow control pushes back on the sender instead of us buffering forever.
_QUEUE_CHUNKS = 256
_EOF = b""  # queue marker: the source half-closed its side
_STOP_ROUNDS = 10  # stop() re-cancels tasks accepted while it was stopping; a few rounds always suffice


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST. A plain abort() sends a FIN, which a peer could take for an orderly
    end of stream; a reset is what a cut link should look like, and it leaves no TIME_WAIT behind."""
    if writer.transport.is_closing():
        return
    sock = writer.transport.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # already dead: abort() below is all that is left to do
        pass
    writer.transport.abort()


@dataclasses.dataclass
class ProxyStats:
    accepted: int = 0
    identified: int = 0  # dialer decoded and found in the registry
    refused: int = 0  # closed at once: link cut at accept time, or target unreachable
    cut: int = 0  # established links closed because a rule cut them
    bytes_forwarded: int = 0
    bytes_dropped: int = 0  # blackholed


class _LinkCut(Exception):
    """A chunk arrived on a link that a rule has cut."""


class _Pipe:
    """One direction of a link. The reader stamps each chunk with its due time (receive time + delay) and
    queues it; the writer releases chunks in order once due, so delays never add up chunk after chunk."""

    def __init__(
        self,
        proxy: FaultProxy,
        ends: tuple[str | None, str | None],
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        framed: bool,
        pass_first: bool,
    ) -> None:
        self._proxy = proxy
        self._src, self._dst = ends
        self._reader, self._writer = streams
        blocked = functools.partial(proxy.controller.is_blackholed, self._src, self._dst)
        self._gate = peer_frames.FrameFilter(framed, pass_first, blocked)
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)

    async def read_loop(self, head: bytes) -> None:
        if head:
            await self._admit(head)
        while True:  # ends at EOF, on a reset or a cut, or when the link is cancelled
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                # The FIN is forwarded even when blackholed, so a closed connection is never hidden.
                await self._queue.put((self._due(), _EOF))
                return
            await self._admit(chunk)

    async def _admit(self, chunk: bytes) -> None:
        if self._proxy.controller.is_cut(self._src, self._dst):
            raise _LinkCut()
        data, dropped = self._gate.filter(chunk)
        self._proxy.stats.bytes_dropped += dropped
        if data:
            await self._queue.put((self._due(), data))

    def _due(self) -> float:
        return asyncio.get_running_loop().time() + self._proxy.controller.delay_for(self._src, self._dst)

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends after forwarding EOF, on a reset, or when the link is cancelled
            due, chunk = await self._queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if chunk == _EOF:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(chunk)
            self._proxy.stats.bytes_forwarded += len(chunk)
            await self._writer.drain()


class _Link:
    """One proxied connection: dialer <-> proxy <-> target replica, as two independent directions."""

    def __init__(
        self,
        proxy: FaultProxy,
        src: str | None,
        announced: str | None,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.src = src
        self.dst = proxy.name
        self.announced = announced
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self._tasks: list[asyncio.Task[None]] = []
        self._aborted = False

    async def run(self, head: bytes, framed: bool) -> None:
        if self._aborted or self._proxy.controller.is_cut(self.src, self.dst):
            self.abort()
            return
        to_target = _Pipe(
            self._proxy, (self.src, self.dst), (self._client[0], self._upstream[1]), framed, pass_first=True
        )
        to_dialer = _Pipe(
            self._proxy, (self.dst, self.src), (self._upstream[0], self._client[1]), framed, pass_first=False
        )
        failed = False
        try:
            async with asyncio.TaskGroup() as group:
                for coro in (
                    to_target.read_loop(head),
                    to_target.write_loop(),
                    to_dialer.read_loop(b""),
                    to_dialer.write_loop(),
                ):
                    self._tasks.append(group.create_task(coro))
        except* (OSError, _LinkCut):  # a reset on either side, or a cut: drop both sides at once
            failed = True
        if failed or self._aborted:
            self.abort()
        else:  # both directions reached EOF and forwarded it: close gracefully, flushing buffers
            self._client[1].close()
            self._upstream[1].close()

    def abort(self) -> None:
        """Reset both sides now; bytes still buffered here are discarded (they were 'in the network')."""
        self._aborted = True
        for task in self._tasks:
            task.cancel()
        _reset(self._client[1])
        _reset(self._upstream[1])


class FaultProxy:
    """One listening proxy in front of one replica's real Raft port. Runs on the loop that started it."""

    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        target: tuple[str, int],
        controller: LinkController,
        *,
        identify_timeout: float = 1.0,
        connect_timeout: float = 2.0,
        secret_file: str | Path | None = None,
    ) -> None:
        self.name = name
        self.controller = controller
        self.listen_address = ""
        self.stats = ProxyStats()
        self._listen = listen
        self._target = target
        # How long to wait for a dialer's first frame. pysyncobj sends it as soon as the TCP connect
        # completes; only clients that wait for the server to speak first pay this once per connection.
        self._identify_timeout = identify_timeout
        self._connect_timeout = connect_timeout
        self._secret_file = secret_file
        self._cipher: Any = None  # the Raft group's cipher, to read who dials (see module doc)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"proxy {self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_accept, *self._listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.listen_address = f"{host}:{port}"
        target = f"{self._target[0]}:{self._target[1]}"
        # The real address is registered too, in case a replica advertises it by mistake.
        self.controller.register(self.name, self.listen_address, target)
        self.controller.subscribe(self._on_rules_changed)

    async def stop(self) -> None:
        """Stop listening and reset every connection; returns when all of this proxy's tasks are done."""
        server, self._server = self._server, None
        if server is None:
            return
        self.controller.unsubscribe(self._on_rules_changed)
        server.close()
        for _ in range(_STOP_ROUNDS):  # connections accepted just before close() may add tasks
            tasks = list(self._tasks)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5.0)
        await server.wait_closed()

    def links(self) -> list[tuple[str | None, str, str | None]]:
        """(dialer name, target name, address the dialer announced) for each open link."""
        return sorted(((lk.src, lk.dst, lk.announced) for lk in self._links), key=repr)

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._on_serve_done, writer))

    def _on_serve_done(self, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Refused dialers, and tasks cancelled before they ran, still hold the accepted socket.
        _reset(writer)
        if not task.cancelled() and task.exception() is not None:
            log.error("proxy %s: connection handler failed", self.name, exc_info=task.exception())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        try:
            head, message = await self._sniff(reader)
        except OSError:
            return
        upstream = None
        if message is None and peer_frames.looks_encrypted(head) and self._load_cipher():
            try:  # the address comes after a key exchange with the target: relay it first
                upstream = await self._dial_target()
                head, message = await self._relay_handshake(head, (reader, writer), upstream)
            except (OSError, EOFError, TimeoutError, ValueError):
                if upstream is not None:
                    _reset(upstream[1])
                self.stats.refused += 1
                return
        announced = message if isinstance(message, str) else None
        src = self.controller.name_of(announced)
        self.stats.identified += src is not None
        if self.controller.is_cut(src, self.name):
            self.stats.refused += 1  # reset at once, so the dialer notices now rather than on a timeout
            if upstream is not None:
                _reset(upstream[1])
            return
        if upstream is None:
            try:
                upstream = await self._dial_target()
            except (OSError, TimeoutError):
                self.stats.refused += 1
                return
        link = _Link(self, src, announced, (reader, writer), upstream)
        self._links.add(link)
        try:
            await link.run(head, framed=message is not None or peer_frames.looks_encrypted(head))
        finally:
            self._links.discard(link)
            _reset(upstream[1])

    def _load_cipher(self) -> bool:
        """Read the group's secret at the first encrypted dial: proxies may start before the cluster
        writes its secrets (they must know the proxies' addresses first)."""
        if self._cipher is None and self._secret_file:
            from kvstore.replication.peer_transport import peer_cipher

            try:
                self._cipher = peer_cipher(self._secret_file)
            except ValueError as exc:
                log.warning("proxy %s: cannot read dialers' addresses: %s", self.name, exc)
                self._secret_file = None  # said once; links stay unidentified
        return self._cipher is not None

    async def _dial_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(*self._target), self._connect_timeout)

    async def _relay_handshake(
        self,
        first: bytes,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> tuple[bytes, object | None]:
        """pysyncobj's encrypted handshake: forward the dialer's key, relay the target's, read the
        dialer's `(key, address)`. Returns that frame (still to forward) and the address in it."""
        upstream[1].write(first)
        await upstream[1].drain()
        client[1].write(await self._read_id_frame(upstream[0]))
        await client[1].drain()
        frame = await self._read_id_frame(client[0])
        return frame, peer_frames.handshake_address(peer_frames.decode_first_frame(frame, self._cipher))

    async def _read_id_frame(self, reader: asyncio.StreamReader) -> bytes:
        async with asyncio.timeout(self._identify_timeout):
            header = await reader.readexactly(FRAME_HEADER.size)
            total = peer_frames.frame_length(header)
            if total is None:
                raise ValueError("not a handshake frame")
            return header + await reader.readexactly(total - FRAME_HEADER.size)

    async def _sniff(self, reader: asyncio.StreamReader) -> tuple[bytes, object | None]:
        """Read the dialer's first frame (bounded in size and time); return the bytes read and the
        message in it, if it is an unencrypted pysyncobj frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._identify_timeout
        buf = b""
        for _ in range(HANDSHAKE_MAX_BYTES + FRAME_HEADER.size):  # each pass reads >= 1 byte or stops
            need = peer_frames.frame_length(buf)
            remaining = deadline - loop.time()
            if need is None or len(buf) >= need or remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(_CHUNK), remaining)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
        return buf, peer_frames.decode_first_frame(buf)

    def _on_rules_changed(self) -> None:
        """Called from any thread by the controller: hop onto our loop to close links a rule cuts."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._enforce_cuts)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _enforce_cuts(self) -> None:
        for link in list(self._links):
            if self.controller.is_cut(link.src, link.dst):
                self.stats.cut += 1
                link.abort()


class ProxyCluster:
    """N proxies, one per replica, on an event loop in a background thread (for synchronous callers)."""

    def __init__(
        self,
        replicas: dict[str, str],
        *,
        listen_host: str = "127.0.0.1",
        identify_timeout: float = 1.0,
        secret_files: dict[str, Path] | None = None,
    ) -> None:
        """replicas: name -> real Raft address; secret_files: name -> its Raft group's secret file."""
        self.controller = LinkController()
        self._secret_files = dict(secret_files or {})
        self.proxies: dict[str, FaultProxy] = {}
        self._replicas = dict(replicas)
        self._listen_host = listen_host
        self._identify_timeout = identify_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> dict[str, str]:
        """Start all proxies; return name -> proxy address, the addresses replicas must advertise."""
        if self._thread is not None:
            raise RuntimeError("proxy cluster already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, args=(self._loop,), name="fault-proxy-loop", daemon=True
        )
        self._thread.start()
        try:
            return self._call(self._start_all())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._stop_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10.0)
            self._loop = self._thread = None

    def links(self) -> dict[str, list[tuple[str | None, str, str | None]]]:
        """Open links per proxy, read on the proxies' loop (their link sets are not thread-safe)."""

        async def collect() -> dict[str, list[tuple[str | None, str, str | None]]]:
            return {name: proxy.links() for name, proxy in self.proxies.items()}

        return self._call(collect())

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: dataclasses.asdict(proxy.stats) for name, proxy in self.proxies.items()}

    def __enter__(self) -> ProxyCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy cluster not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start_all(self) -> dict[str, str]:
        for name, real in self._replicas.items():
            proxy = FaultProxy(
                name,
                (self._listen_host, 0),
                _host_port(real),
                self.controller,
                identify_timeout=self._identify_timeout,
                secret_file=self._secret_files.get(name),
            )
            self.proxies[name] = proxy  # before start(), so stop() cleans up a partial start
            await proxy.start()
        return {name: proxy.listen_address for name, proxy in self.proxies.items()}

    async def _stop_all(self) -> None:
        results = await asyncio.gather(*(p.stop() for p in self.proxies.values()), return_exceptions=True)
        for name, result in zip(self.proxies, results, strict=True):
            if isinstance(result, BaseException):
                log.error("proxy %s failed to stop", name, exc_info=result)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
