"""pysyncobj 0.3.17's wire format between Raft peers, for code that reads or writes it from outside
pysyncobj: the secure transport (`peer_transport`) and the fault proxy (`kvstore.chaos.proxy`).

A connection is a stream of frames, each `struct.pack('i', len(data)) + data` (native byte order,
4-byte signed length) with `data = zlib.compress(pickle.dumps(message), 3)`, encrypted
(replication/peer_cipher.py) when the group has a secret (`SyncObjConf(password=...)`). Only the
node with the greater address string dials (`TCPTransport._shouldConnect`), and its first message
announces its own advertised address (`_sendSelfAddress`):
- without a secret (`--insecure`, raw pysyncobj tests), the address is the dialer's first frame;
- with a secret, the dialer first sends a connection key, the target answers with its own, and only
  then does the dialer send `(target's key, address)`.
kvstore then adds a hello to each side (kvstore/replication/peer_transport.py): the dialer sends
one right after its address, the target answers with its own before anything else (`hello`).
Handshake frames are small (a 32-byte key, an address: ~200 bytes even encrypted), so readers cap them
at HANDSHAKE_MAX_BYTES before buffering their bodies.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from pysyncobj import pickle as pysyncobj_pickle

from kvstore.replication.peer_cipher import looks_like_token

# pysyncobj packs the length with struct.pack('i', ...): native byte order, 4-byte signed int.
FRAME_HEADER = struct.Struct("=i")
# Cap on a handshake frame, on the wire and decompressed: a larger length means "not a handshake
# frame", and it must not be buffered while we wait for it.
HANDSHAKE_MAX_BYTES = 4096


HELLO_VERSION = 1


class Hello(NamedTuple):
    cluster: str
    incarnation: str
    name: str


def hello(cluster: str, incarnation: str, name: str) -> dict[str, Any]:
    """A replica's hello: its cluster id, its data dir's incarnation, its name (for messages).
    A dict with a `type` pysyncobj does not know: a node of the previous release (no hellos)
    that receives one ignores it, as it ignores any message type it does not handle."""
    return {
        "type": "kvstore_hello",
        "kvstore_hello": HELLO_VERSION,
        "cluster": cluster,
        "incarnation": incarnation,
        "name": name,
    }


def read_hello(message: object) -> Hello | None:
    """The hello in `message`, or None if it is not one."""
    if not isinstance(message, dict) or message.get("kvstore_hello") != HELLO_VERSION:
        return None
    fields = (message.get("cluster"), message.get("incarnation"), message.get("name", ""))
    if not all(isinstance(f, str) for f in fields):
        return None
    return Hello(*fields)  # type: ignore[arg-type]


MAX_REASON = 2000  # characters of a refusal's reason sent, and logged from a peer


def refusal(reason: str) -> dict[str, Any]:
    """What a replica sends a peer it refuses, just before it closes the connection, so that the
    refused node's own log says why (a type pysyncobj ignores, like the hello's)."""
    return {"type": "kvstore_refused", "reason": reason[:MAX_REASON]}


def read_refusal(message: object) -> str | None:
    """The reason in a refusal, or None if `message` is not one."""
    if isinstance(message, dict) and message.get("type") == "kvstore_refused":
        reason = message.get("reason")
        return reason[:MAX_REASON] if isinstance(reason, str) else ""  # ours are capped; a peer's may not be
    return None


def inflate(data: bytes, cap: int) -> bytes:
    """zlib-decompress a frame's body, refusing (ValueError) one larger than cap decompressed or
    truncated: a small frame must not expand into a huge message (a zip bomb)."""
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data, cap)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"message larger than {cap} bytes decompressed, or truncated")
    return raw


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler that cannot import anything: bytes from a peer must never run code in our process.
    Stricter than `safe_pickle`: a handshake message (a key, an address) needs no global at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def frame_length(buf: bytes) -> int | None:
    """Bytes needed for the handshake frame starting buf (header included), or None if it cannot be
    one (a length <= 0 or over HANDSHAKE_MAX_BYTES)."""
    if len(buf) < FRAME_HEADER.size:
        return FRAME_HEADER.size
    (length,) = FRAME_HEADER.unpack_from(buf)
    if not 0 < length <= HANDSHAKE_MAX_BYTES:
        return None
    return FRAME_HEADER.size + length


def decode_first_frame(buf: bytes, cipher: Any = None) -> object | None:
    """The message in the handshake frame at the start of buf (decrypted with cipher, the group's
    `PeerCipher`, if given), or None if there is none."""
    total = frame_length(buf)
    if total is None or len(buf) < total or total == FRAME_HEADER.size:
        return None
    try:
        body = buf[FRAME_HEADER.size : total]
        if cipher is not None:
            body = cipher.decrypt(body)
        # Truncated, or bigger than any address: not a handshake frame.
        raw = inflate(body, HANDSHAKE_MAX_BYTES)
        return _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except Exception:  # garbage raises anything from zlib.error to EOFError/ValueError: "not a frame"
        return None


def looks_encrypted(buf: bytes) -> bool:
    """A frame holding a token of `peer_cipher` (a group with a secret): framed, not decodable
    without the secret."""
    total = frame_length(buf)
    return total is not None and len(buf) >= total > FRAME_HEADER.size and looks_like_token(buf[4:total])


def handshake_address(message: object) -> object | None:
    """What the dialer's `(target's key, address)` message of the encrypted handshake announces."""
    if isinstance(message, tuple) and len(message) == 2:
        return message[1]
    return None


def encode_frame(message: object) -> bytes:
    """Frame a message exactly as pysyncobj 0.3.17 `TcpConnection.send` does without a password
    (with pysyncobj's own pickler, whose protocol kvstore's state machine raises to 5)."""
    data = zlib.compress(pysyncobj_pickle.dumps(message), 3)
    return FRAME_HEADER.pack(len(data)) + data


class FrameFilter:
    """Lets whole frames of a stream through or drops them, deciding once per frame when its header
    arrives (`drop()` is asked then).

    Dropping raw bytes would cut frames in two: the receiver would read the middle of one message as
    the length of the next and lose sync (or, if the dialer's address frame was dropped, take a Raft
    message for the address: pysyncobj 0.3.17 then raises TypeError on every tick). Whole-frame drops
    keep the stream well-formed, so to pysyncobj they look like lost messages. A stream that is not
    framed (or a negative length) is judged chunk by chunk as raw bytes."""

    def __init__(self, framed: bool, pass_first: bool, drop: Callable[[], bool]) -> None:
        self._framed = framed
        # The dialer's address frame is connection setup (like a TCP handshake): never dropped.
        self._pass_next = pass_first
        self._drop = drop
        self._header = b""
        self._left = 0  # body bytes of the current frame still to come
        self._keep = True

    def filter(self, chunk: bytes) -> tuple[bytes, int]:
        """(bytes to forward, count of bytes dropped) for the next chunk of the stream."""
        if not self._framed:
            return (b"", len(chunk)) if self._drop() else (chunk, 0)
        kept: list[bytes] = []
        dropped = pos = 0
        while pos < len(chunk):  # every pass consumes at least one byte
            if not self._framed:  # a negative length: judge the rest as raw bytes
                piece, pos = chunk[pos:], len(chunk)
                self._keep = not self._drop()
            elif self._left == 0:
                take = FRAME_HEADER.size - len(self._header)
                self._header += chunk[pos : pos + take]
                pos += take
                if len(self._header) < FRAME_HEADER.size:
                    break  # the header continues in the next chunk
                piece = self._start_frame()
            else:
                take = min(self._left, len(chunk) - pos)
                piece, pos = chunk[pos : pos + take], pos + take
                self._left -= take
            if self._keep:
                kept.append(piece)
            else:
                dropped += len(piece)
        return b"".join(kept), dropped

    def _start_frame(self) -> bytes:
        header, self._header = self._header, b""
        (length,) = FRAME_HEADER.unpack(header)
        self._keep = self._pass_next or not self._drop()
        self._pass_next = False
        self._framed = length >= 0
        self._left = max(length, 0)
        return header
