"""Mount, cut and unmount the power-loss filesystem (tests/support/powerloss_fs.py) from a test.

A power cut on one mount: `PowerLossMount.cut()`. The processes using it must already be dead
(SIGKILL): the daemon reverts every unsynced change and discards the writes that still arrive
(the dead processes' dirty mmap pages, flushed when the mount goes away), the mount is replaced
by a fresh one over the same backing directory, so no page cache from before the cut survives.
Every daemon is stopped by its PID and every mount unmounted by its path, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import pytest

CONTROL_NAME = ".powerloss-control"
REPO = Path(__file__).resolve().parents[2]


class FuseUnavailable(RuntimeError):
    pass


def require_fuse() -> None:
    """Fail under CI=true, skip elsewhere, when FUSE cannot be used here."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401 (only whether it loads libfuse3)
    except (ImportError, OSError) as err:
        problems.append(f"mfusepy cannot load libfuse: {err}")
    if problems:
        fuse_unavailable("; ".join(problems) + " (run tests/support/install-fuse)")


def fuse_unavailable(reason: str) -> NoReturn:
    """Under CI=true a failure (the project's setup installs FUSE: its absence is a broken setup,
    and a skip would hide that power loss went untested); elsewhere a skip."""
    reason = f"FUSE unavailable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class CutReport:
    files_reverted: int
    bytes_dropped: int
    blocks_kept: int
    files_removed: list[str]
    names_undone: int


class PowerLossMount:
    """`mountpoint` shows `backing` through the power-loss filesystem while the mount is up."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path | None = None) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.report_path = backing.parent / f".{backing.name}.cut.json"
        self.log = log or backing.parent / f".{backing.name}.fuse.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 10.0) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.powerloss_fs", str(self.backing), str(self.mountpoint)]
                + ["--report", str(self.report_path)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise FuseUnavailable(f"no mount at {self.mountpoint}: see {self.log}")
            time.sleep(0.02)

    def cut(self, torn_seed: int | None = None) -> CutReport:
        """Power loss: everything not synced is gone (with `torn_seed`, a random part of it); the
        mount is back up, fresh, afterwards."""
        self.report_path.unlink(missing_ok=True)
        fd = os.open(self.mountpoint / CONTROL_NAME, os.O_WRONLY)
        try:
            os.write(fd, b"cut" if torn_seed is None else b"cut torn %d" % torn_seed)
        finally:
            os.close(fd)
        report = json.loads(self.report_path.read_text())
        self.unmount()
        self.mount()
        return CutReport(**report)

    def unmount(self) -> None:
        """Unmount by path and stop the daemon by PID (idempotent)."""
        if _in_mount_table(self.mountpoint):
            result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if result.returncode != 0:  # busy: detach it now, it goes when the last user does
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(5)
            self.proc = None

    def __enter__(self) -> PowerLossMount:
        self.mount()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()


def _in_mount_table(path: Path) -> bool:
    """Mounted, even when its daemon died (os.path.ismount says no then: the stat fails)."""
    target = os.path.realpath(path).encode()
    with open("/proc/self/mounts", "rb") as f:
        # Fields are space-separated with spaces in paths escaped as \040.
        return any(line.split()[1].replace(b"\\040", b" ") == target for line in f)
