"""The data dir's identity file and the peers' incarnation records (kvstore/storage/identity.py),
and the Raft hello that carries them (kvstore/replication/peer_frames.py). No processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kvstore.replication.peer_frames import decode_first_frame, encode_frame, hello, read_hello
from kvstore.storage.identity import (
    FORMAT,
    IDENTITY_FILE,
    PEERS_FILE,
    DataDirError,
    PeerIncarnations,
    open_identity,
    upgrade_identity,
)


def test_a_new_data_dir_gets_an_identity_that_later_starts_reuse(tmp_path: Path) -> None:
    first = open_identity(tmp_path / "d", "c1")
    assert first.format == FORMAT and first.cluster == "c1" and len(first.incarnation) == 16
    assert open_identity(tmp_path / "d", "c1") == first
    on_disk = json.loads((tmp_path / "d" / IDENTITY_FILE).read_text())
    assert on_disk == {"format": FORMAT, "cluster": "c1", "incarnation": first.incarnation}
    assert open_identity(tmp_path / "e", "c1").incarnation != first.incarnation


def test_another_cluster_a_newer_format_an_unreadable_file_or_no_id_are_refused(tmp_path: Path) -> None:
    open_identity(tmp_path / "d", "c1")
    with pytest.raises(
        DataDirError, match="belongs to cluster c1, but this node is configured for cluster c2"
    ):
        open_identity(tmp_path / "d", "c2")
    path = tmp_path / "d" / IDENTITY_FILE
    identity = json.loads(path.read_text())
    path.write_text(json.dumps({**identity, "format": FORMAT + 1}))
    with pytest.raises(DataDirError, match=f"format {FORMAT + 1}, written by a newer kvstore"):
        open_identity(tmp_path / "d", "c1")
    path.write_text("{not json")
    with pytest.raises(DataDirError, match="unreadable"):
        open_identity(tmp_path / "d", "c1")
    with pytest.raises(DataDirError, match="cluster.id is not set"):
        open_identity(tmp_path / "new", "")


def test_an_older_format_is_upgraded_keeping_its_incarnation(tmp_path: Path) -> None:
    first = open_identity(tmp_path / "d", "c1")
    path = tmp_path / "d" / IDENTITY_FILE
    path.write_text(json.dumps({"format": 1, "cluster": "c1", "incarnation": first.incarnation}))
    old = open_identity(tmp_path / "d", "c1")
    assert old.format == 1  # as found: the caller rebuilds the slot index before upgrading
    again = upgrade_identity(tmp_path / "d", old)
    assert again == first and again.format == FORMAT == 2
    # Written back: a release of format 1 (which would not keep the slot index) now refuses the dir.
    assert json.loads(path.read_text())["format"] == FORMAT
    assert upgrade_identity(tmp_path / "d", again) == again


def test_peers_are_recorded_on_first_contact_refused_when_changed_and_forgettable(tmp_path: Path) -> None:
    known = PeerIncarnations(tmp_path)
    assert known.check("a:1", "inc1") is None  # first contact: recorded
    assert json.loads((tmp_path / PEERS_FILE).read_text()) == {"a:1": "inc1"}
    assert known.check("a:1", "inc1") is None
    assert known.check("a:1", "inc2") == "inc1"  # wiped: refused, naming what it was
    assert PeerIncarnations(tmp_path).check("a:1", "inc2") == "inc1"  # persisted across restarts
    # `kvstore node --forget-peer` from another process while the node runs: seen at the next check.
    assert PeerIncarnations(tmp_path).forget("a:1") is True
    assert PeerIncarnations(tmp_path).forget("a:1") is False
    assert known.check("a:1", "inc2") is None
    assert PeerIncarnations(tmp_path).known() == {"a:1": "inc2"}


def test_concurrent_first_contacts_and_forgets_lose_no_record(tmp_path: Path) -> None:
    PeerIncarnations(tmp_path).check("keep:1", "k")

    def contact(i: int) -> None:
        PeerIncarnations(tmp_path).check(f"p{i}:1", f"i{i}")

    threads = [threading.Thread(target=contact, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=PeerIncarnations(tmp_path).forget, args=("keep:1",)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert PeerIncarnations(tmp_path).known() == {f"p{i}:1": f"i{i}" for i in range(8)}


def test_the_hello_round_trips_through_a_frame_and_anything_else_is_not_one() -> None:
    message = hello("c1", "inc", "s0r1")
    assert message["type"] == "kvstore_hello"  # a previous-release node ignores an unknown type
    said = read_hello(decode_first_frame(encode_frame(message)))
    assert said is not None and (said.cluster, said.incarnation, said.name) == ("c1", "inc", "s0r1")
    for other in ["127.0.0.1:1", {"type": "append_entries"}, {**message, "cluster": 7}, None, b"x"]:
        assert read_hello(other) is None


def test_a_refusal_note_round_trips_and_is_told_apart_from_a_hello() -> None:
    from kvstore.replication.peer_frames import read_refusal, refusal

    note = decode_first_frame(encode_frame(refusal("because")))
    assert read_refusal(note) == "because" and read_hello(note) is None
    assert read_refusal(hello("c", "i", "n")) is None
    assert len(refusal("x" * 10_000)["reason"]) == 2000  # stays a handshake-sized frame
