"""The README's error table lists every error in kvstore/errors.py, each with its own kind, gRPC
status code and retryable flag, so the list cannot fall behind the code again."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kvstore import errors

README = Path(__file__).resolve().parents[2] / "README.md"

# | `Name` (an `Base`) | `kind` | `CODE` (...) | yes/no | meaning | what to do |
ROW = re.compile(r"^\| `(\w+)`[^|]* \| `(\w+)` \| `(\w+)`[^|]* \| (yes|no) \| ([^|]+) \| ([^|]+) \|$")


def _error_classes() -> dict[str, type[errors.KvError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.KvError) and cls.__module__ == errors.__name__
    }


def _readme_rows() -> dict[str, tuple[str, str, bool]]:
    rows: dict[str, tuple[str, str, bool]] = {}
    for line in README.read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, kind, code, retried, meaning, todo = match.groups()
            assert name not in rows, f"{name} listed twice"
            assert meaning.strip() and todo.strip(), line
            rows[name] = (kind, code, retried == "yes")
    return rows


def test_the_table_lists_every_error_class_and_nothing_else() -> None:
    assert set(_readme_rows()) == set(_error_classes())


@pytest.mark.parametrize("name", sorted(_error_classes()))
def test_each_row_gives_the_errors_kind_code_and_retryable_flag(name: str) -> None:
    cls = _error_classes()[name]
    assert _readme_rows()[name] == (cls.kind, cls.code.name, cls.retryable)
