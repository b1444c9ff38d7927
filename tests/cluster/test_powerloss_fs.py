"""The power-loss filesystem for tests (tests/support/powerloss_fs.py): what a cut keeps and drops.

Each test mounts it over a backing directory (a real FUSE daemon process), changes files through
the mount, cuts the power and checks the files through the fresh mount that replaces it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.powerloss_mount import FuseUnavailable, PowerLossMount, fuse_unavailable, require_fuse


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerLossMount]:
    require_fuse()
    mount = PowerLossMount(tmp_path / "backing", tmp_path / "mnt")
    try:
        mount.mount()
    except FuseUnavailable as err:
        fuse_unavailable(str(err))
    try:
        yield mount
    finally:
        mount.unmount()


def _write(path: Path, data: bytes, sync: bool, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def test_only_the_synced_part_of_a_file_survives_a_cut(fs: PowerLossMount) -> None:
    path = fs.mountpoint / "f"
    with open(path, "wb") as f:
        f.write(b"a" * 10_000)
        f.flush()
        os.fsync(f.fileno())
        f.seek(5_000)
        f.write(b"b" * 10_000)  # overwrites synced bytes and extends the file
        f.flush()
    assert path.stat().st_size == 15_000
    report = fs.cut()
    assert path.read_bytes() == b"a" * 10_000
    assert (fs.backing / "f").read_bytes() == b"a" * 10_000
    assert report.files_reverted == 1 and report.bytes_dropped >= 5_000


def test_fdatasync_counts_as_a_sync_and_later_writes_are_lost(fs: PowerLossMount) -> None:
    path = fs.mountpoint / "f"
    _write(path, b"x" * 100, sync=True)
    with open(path, "r+b") as f:
        f.write(b"y" * 50)
        f.flush()
        os.fdatasync(f.fileno())
        f.write(b"z" * 50)
        f.flush()
    fs.cut()
    assert path.read_bytes() == b"y" * 50 + b"x" * 50


def test_an_unsynced_truncate_is_undone_and_a_synced_one_kept(fs: PowerLossMount) -> None:
    undone, kept = fs.mountpoint / "undone", fs.mountpoint / "kept"
    _write(undone, bytes(range(256)) * 40, sync=True)
    _write(kept, b"k" * 9_000, sync=True)
    os.truncate(undone, 10)
    with open(kept, "r+b") as f:
        f.truncate(100)
        os.fsync(f.fileno())
    _write(undone, b"", sync=False)  # "wb" opens with O_TRUNC: also undone
    fs.cut()
    assert undone.read_bytes() == bytes(range(256)) * 40
    assert kept.read_bytes() == b"k" * 100


def test_new_files_renames_and_directory_syncs(fs: PowerLossMount) -> None:
    root = fs.mountpoint
    _write(root / "never-synced", b"gone", sync=False)
    _write(root / "synced", b"kept", sync=True)
    _write(root / "tmp", b"unsynced data", sync=False)
    os.rename(root / "tmp", root / "renamed")  # the rename is durable, its data is not
    (root / "sub").mkdir()
    _write(root / "sub" / "dir-synced", b"data not synced", sync=False)
    fd = os.open(root / "sub", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    report = fs.cut()
    assert report.files_removed == ["/never-synced"]
    assert not (root / "never-synced").exists()
    assert (root / "synced").read_bytes() == b"kept"
    assert (root / "renamed").read_bytes() == b""  # the zero-length file of a real crash
    assert (root / "sub" / "dir-synced").read_bytes() == b""


def test_mmap_writes_survive_only_if_msynced(fs: PowerLossMount) -> None:
    path = fs.mountpoint / "mapped"
    _write(path, b"\0" * 3 * mmap.PAGESIZE, sync=True)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 3 * mmap.PAGESIZE) as mm:
        mm[0:6] = b"synced"
        mm.flush()  # msync(MS_SYNC): the dirty page is written, then fsync
        mm[mmap.PAGESIZE : mmap.PAGESIZE + 4] = b"lost"
        mm[2 * mmap.PAGESIZE : 2 * mmap.PAGESIZE + 4] = b"lost"
        # No msync: the pages are dirty in the page cache when the power goes.
    fs.cut()
    data = path.read_bytes()
    assert data[0:6] == b"synced"
    assert data[mmap.PAGESIZE :] == b"\0" * 2 * mmap.PAGESIZE


def test_writes_after_the_cut_are_kept_until_the_next_one(fs: PowerLossMount) -> None:
    path = fs.mountpoint / "f"
    _write(path, b"one", sync=True)
    fs.cut()
    _write(path, b"two", sync=True)
    _write(path, b"three", sync=False, mode="ab")
    assert path.read_bytes() == b"twothree"
    fs.cut()
    assert path.read_bytes() == b"two"


def test_a_torn_cut_keeps_whole_blocks_of_either_version_and_repeats_with_its_seed(
    fs: PowerLossMount,
) -> None:
    path, blocks = fs.mountpoint / "f", 32
    outcomes = []
    for _ in range(2):
        _write(path, b"a" * 4096 * blocks, sync=True)
        _write(path, b"b" * 4096 * (blocks + 4), sync=False, mode="r+b")  # overwrites and extends
        report = fs.cut(torn_seed=7)
        data = path.read_bytes()
        assert len(data) in (4096 * blocks, 4096 * (blocks + 4))
        chunks = {data[i : i + 4096] for i in range(0, len(data), 4096)}
        assert chunks <= {b"a" * 4096, b"b" * 4096, b"\0" * 4096}  # past the old end: zeros or b
        assert b"a" * 4096 in chunks and b"b" * 4096 in chunks, "a torn cut kept all or nothing"
        assert 0 < report.blocks_kept < blocks + 4
        outcomes.append(data)
    assert outcomes[0] == outcomes[1]
