"""A small tmpfs for full-disk tests (needs root, which CI has): a real filesystem that fills up."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` at `path`; unmounted on exit. Under CI=true a failure to
    mount fails the test (a skip there would hide that the full-disk behaviour went untested)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs at {path}: {result.stderr.strip() or result.returncode}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int, chunk: int = 1 << 20) -> Path:
    """Write a filler file at `path` until at most `leave_bytes` are free on its filesystem."""
    with open(path, "wb") as f:
        while True:
            st = os.statvfs(path.parent)
            free = st.f_bavail * st.f_frsize
            if free <= leave_bytes:
                break
            try:
                f.write(b"\0" * min(chunk, max(4096, free - leave_bytes)))
                f.flush()
            except OSError:
                break
    return path
