"""The layers' seams, checked on the source (no processes): the server reaches replication only
through `Shard` (kvstore/replication/shard.py), and storage knows nothing of replication (that
only kvstore/replication imports pysyncobj: tests/unit/test_import_boundaries.py). A static check
is the honest test here: the property is about which code may name what."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kvstore"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_server_reaches_replication_only_through_the_shard_interface() -> None:
    for path in sorted((PACKAGE / "server").glob("*.py")):
        tree = _tree(path)
        modules = _imported_modules(tree)
        forbidden = [
            m
            for m in modules
            for package in ("pysyncobj", "lmdb", "kvstore.storage", "kvstore.replication.state_machine")
            if _under(m, package)
        ]
        assert forbidden == [], f"{path.name} imports {forbidden}"
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not attributes & {"machine", "_machine", "_storage", "storage_problem"}, path.name
        assert not names & {"Storage", "ReplicaSettings", "ShardStateMachine", "FAIL_REASON"}, path.name


def test_node_uses_the_shard_interface() -> None:
    # Guards the check above against passing vacuously: node.py (and its Admin service, admin.py)
    # does talk to replication, through these.
    source = (PACKAGE / "server" / "node.py").read_text() + (PACKAGE / "server" / "admin.py").read_text()
    for used in ("open_shard(", ".write(", ".fresh_view(", ".status()", ".term", ".claims"):
        assert used in source, used


def test_the_shard_calls_no_pysyncobj_private() -> None:
    # shard.py talks to its state machine through public methods (is_leader, log_size,
    # current_term, tick_thread_alive, proposal_fate); pysyncobj's internals stay in state_machine.py.
    tree = _tree(PACKAGE / "replication" / "shard.py")
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    private = {
        a
        for a in attributes
        if a.startswith("_SyncObj") or a in {"_isLeader", "_getRaftLogSize", "_getLeader"}
    }
    raft_fields = {a for a in attributes if a.startswith("raft") and a[4:5].isupper()}  # raftCurrentTerm...
    assert private == set() and raft_fields == set()
    assert not any(_under(m, "pysyncobj") for m in _imported_modules(tree))


def test_storage_knows_nothing_of_replication() -> None:
    for path in sorted((PACKAGE / "storage").glob("*.py")):
        modules = _imported_modules(_tree(path))
        wrong = [m for m in modules if _under(m, "kvstore.replication") or _under(m, "pysyncobj")]
        assert wrong == [], f"{path.name} imports {wrong}"
