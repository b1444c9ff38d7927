"""pysyncobj's wire format as kvstore reads it (kvstore.replication.peer_frames): what the fault proxy
decodes from a dialer's handshake, and the whole-frame filter its blackholes use. No sockets but a
socketpair, no processes."""

from __future__ import annotations

import datetime
import os
import socket
import zlib

import pytest
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import TcpConnection

# kvstore's nodes pickle with protocol 5 (set when the state machine module loads): in protocol 2 the
# handshake's connection key (bytes) would need a global, which the handshake decoder refuses.
from kvstore.replication import state_machine  # noqa: F401
from kvstore.replication.peer_cipher import PeerCipher
from kvstore.replication.peer_frames import (
    HANDSHAKE_MAX_BYTES,
    MAX_REASON,
    FrameFilter,
    decode_first_frame,
    encode_frame,
    handshake_address,
    inflate,
    looks_encrypted,
    read_refusal,
    refusal,
)

NOT_A_FRAME = b"\xff\xff\xff\xff"  # length -1


def sent_by_pysyncobj(message: object, encryptor: object = None, key: bytes | None = None) -> bytes:
    """The bytes pysyncobj's own TcpConnection writes for message (encrypted, with a connection key,
    as in the third frame of the secured handshake, when given)."""
    ours, theirs = socket.socketpair()
    conn = TcpConnection(createPoller("select"), socket=ours)
    conn.encryptor, conn.sendRandKey = encryptor, key
    try:
        conn.send(message)
        return theirs.recv(HANDSHAKE_MAX_BYTES * 2)
    finally:
        conn.disconnect()
        theirs.close()


def test_decodes_the_address_pysyncobj_actually_sends() -> None:
    """The frame written by pysyncobj's own TcpConnection decodes to the announced address."""
    data = sent_by_pysyncobj("127.0.0.1:4321")
    assert decode_first_frame(data) == "127.0.0.1:4321"
    assert data == encode_frame("127.0.0.1:4321")
    assert not looks_encrypted(data)


def test_refuses_garbage_and_globals() -> None:
    assert decode_first_frame(b"") is None
    assert decode_first_frame(NOT_A_FRAME + b"x" * 10) is None
    assert decode_first_frame(encode_frame("addr")[:-1]) is None  # truncated
    # A pickle that needs a global (here datetime.date) is refused instead of being imported.
    assert decode_first_frame(encode_frame(datetime.date(2020, 1, 1))) is None
    assert decode_first_frame(encode_frame(["status"])) == ["status"]  # admin tools: not an address
    # Larger than any handshake, on the wire or decompressed: not decoded (nor waited for).
    assert decode_first_frame(encode_frame(os.urandom(HANDSHAKE_MAX_BYTES))) is None
    assert decode_first_frame(encode_frame("a" * (HANDSHAKE_MAX_BYTES + 1))) is None


def test_reads_the_address_of_an_encrypted_handshake_only_with_the_secret() -> None:
    cipher = PeerCipher(b"s" * 32)
    key = os.urandom(32)
    data = sent_by_pysyncobj("127.0.0.1:4321", cipher, key)
    assert looks_encrypted(data)
    assert decode_first_frame(data) is None
    assert decode_first_frame(data, PeerCipher(b"t" * 32)) is None  # another shard's secret
    message = decode_first_frame(data, cipher)
    assert message == (key, "127.0.0.1:4321")
    assert handshake_address(message) == "127.0.0.1:4321"
    assert handshake_address("127.0.0.1:4321") is None  # not the (key, address) form


def test_inflate_refuses_bombs_and_truncation() -> None:
    packed = zlib.compress(b"x" * 10_000)
    assert inflate(packed, 10_000) == b"x" * 10_000
    with pytest.raises(ValueError):
        inflate(packed, 9_999)
    with pytest.raises(ValueError):
        inflate(packed[:-3], 10_000)


def test_frame_filter_drops_whole_frames_across_chunk_boundaries() -> None:
    first, second, third = encode_frame("first"), encode_frame("second " * 20), encode_frame("third")
    drop = iter([True, False])  # asked once per frame after the passed first one: drop second, keep third
    gate = FrameFilter(framed=True, pass_first=True, drop=lambda: next(drop))
    stream = first + second + third
    out, dropped = b"", 0
    for i in range(0, len(stream), 3):  # headers and bodies split across chunks
        kept, lost = gate.filter(stream[i : i + 3])
        out, dropped = out + kept, dropped + lost
    assert out == first + third
    assert dropped == len(second)


def test_frame_filter_judges_unframed_bytes_chunk_by_chunk() -> None:
    blocked = [False]
    gate = FrameFilter(framed=True, pass_first=False, drop=lambda: blocked[0])
    assert gate.filter(NOT_A_FRAME + b"raw") == (NOT_A_FRAME + b"raw", 0)  # a negative length: raw from here
    blocked[0] = True
    assert gate.filter(b"more") == (b"", 4)
    unframed = FrameFilter(framed=False, pass_first=True, drop=lambda: True)
    assert unframed.filter(b"abc") == (b"", 3)


def test_members_send_frames_stored_not_compressed() -> None:
    # kvstore's connections (GuardedTcpConnection) store the body (zlib level 0): no CPU spent on
    # compression, and a frame's length says nothing about how much of its data repeats. pysyncobj
    # peers still read it: it is a zlib stream.
    from pysyncobj import pickle as pysyncobj_pickle

    from kvstore.replication.peer_transport import GuardedTcpConnection

    message = {"type": "append_entries", "entries": [(b"v" * 4000, 7, 2)]}  # compresses ~50x
    ours, theirs = socket.socketpair()
    conn = GuardedTcpConnection.guard(TcpConnection(createPoller("select"), socket=ours), 1 << 20, 1 << 20)
    try:
        conn.send(message)
        frame = theirs.recv(1 << 16)
    finally:
        conn.disconnect()
        theirs.close()
    body = frame[4:]
    assert int.from_bytes(frame[:4], "little") == len(body)
    assert zlib.decompress(body) == pysyncobj_pickle.dumps(message)
    assert len(body) > 4000  # stored: pysyncobj's level 3 made it ~100 bytes


def test_a_refusals_reason_is_capped_on_both_sides() -> None:
    assert read_refusal(refusal("x" * 10_000)) == "x" * MAX_REASON
    # A peer that does not cap its own (a member, authenticated, but still not trusted to be small):
    assert read_refusal({"type": "kvstore_refused", "reason": "y" * 10_000}) == "y" * MAX_REASON
    assert read_refusal({"type": "kvstore_refused", "reason": b"bytes"}) == ""
    assert read_refusal({"type": "append_entries"}) is None
