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

from kvstore.storage.disk import fsync_directory
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


def test_new_files_are_kept_only_when_synced_or_their_directory_is(fs: PowerLossMount) -> None:
    root = fs.mountpoint
    _write(root / "never-synced", b"gone", sync=False)
    _write(root / "synced", b"kept", sync=True)
    (root / "sub").mkdir()
    _write(root / "sub" / "dir-synced", b"data not synced", sync=False)
    fsync_directory(root / "sub")
    report = fs.cut()
    assert report.files_removed == ["/never-synced"]
    assert sorted(p.name for p in root.iterdir()) == ["sub", "synced"]
    assert (root / "synced").read_bytes() == b"kept"
    assert (root / "sub" / "dir-synced").read_bytes() == b""  # its name is durable, its data not


def test_renames_and_unlinks_are_undone_without_a_directory_fsync(fs: PowerLossMount) -> None:
    root = fs.mountpoint
    for name in ("replaced", "moved", "unlinked", "renamed-durably"):
        _write(root / name, name.encode(), sync=True)
    fsync_directory(root)
    # The usual atomic replace, without the directory fsync: the old content is what survives.
    _write(root / "replaced.tmp", b"new content", sync=True)
    os.rename(root / "replaced.tmp", root / "replaced")
    os.rename(root / "moved", root / "moved-to")
    os.unlink(root / "unlinked")
    assert sorted(p.name for p in root.iterdir()) == ["moved-to", "renamed-durably", "replaced"]
    (root / "d").mkdir()
    os.rename(root / "renamed-durably", root / "d" / "there")
    fsync_directory(root / "d")
    report = fs.cut()
    assert report.names_undone == 3
    # The fsynced tmp file's own name was durable (fsync of a new file), the rename not.
    assert sorted(p.name for p in root.iterdir()) == ["d", "moved", "replaced", "replaced.tmp", "unlinked"]
    assert (root / "replaced").read_bytes() == b"replaced"
    assert (root / "replaced.tmp").read_bytes() == b"new content"
    assert (root / "moved").read_bytes() == b"moved"
    assert (root / "unlinked").read_bytes() == b"unlinked"
    assert (root / "d" / "there").read_bytes() == b"renamed-durably"


def test_a_new_file_renamed_over_another_without_syncs_leaves_the_old_one(fs: PowerLossMount) -> None:
    root = fs.mountpoint
    _write(root / "meta", b"v1", sync=True)
    fsync_directory(root)
    for version in (b"v2", b"v3"):  # pysyncobj's meta file: tmp, rename, no fsync at all
        _write(root / "meta.tmp", version, sync=False)
        os.rename(root / "meta.tmp", root / "meta")
    assert (root / "meta").read_bytes() == b"v3"
    fs.cut()
    assert sorted(p.name for p in root.iterdir()) == ["meta"]
    assert (root / "meta").read_bytes() == b"v1"


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
