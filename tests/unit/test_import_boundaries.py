"""Layering: only kvstore/replication/ may import pysyncobj (its wire format included: the fault proxy
reads frames through kvstore.replication.peer_frames). Read from the source (AST), no imports run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kvstore"
ALLOWED = PACKAGE / "replication"


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import statement, and importlib.import_module / __import__ of a literal."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def pysyncobj_imports_outside_replication(package: Path, allowed: Path) -> list[str]:
    """'path:line imports module' for each pysyncobj import in package outside allowed."""
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.is_relative_to(allowed):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in _imported_modules(tree):
            if module == "pysyncobj" or module.startswith("pysyncobj."):
                offenders.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
    return offenders


def test_only_replication_imports_pysyncobj() -> None:
    offenders = pysyncobj_imports_outside_replication(PACKAGE, ALLOWED)
    assert not offenders, "pysyncobj imported outside kvstore/replication/:\n" + "\n".join(offenders)


def test_the_check_finds_every_form_of_import(tmp_path: Path) -> None:
    package = tmp_path / "kvstore"
    (package / "replication").mkdir(parents=True)
    (package / "chaos").mkdir()
    (package / "replication" / "ok.py").write_text("import pysyncobj\n")
    (package / "chaos" / "bad.py").write_text(
        "import os\nfrom pysyncobj import pickle\n"
        "def f():\n    import pysyncobj.tcp_connection as t\n"
        "    return importlib.import_module('pysyncobj.encryptor')\n"
    )
    (package / "chaos" / "fine.py").write_text("from kvstore.replication import peer_frames\n")
    assert pysyncobj_imports_outside_replication(package, package / "replication") == [
        "kvstore/chaos/bad.py:2 imports pysyncobj",
        "kvstore/chaos/bad.py:4 imports pysyncobj.tcp_connection",
        "kvstore/chaos/bad.py:5 imports pysyncobj.encryptor",
    ]
