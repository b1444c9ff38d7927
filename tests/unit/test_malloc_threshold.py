"""A node pins glibc's mmap threshold (kvstore/server/node.py: why, and what it measured)."""

from __future__ import annotations

import platform

from kvstore.server.node import fix_malloc_threshold


def test_the_mmap_threshold_is_pinned_on_glibc_and_left_alone_elsewhere() -> None:
    # mallopt returns 1 on success; on a libc without it the node starts all the same.
    assert fix_malloc_threshold() is (platform.libc_ver()[0] == "glibc")
