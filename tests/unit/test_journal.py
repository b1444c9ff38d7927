"""The Raft journal (kvstore/replication/journal.py): space reserved before the mmap grows, records
with checksums, a torn tail dropped at open, format-1 journals upgraded, and syncs that happen."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, FileJournal

from kvstore.replication import journal
from kvstore.replication.journal import JournalFormatError, ReservedFileJournal


def _fill(j: ReservedFileJournal, n: int, term: int = 3) -> None:
    for i in range(1, n + 1):
        j.add(b"cmd-%d" % i, i, term)


def test_a_journal_reads_back_what_it_wrote(tmp_path: Path) -> None:
    j = ReservedFileJournal(str(tmp_path / "j"), durable=True)
    _fill(j, 49)
    j.setCurrentTerm(3, "n1")
    j.deleteEntriesFrom(40)
    j.deleteEntriesTo(10)
    j.add(b"x" * 3_000_000, 41, 4)  # grows past the initial reservation
    j._destroy()
    again = ReservedFileJournal(str(tmp_path / "j"))
    assert [e[1] for e in again] == [*range(11, 41), 41] and again[-1][0] == b"x" * 3_000_000
    assert again.getCurrentTerm() == 3 and again.getVotedForNodeId() == "n1"


def test_a_pysyncobj_journal_is_upgraded_to_checksummed_records(tmp_path: Path) -> None:
    """Format 1 (pysyncobj's FileJournal, and kvstore before checksums) is rewritten at open."""
    theirs = FileJournal(str(tmp_path / "a"))
    _fill(theirs, 49)
    theirs.setCurrentTerm(3, "n1")
    theirs._destroy()
    ours = ReservedFileJournal(str(tmp_path / "a"), durable=True)
    assert len(ours) == 49 and ours[48] == (b"cmd-49", 49, 3)
    assert ours.getCurrentTerm() == 3 and ours.getVotedForNodeId() == "n1"
    ours._destroy()
    header = (tmp_path / "a").read_bytes()[:FIRST_RECORD_OFFSET]
    assert struct.unpack_from("<I", header, journal._FORMAT_OFFSET)[0] == journal.FORMAT_CHECKSUMMED
    assert not (tmp_path / "a.upgrade").exists()
    assert [e[1] for e in ReservedFileJournal(str(tmp_path / "a"))] == list(range(1, 50))


def test_a_torn_tail_is_dropped_at_open_and_the_log_goes_on(tmp_path: Path) -> None:
    """A power cut can leave the header's end offset past records that never reached the disk:
    the first record whose checksum fails ends the log; later adds continue from there."""
    path = tmp_path / "j"
    j = ReservedFileJournal(str(path), durable=True)
    _fill(j, 20)
    j.sync()
    j._destroy()
    data = bytearray(path.read_bytes())
    end = struct.unpack_from("<I", data, LAST_RECORD_OFFSET_OFFSET)[0]
    record = len(journal._record(b"cmd-20", 20, 3))
    data[end - record + 12] ^= 0xFF  # a byte of entry 20's idx/term: the last record is torn
    path.write_bytes(bytes(data))
    again = ReservedFileJournal(str(path), durable=True)
    assert [e[1] for e in again] == list(range(1, 20))
    again.add(b"new-20", 20, 4)
    again._destroy()
    assert [e[:2] for e in ReservedFileJournal(str(path))][-2:] == [(b"cmd-19", 19), (b"new-20", 20)]


def test_a_header_offset_past_the_file_is_a_torn_tail_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = ReservedFileJournal(str(path))
    _fill(j, 5)
    j._destroy()
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, LAST_RECORD_OFFSET_OFFSET, len(data) + 4096)  # zeros after the records
    path.write_bytes(bytes(data))
    assert [e[1] for e in ReservedFileJournal(str(path))] == [1, 2, 3, 4, 5]


def test_a_journal_of_an_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    ReservedFileJournal(str(path))._destroy()
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, journal._FORMAT_OFFSET, 9)
    path.write_bytes(bytes(data))
    with pytest.raises(JournalFormatError, match="raft journal format 9; this version reads formats 1 and 2"):
        ReservedFileJournal(str(path))


def test_a_durable_journal_syncs_records_term_and_vote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts the syscalls: one fdatasync covers every record added since the last sync (group
    commit); term and vote reach the disk (file + directory fsync) before setCurrentTerm returns;
    a journal made with durable=False syncs nothing."""
    calls: list[str] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    j = ReservedFileJournal(str(tmp_path / "d"), durable=True)
    calls.clear()
    _fill(j, 3)
    j.sync()
    j.sync()  # nothing new: no syscall
    assert calls == ["fdatasync"]
    calls.clear()
    j.setCurrentTerm(7, "n2")
    assert calls == ["fsync", "fsync"]  # the meta file, then its directory (the rename)
    calls.clear()
    lax = ReservedFileJournal(str(tmp_path / "n"), durable=False)
    _fill(lax, 3)
    lax.sync()
    lax.setCurrentTerm(7, "n2")
    assert calls == []
