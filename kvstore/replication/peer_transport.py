"""Who may talk to a replica's Raft port, and how much it may send (pysyncobj 0.3.17).

pysyncobj alone accepts anyone: it unpickles the first frame of every connection, takes a peer that
announces itself `'readonly'` (and streams it the log), runs list-form admin messages (`['status']`,
`['add', ...]`), and buffers whatever length a frame header claims. Here:

- Authentication: traffic is encrypted and authenticated (AES-GCM, `peer_cipher`, in place of
  pysyncobj's Fernet), keyed by the Raft group's secret (`peer_password`: one generated secret per
  shard, read from `raft.secret_file`).
  A frame that does not decrypt closes the connection before anything is unpickled.
- Identity: every peer dials from the same loopback address here, so a peer is the member address it
  claims after the authenticated handshake. Only configured members of this shard are accepted; a
  `readonly` peer, an admin message or any other first message closes the connection, and so does
  a connection that has not identified within `connectionTimeout`.
- Bounded input: a frame header claiming more than the cap closes the connection before its body is
  buffered (4 KiB until the peer has identified, then what the largest append-entries message can
  need); decompression stops at a cap too; unpickling is restricted (`safe_pickle`).
- Identity (issue 15, items 2 and 2b): right after its address, the dialer sends a hello (its
  cluster id, its data dir's incarnation, its name), and the accepting member answers with its own
  before anything else. Each side refuses a peer of another cluster, and a member whose
  incarnation changed since first contact (recorded in the data dir, `PeerIncarnations`): its
  data was wiped, and with an empty log it must not vote as the member that acknowledged entries.
  Nothing is sent on an outgoing connection before the peer's hello is accepted.
- `raft.insecure` (flag `--insecure`): no encryption, loopback only, a warning at every start. The
  identity and size rules above still apply.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj.monotonic import monotonic
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from kvstore.config import RaftSettings
from kvstore.replication import peer_cipher as cipher
from kvstore.replication import safe_pickle
from kvstore.replication.peer_frames import (
    FRAME_HEADER,
    HANDSHAKE_MAX_BYTES,
    hello,
    inflate,
    read_hello,
    read_refusal,
    refusal,
)
from kvstore.storage.identity import PeerIncarnations

log = logging.getLogger(__name__)

MIN_SECRET_CHARS = 32
_REFUSAL_LOG_INTERVAL = 1.0
_ACCEPTED = itertools.count()  # a flood of hostile connections must not flood the log
_IDENTITY_LOG_INTERVAL = 10.0  # per member: a refused member redials every connection_retry


@dataclass(frozen=True)
class PeerIdentity:
    """What this replica says in its hello, and whom it remembers (kvstore/storage/identity.py)."""

    name: str
    cluster: str
    incarnation: str
    known: PeerIncarnations


def max_message_bytes(batch_size_bytes: int) -> int:
    """Largest decompressed message a member may send: pysyncobj fills an append-entries message up
    to `appendEntriesBatchSizeBytes` of commands and then adds one more entry (below the batch size,
    or it would take the chunked path), plus pickle overhead per entry."""
    return 2 * batch_size_bytes + (1 << 20)


def max_frame_bytes(message_bytes: int) -> int:
    """Largest frame for such a message: zlib may grow incompressible data a little, and the
    cipher adds its fixed overhead."""
    return message_bytes + message_bytes // 100 + 1024 + cipher.OVERHEAD


# ----- the secret ---------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def read_secret(path: str | Path) -> str:
    """The secret in a file (surrounding whitespace ignored), checked for length."""
    path = Path(path)
    try:
        secret = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read the Raft secret file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"the Raft secret in {path} is too short ({len(secret)} < {MIN_SECRET_CHARS} characters)"
        )
    if mode & stat.S_IROTH:
        log.warning(
            "Raft secret file %s is readable by every user (mode %o): make it 0600", path, mode & 0o777
        )
    return secret


def peer_password(raft: RaftSettings, bind: str, peers: list[str]) -> str | None:
    """pysyncobj's `password` for this replica (None: insecure mode). Raises ValueError, with the
    reason, when the node must not start: no secret without `insecure`, or `insecure` off loopback."""
    if raft.insecure:
        if raft.secret_file:
            raise ValueError("raft.insecure and raft.secret_file are both set: choose one")
        exposed = [a for a in [bind, *peers] if not _is_loopback(a)]
        if exposed:
            raise ValueError(
                f"--insecure (raft.insecure) is for loopback only, refused with non-loopback "
                f"Raft address(es) {', '.join(exposed)}"
            )
        log.warning(
            "INSECURE: Raft traffic on %s is neither authenticated nor encrypted (raft.insecure / "
            "--insecure); any local process can join this shard. Never use this outside a test machine.",
            bind,
        )
        return None
    if not raft.secret_file:
        raise ValueError(
            "no Raft secret: set raft.secret_file to the shard's secret file (`kvstore cluster up` "
            "writes <dir>/secrets/shard-<N>.key), or pass --insecure for a loopback-only test node"
        )
    secret = read_secret(raft.secret_file)
    cipher.install()  # pysyncobj turns the password into our AES-GCM cipher, not its Fernet
    return secret


def peer_cipher(secret_file: str | Path) -> cipher.PeerCipher:
    """The cipher a Raft group's members use (for tools that must read their frames: the fault proxy)."""
    return cipher.PeerCipher(read_secret(secret_file).encode())


# ----- connections ----------------------------------------------------------------------------------


class GuardedTcpConnection(TcpConnection):
    """pysyncobj's TcpConnection with frame caps checked as headers arrive, a bounded decompression
    and the restricted unpickler. Made by `guard()` from a connection pysyncobj just created (before
    it read anything); only name-mangled helpers of the read path are replaced.

    Until `identified()`, the first `handshake_frames` frames (a key and an address) may not exceed
    HANDSHAKE_MAX_BYTES, and reading pauses once that much is buffered: an anonymous dialer gets one
    socket read of buffer at most before its first frame is judged. Frames after the handshake may be
    pipelined behind it (a member sends its address and then at once its first append-entries)."""

    _frame_cap: int  # member frames, on the wire
    _message_cap: int  # decompressed size allowed now
    _member_message_cap: int
    _handshake_frames: int
    _identified: bool
    _scanned: int  # frame headers checked so far on this connection
    _scan_at: int  # offset in the read buffer of the next frame header not yet checked
    waited: float  # seconds of our ticks this connection has spent unidentified
    accepted: int  # order of arrival

    @classmethod
    def guard(
        cls, conn: TcpConnection, frame_cap: int, message_cap: int, handshake_frames: int = 0
    ) -> GuardedTcpConnection:
        conn.__class__ = cls
        assert isinstance(conn, GuardedTcpConnection)
        conn._frame_cap = frame_cap
        conn._member_message_cap = message_cap
        conn._handshake_frames = handshake_frames
        conn._identified = handshake_frames == 0
        conn._message_cap = message_cap if conn._identified else HANDSHAKE_MAX_BYTES
        conn._scanned = conn._scan_at = 0
        conn.waited = 0.0
        conn.accepted = next(_ACCEPTED)
        return conn

    def send(self, message: Any) -> None:
        """pysyncobj's send, with the body stored rather than compressed: still a zlib stream, which
        every pysyncobj peer inflates as before. pysyncobj's `zlib.compress(body, 3)` set up a
        fresh ~270 KB compressor per message: ~100 us of the sender's CPU for every append and
        acknowledgement, most of a small message's cost, where a level-0 compressor with zlib's
        smallest state takes ~3 us. Compressed before encryption, a frame's length would also
        tell an observer how much of the client data it carries repeats (a CRIME-style leak)."""
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        packer = zlib.compressobj(0, zlib.DEFLATED, 9, 1)  # stored; a 512-byte window, memLevel 1
        data = packer.compress(pysyncobj_pickle.dumps(message)) + packer.flush()
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(monotonic()))
        self._TcpConnection__writeBuffer += FRAME_HEADER.pack(len(data)) + data
        self._TcpConnection__trySendBuffer()

    def identified(self) -> None:
        """The peer proved it is a member: member-sized messages from now on."""
        self._identified = True
        self._message_cap = self._member_message_cap

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 (pysyncobj's mangled name)
        buffered = len(self._TcpConnection__readBuffer)
        if not buffered:
            self._scan_at = 0  # nothing pending (also after a reconnect of this connection object)
        # Stop reading once a whole frame's worth is buffered: the frames are parsed first and the
        # poller (level-triggered) calls back for the rest, so the buffer stays bounded.
        limit = self._frame_cap if self._identified else HANDSHAKE_MAX_BYTES * self._handshake_frames
        if buffered > limit:
            return False
        more = TcpConnection._TcpConnection__processRead(self)
        if more and not self._headers_fit():
            self.disconnect()
            return False
        return more

    def _headers_fit(self) -> bool:
        buffer = self._TcpConnection__readBuffer
        at = self._scan_at
        while len(buffer) - at >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(buffer, at)
            handshake = not self._identified and self._scanned < self._handshake_frames
            cap = HANDSHAKE_MAX_BYTES if handshake else self._frame_cap
            if not 0 < length <= cap:
                _refusal(f"frame of {length} bytes claimed (cap {cap})")
                return False
            at += FRAME_HEADER.size + length
            self._scanned += 1
        self._scan_at = at
        return True

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < FRAME_HEADER.size:
            return None
        (length,) = FRAME_HEADER.unpack_from(buffer)
        if not 0 < length <= self._frame_cap:  # checked on arrival too; never buffer past this
            _refusal(f"frame of {length} bytes claimed (cap {self._frame_cap})")
            self.disconnect()
            return None
        end = FRAME_HEADER.size + length
        if len(buffer) < end:
            return None
        data = buffer[FRAME_HEADER.size : end]
        self._TcpConnection__readBuffer = buffer[end:]
        self._scan_at -= end
        try:
            return self._decode(data)
        except Exception as exc:  # a bad token, a bomb, a refused global, a wrong key: drop the peer
            _refusal(f"frame refused ({type(exc).__name__}: {exc})")
            self.disconnect()
            return None

    def _decode(self, data: bytes) -> Any:
        if self.encryptor:
            timestamp = self.encryptor.extract_timestamp(data)  # decrypt() verifies it with the rest
            data = self.encryptor.decrypt(data)  # authenticates before anything is unpickled
            if timestamp < self.recvLastTimestamp:  # pysyncobj's ordering check
                raise ValueError("frame older than the previous one (replayed?)")
            self.recvLastTimestamp = timestamp
        message = safe_pickle.loads(inflate(data, self._message_cap))
        if self.recvRandKey:
            if not (isinstance(message, tuple) and len(message) == 2 and message[0] == self.recvRandKey):
                raise ValueError("connection key mismatch")
            message = message[1]
        return message


_last_refusal_log = 0.0


def _refusal(reason: str) -> None:
    global _last_refusal_log
    now = time.monotonic()
    if now - _last_refusal_log >= _REFUSAL_LOG_INTERVAL:
        _last_refusal_log = now
        log.warning("Raft peer connection closed: %s", reason)


# ----- the transport -------------------------------------------------------------------------------


class SecurePeerTransport(TCPTransport):
    """pysyncobj's TCP transport that accepts only this shard's configured members (see module doc).

    Members are the `otherNodes` pysyncobj passes in (the replica's configured peers)."""

    MAX_PENDING = 64  # unidentified incoming connections held at once; more are closed at accept
    MAX_TICK_CHARGE = 0.25  # seconds; pysyncobj ticks every 50 ms when it is not busy
    LINGER = 1.0  # seconds a connection stays open after we sent it a refusal (see `_send_refusal`)

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        conf = syncObj.conf
        self._message_cap = max_message_bytes(conf.appendEntriesBatchSizeBytes)
        self._frame_cap = max_frame_bytes(self._message_cap)
        self._identify_timeout = conf.connectionTimeout
        self._last_tick = time.monotonic()
        # None: no hellos (a bare pysyncobj group in tests); kvstore's replicas always have one.
        self._identity: PeerIdentity | None = getattr(syncObj, "peer_identity", None)
        self._identity_logged: dict[str, float] = {}
        self._lingering: dict[Any, float] = {}  # refused connection -> when to close it
        super().__init__(syncObj, selfNode, otherNodes)

    # Outgoing: we dial a configured member, so its frames get the member caps at once.
    def addNode(self, node: Any) -> None:  # noqa: N802
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, GuardedTcpConnection):
            GuardedTcpConnection.guard(conn, self._frame_cap, self._message_cap)

    # Incoming: handshake-sized caps until the peer proves it is a member: its key (when encrypted),
    # then its address, then (kvstore's replicas) its hello.
    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:  # noqa: N802
        handshake_frames = (2 if self._syncObj.encryptor else 1) + (1 if self._identity else 0)
        GuardedTcpConnection.guard(conn, self._frame_cap, self._message_cap, handshake_frames)
        if len(self._unknownConnections) >= self.MAX_PENDING:
            # Evict the oldest: a member identifies within milliseconds, so a flood of idle
            # connections cannot keep one out for long.
            oldest = min(self._unknownConnections, key=lambda c: getattr(c, "accepted", 0))
            self._refuse(oldest, f"more than {self.MAX_PENDING} unidentified connections")
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:  # noqa: N802
        if self._syncObj.encryptor and not conn.sendRandKey:
            # First message of the authenticated handshake: the dialer's 32-byte connection key
            # (it decrypted, so the dialer holds the group's secret).
            if isinstance(message, bytes) and len(message) == 32:
                super()._onIncomingMessageReceived(conn, message)
            else:
                self._refuse(conn, "malformed handshake")
            return
        announced = getattr(conn, "announced", None)
        if announced is not None:  # the address came: this must be the dialer's hello
            refused = self._judge_hello(announced, message)
            if refused:
                self._send_refusal(conn, refused)
                return
            conn.identified()
            conn.peer_verified = True
            conn.send(self._hello())  # ours, before anything pysyncobj sends on this connection
            super()._onIncomingMessageReceived(conn, announced)
            return
        if isinstance(message, str) and message in self._nodeAddrToNode:
            if self._identity is not None:
                conn.announced = message
                return
            conn.identified()
            super()._onIncomingMessageReceived(conn, message)
            return
        if message == "readonly":
            self._refuse(conn, "read-only peers are not accepted")
        elif isinstance(message, list):
            self._refuse(conn, f"admin message {str(message[:1])[:40]} refused")
        else:
            self._refuse(conn, f"{str(message)[:60]!r} is not a member of this shard")

    # Outgoing: our hello follows our address; the peer's hello must be the first thing it sends.
    def _sendSelfAddress(self, conn: Any) -> None:  # noqa: N802
        super()._sendSelfAddress(conn)
        if self._identity is not None:
            conn.send(self._hello())

    def _onOutgoingConnected(self, conn: Any) -> None:  # noqa: N802
        conn.peer_verified = False
        super()._onOutgoingConnected(conn)
        if not self._syncObj.encryptor:
            self._await_hello(conn)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:  # noqa: N802
        super()._onOutgoingMessageReceived(conn, message)  # the peer's connection key
        self._await_hello(conn)

    def _await_hello(self, conn: Any) -> None:
        node = self._connToNode(conn)
        if self._identity is None:
            conn.peer_verified = True
        elif node is not None:
            conn.setOnMessageReceivedCallback(functools.partial(self._on_outgoing_hello, conn, node))

    def _on_outgoing_hello(self, conn: Any, node: Any, message: Any) -> None:
        reason = read_refusal(message)
        if reason is not None:  # the peer refused our hello
            self._log_refused_by(node.address, reason)
            conn.disconnect()
            return
        refused = self._judge_hello(node.address, message)
        if refused:
            # Closed after LINGER; pysyncobj then redials after connection_retry, judged again each time.
            self._send_refusal(conn, refused)
            return
        conn.peer_verified = True
        conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))

    def _hello(self) -> dict[str, Any]:
        identity = self._identity
        assert identity is not None
        return hello(identity.cluster, identity.incarnation, identity.name)

    def _judge_hello(self, member: str, message: Any) -> str | None:
        """Why `member`'s hello is refused (logged, rate-limited per member), or None."""
        identity = self._identity
        assert identity is not None
        said = read_hello(message)
        if said is None:
            why = (
                f"Raft peer {member} sent no kvstore hello (cluster id, incarnation): a kvstore "
                f"older than this node's, or not a member; refused"
            )
        elif said.cluster != identity.cluster:
            why = (
                f"Raft peer {said.name or member} ({member}) belongs to cluster {said.cluster}, this "
                f"node to cluster {identity.cluster}: refused (a restored copy of a cluster, or a "
                f"node given another cluster's address?)"
            )
        else:
            known = identity.known.check(member, said.incarnation)
            if known is None:
                return None
            why = (
                f"Raft peer {said.name or member} ({member}) came back as incarnation "
                f"{said.incarnation}, but this replica knew it as {known}: its data dir was wiped or "
                f"replaced, and with an empty log it must not vote as that member; refused. If it "
                f"was rebuilt on purpose and this shard serves without it, run `kvstore node "
                f"--config <this node's config> --forget-peer {member}` on this replica "
                f'(docs/architecture.md, "Identity")'
            )
        now = time.monotonic()
        if now - self._identity_logged.get(member, -1e9) >= _IDENTITY_LOG_INTERVAL:
            self._identity_logged[member] = now
            log.error("%s", why)
        return why

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        reason = read_refusal(message)
        if reason is not None:  # a peer that accepted us judged our hello after its own was sent
            self._log_refused_by(node.address, reason)
            return
        super()._onMessageReceived(node, message)

    def _log_refused_by(self, member: str, reason: str) -> None:
        key = f"by {member}"
        now = time.monotonic()
        if now - self._identity_logged.get(key, -1e9) >= _IDENTITY_LOG_INTERVAL:
            self._identity_logged[key] = now
            log.error("refused by Raft peer %s: %s", member, reason)

    def _send_refusal(self, conn: Any, reason: str) -> None:
        """Tell a refused peer why (so its own log says so), and close the connection LINGER
        seconds later. Closed at once, it would lose the refusal: a peer we refuse after its hello
        may already have sent more (a fresh replica asks for votes at once), and closing a socket
        with frames unread makes the kernel answer with a reset, on which the peer's kernel drops
        what it had not yet read: our refusal. Until then its frames are read and dropped."""
        conn.send(refusal(reason))
        conn.peer_verified = False  # `send` gives it nothing more
        conn.setOnMessageReceivedCallback(lambda message: None)
        self._unknownConnections.discard(conn)
        if conn.state == CONNECTION_STATE.DISCONNECTED:
            return  # the send failed and closed it (pysyncobj may already redial: leave that alone)
        if len(self._lingering) >= self.MAX_PENDING:
            conn.disconnect()  # bounded: a flood of refused dialers is closed at once
        else:
            self._lingering[conn] = time.monotonic() + self.LINGER

    def _onDisconnected(self, conn: Any) -> None:  # noqa: N802
        conn.peer_verified = False
        self._lingering.pop(conn, None)
        super()._onDisconnected(conn)

    def send(self, node: Any, message: Any) -> bool:
        if self._identity is not None:
            conn = self._connections.get(node)
            if conn is not None and not getattr(conn, "peer_verified", False):
                return False  # the peer's hello is not in yet (or was refused): it gets nothing
        # pysyncobj marks an outgoing connection CONNECTED as soon as TCP connects, before the peer's
        # connection key arrives: a message sent in between would go out without the key, and the
        # peer drops the connection ("connection key mismatch"). Treat it as not connected yet.
        conn = self._connections.get(node)
        if conn is not None and self._syncObj.encryptor and not conn.sendRandKey:
            return False
        return bool(super().send(node, message))

    def _refuse(self, conn: Any, reason: str, quiet: bool = False) -> None:
        if not quiet:  # quiet: logged already, by member
            _refusal(reason)
        conn.disconnect()
        self._unknownConnections.discard(conn)

    def _onTick(self) -> None:  # noqa: N802
        super()._onTick()
        now = time.monotonic()
        # pysyncobj runs this before it polls: after a long tick of our own (a large batch applied),
        # a peer's handshake may be waiting unread. Count at most MAX_TICK_CHARGE per tick against it.
        elapsed, self._last_tick = min(now - self._last_tick, self.MAX_TICK_CHARGE), now
        for conn, close_at in list(self._lingering.items()):
            if now >= close_at:
                conn.disconnect()
                self._lingering.pop(conn, None)  # (_onDisconnected pops it too, when pysyncobj calls it)
        for conn in list(self._unknownConnections):
            conn.waited = getattr(conn, "waited", 0.0) + elapsed
            if conn.waited > self._identify_timeout:
                self._refuse(conn, f"no identification within {self._identify_timeout:.1f}s")
