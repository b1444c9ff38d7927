"""A missing FUSE fails the power-loss tests under CI=true and only skips them elsewhere."""

from __future__ import annotations

import pytest

from tests.support.powerloss_mount import fuse_unavailable


def test_missing_fuse_is_a_failure_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="FUSE unavailable: no /dev/fuse"):
        fuse_unavailable("no /dev/fuse")


def test_missing_fuse_is_a_skip_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="FUSE unavailable"):
        fuse_unavailable("no /dev/fuse")
