"""What the documentation may point at: files inside the repository only, one table of demo
numbers (the README's), and a Locust web UI command that listens on loopback only."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_TABLE_HEADER = "| phase | ops/s | reads/s | writes/s |"
SKIP = {".venv", ".git", "results", ".kvstore", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _files(pattern: str) -> list[Path]:
    """The project's files matching `pattern` (not the virtualenv, caches or run results)."""
    found = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP and not d.endswith(".egg-info")]
        found += [Path(directory, name) for name in names if fnmatch.fnmatch(name, pattern)]
    return sorted(found)


def _docs() -> list[Path]:
    return _files("*.md")


def _text_files() -> list[Path]:
    """Everything a reader or the build follows (tests/ aside: this file names what it looks for)."""
    suffixes = {".md", ".py", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".txt", ".proto", ".sh"}
    return [
        p
        for p in _files("*")
        if (p.suffix in suffixes or p.name in {"Makefile", "Dockerfile"})
        and p.relative_to(ROOT).parts[0] != "tests"
    ]


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves_inside_the_repository() -> None:
    broken = []
    for doc in _docs():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (doc.parent / target).resolve() if target else doc
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


def test_nothing_points_to_a_sibling_directory_of_the_repository() -> None:
    # e.g. "../shared/pysyncobj-notes.md": not there for anyone who clones the repository.
    hits = [
        f"{path.relative_to(ROOT)}: {match}"
        for path in _text_files()
        for match in re.findall(r"\.\./(?:\.\./)*shared/\S*|/work/shared\S*", path.read_text())
    ]
    assert hits == []


def test_demo_numbers_live_in_one_table_in_the_readme() -> None:
    tables = {str(doc.relative_to(ROOT)): doc.read_text().count(DEMO_TABLE_HEADER) for doc in _docs()}
    assert {doc: n for doc, n in tables.items() if n} == {"README.md": 1}


def test_documented_locust_web_ui_commands_listen_on_loopback() -> None:
    commands = [
        line.strip()
        for path in [*_docs(), ROOT / "loadtests" / "locustfile.py"]
        for line in path.read_text().splitlines()
        if re.search(r"\blocust -f ", line) and "--headless" not in line and not line.rstrip().endswith("\\")
    ]
    assert commands, "no web UI command documented"
    assert [c for c in commands if "--web-host 127.0.0.1" not in c] == []
