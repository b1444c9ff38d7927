"""The Raft frame cipher (replication/peer_cipher.py): what it accepts, what it refuses, and that
pysyncobj uses it."""

from __future__ import annotations

import os

import pysyncobj.syncobj
import pytest

from kvstore.replication import peer_cipher
from kvstore.replication.peer_cipher import OVERHEAD, InvalidToken, PeerCipher

SECRET = b"a-shard-secret-of-at-least-32-characters"


def test_a_member_reads_what_another_member_of_the_group_sent() -> None:
    sender, receiver = PeerCipher(SECRET), PeerCipher(SECRET)  # two processes: two sending keys
    for size in (0, 1, 285, 1 << 20):
        data = os.urandom(size)
        token = sender.encrypt_at_time(data, 1234)
        assert len(token) == size + OVERHEAD
        assert receiver.decrypt(token) == data
        assert PeerCipher.extract_timestamp(token) == 1234


def test_another_secret_altered_or_truncated_tokens_and_junk_are_refused() -> None:
    token = PeerCipher(SECRET).encrypt_at_time(b"append entries", 7)
    with pytest.raises(InvalidToken):
        PeerCipher(b"another-shard-secret-of-32-characters!!").decrypt(token)
    for i in range(len(token)):  # every byte is covered: version, timestamp, salt, nonce, body, tag
        altered = bytearray(token)
        altered[i] ^= 0x01
        with pytest.raises(InvalidToken):
            PeerCipher(SECRET).decrypt(bytes(altered))
    for junk in (token[:-1], token[: OVERHEAD - 1], b"", os.urandom(200), b"gAAAAA" + os.urandom(100)):
        with pytest.raises(InvalidToken):
            PeerCipher(SECRET).decrypt(junk)
    with pytest.raises(InvalidToken):
        PeerCipher.extract_timestamp(b"x" * 10)


def test_nonces_never_repeat_and_tokens_of_one_message_differ() -> None:
    cipher = PeerCipher(SECRET)
    tokens = [cipher.encrypt_at_time(b"same", 1) for _ in range(1000)]
    head = 1 + 8 + 16
    nonces = {t[head : head + 12] for t in tokens}
    assert len(nonces) == 1000 and len(set(tokens)) == 1000
    assert tokens[0][9:25] != PeerCipher(SECRET).encrypt_at_time(b"same", 1)[9:25]  # salt per process


def test_the_sender_key_cache_is_bounded() -> None:
    receiver = PeerCipher(SECRET)
    for _ in range(300):  # 300 restarted members, each with its own sending key
        assert receiver.decrypt(PeerCipher(SECRET).encrypt_at_time(b"hi", 1)) == b"hi"
    assert len(receiver._peers) <= 256


def test_install_makes_pysyncobj_encrypt_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pysyncobj.syncobj, "getEncryptor", pysyncobj.syncobj.getEncryptor)
    peer_cipher.install()
    encryptor = pysyncobj.syncobj.getEncryptor(SECRET.decode())
    assert isinstance(encryptor, PeerCipher)
    assert PeerCipher(SECRET).decrypt(encryptor.encrypt_at_time(b"x", 3)) == b"x"
