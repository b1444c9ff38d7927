"""The restricted unpickler pysyncobj reads through, and the snapshot header's meta (issue 12)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pysyncobj.journal
import pysyncobj.pickle
import pytest
from pysyncobj.node import TCPNode

from kvstore.replication import safe_pickle, snapshots


class _Call:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


def test_plain_messages_round_trip_and_globals_are_refused() -> None:
    message = {
        "type": "append_entries",
        "term": 3,
        "entries": [(b"\x00cmd", 7, 3)],
        "sent_at": 1.5,
        "ok": True,
        "none": None,
        "set": {1, 2},
    }
    for protocol in (2, 5):  # 2: journals written before kvstore raised pysyncobj's protocol
        assert safe_pickle.loads(pickle.dumps(message, protocol)) == message
    for hostile in (_Call(), TCPNode("127.0.0.1:1"), pickle.loads):
        with pytest.raises(safe_pickle.RefusedGlobal):
            safe_pickle.loads(pickle.dumps(hostile, 5))
    # protocol 2 spells bytes as _codecs.encode(str, "latin1"): no other codec is allowed
    forged = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x06\x00\x00\x00rot_13\x86R."
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.loads(forged)


def test_pysyncobj_reads_through_the_restricted_unpickler() -> None:
    assert pysyncobj.pickle.loads is safe_pickle.loads
    assert pysyncobj.journal.loads is safe_pickle.loads
    with pytest.raises(safe_pickle.RefusedGlobal):
        pysyncobj.pickle.loads(pickle.dumps(_Call()))


def test_snapshot_meta_is_json_and_old_pickled_metas_still_load() -> None:
    meta = ((b"\x01cmd", 12, 2), (b"\x00", 11, 2), {TCPNode("127.0.0.1:5"), TCPNode("127.0.0.1:6")})
    blob = snapshots.encode_meta(meta)
    assert blob.startswith(b"{")
    last, before, cluster = snapshots.decode_meta(snapshots.MAGIC, blob)
    assert (last, before) == meta[:2] and isinstance(last, tuple)
    assert {n.address for n in cluster} == {"127.0.0.1:5", "127.0.0.1:6"}
    legacy = snapshots.decode_meta(b"KVSNAP01", pickle.dumps(meta))
    assert legacy[:2] == meta[:2] and {n.address for n in legacy[2]} == {"127.0.0.1:5", "127.0.0.1:6"}
    with pytest.raises(safe_pickle.RefusedGlobal):
        snapshots.decode_meta(b"KVSNAP01", pickle.dumps((meta[0], meta[1], _Call())))
