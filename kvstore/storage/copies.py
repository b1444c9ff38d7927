"""A replica's data as one digest, and what a compacted LMDB copy (a backup's shard file) holds.

The digest (`data_digest`) is the one `Storage.checksum` reports: BLAKE2b-128 over every key with
its stored revision and value, in key order, each field length-prefixed so no two stores share
one. Anything that sees keys, values and revisions (the store itself, a copy opened read-only,
an eventual `Scan` of a running replica) computes the same value, so a backup, its restore and
every restored replica can be compared without trusting one another's code paths.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lmdb

_U64 = struct.Struct(">Q")
# The layout of kvstore.storage.engine (tests/unit/test_backup_files.py pins the two together).
_DATA_DB, _META_DB, _APPLIED = b"data", b"meta", b"applied"


class DataDigest:
    """Fed (key, revision, value) in key order; `hexdigest()` is the replica's data digest."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def add_raw(self, key: bytes, raw: bytes) -> None:
        """`raw`: the stored form, 8-byte big-endian revision then the value."""
        self._hash.update(_U64.pack(len(key)) + key + _U64.pack(len(raw)) + raw)

    def add(self, key: bytes, revision: int, value: bytes) -> None:
        self.add_raw(key, _U64.pack(revision) + value)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def data_digest(records: Iterable[tuple[bytes, bytes]]) -> str:
    """The digest of (key, stored raw value) pairs given in key order."""
    digest = DataDigest()
    for key, raw in records:
        digest.add_raw(key, raw)
    return digest.hexdigest()


@dataclass(frozen=True)
class CopyContents:
    applied_index: int
    key_count: int
    data_digest: str


class NotAStoreCopy(Exception):
    """The file is not a readable kvstore LMDB copy."""


def describe_copy(path: str | Path) -> CopyContents:
    """Open a compacted LMDB copy read-only (no lock file, nothing written) and read what it holds.

    Raises `NotAStoreCopy` when LMDB cannot open it or its kvstore tables are missing."""
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=8)
    except lmdb.Error as exc:
        raise NotAStoreCopy(f"{path}: not a readable LMDB file ({exc})") from exc
    try:
        with env.begin() as txn:
            if txn.get(_DATA_DB) is None or txn.get(_META_DB) is None:
                raise NotAStoreCopy(f"{path}: an LMDB file without kvstore's data and meta tables")
            data = env.open_db(_DATA_DB, txn=txn, create=False)
            meta = env.open_db(_META_DB, txn=txn, create=False)
            raw = txn.get(_APPLIED, db=meta)
            # The index leads the value (8 bytes; 16 when the entry's term follows it).
            applied = _U64.unpack_from(raw)[0] if raw and len(raw) >= _U64.size else 0
            digest = data_digest(txn.cursor(db=data))
            count = int(txn.stat(data)["entries"])
    except lmdb.Error as exc:
        raise NotAStoreCopy(f"{path}: unreadable LMDB ({exc})") from exc
    finally:
        env.close()
    return CopyContents(applied, count, digest)
