"""The Raft journal on a full disk: space is reserved before the mmap grows, so no SIGBUS."""

from __future__ import annotations

from pathlib import Path

from pysyncobj.journal import FileJournal

from kvstore.replication.journal import ReservedFileJournal


def test_journals_read_each_others_files(tmp_path: Path) -> None:
    theirs = FileJournal(str(tmp_path / "a"))
    for i in range(1, 50):
        theirs.add(b"cmd-%d" % i, i, 3)
    theirs.setCurrentTerm(3, "n1")
    theirs._destroy()
    ours = ReservedFileJournal(str(tmp_path / "a"))
    assert len(ours) == 49 and ours[48] == (b"cmd-49", 49, 3)
    assert ours.getCurrentTerm() == 3 and ours.getVotedForNodeId() == "n1"
    ours.deleteEntriesFrom(40)
    ours.deleteEntriesTo(10)
    ours.add(b"x" * 3_000_000, 41, 4)  # grows past the initial reservation
    ours._destroy()
    again = FileJournal(str(tmp_path / "a"))
    assert [e[1] for e in again] == [*range(11, 41), 41] and again[-1][0] == b"x" * 3_000_000
    again._destroy()
