"""The package's shape: no import cycles, one folder per feature, the Rust scheduler trait
apart from its runtime."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_ftrace"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> plugin modules it imports, at module level or inside functions (imports
    under `if TYPE_CHECKING` do not count: they never run)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                # `from package import submodule` needs the submodule; a name defined in the
                # module (or package __init__) needs that module. Python runs a package's
                # __init__ before any of its submodules, which is not an import of it.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                # the longest plugin module the name refers to (a module, or a name in one)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "pytest_ftrace":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_plugin_has_no_import_cycle():
    graph = import_graph()
    assert "pytest_ftrace.hooks" in graph and graph["pytest_ftrace.hooks"]
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_session_state_imports_nothing_of_the_plugin():
    assert import_graph()["pytest_ftrace.state"] == set()


def test_no_two_modules_in_a_folder_share_a_name_prefix():
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir())]:
        if folder.name == "__pycache__":
            continue
        stems = [p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")]
        prefixes = [stem.split("_")[0] for stem in stems if "_" in stem]
        shared = {p for p in prefixes if p in stems or prefixes.count(p) > 1}
        assert not shared, f"{folder}: modules share the prefixes {sorted(shared)}"


def test_the_rust_scheduler_module_is_the_trait_and_types_only():
    text = (ROOT / "rust" / "sched" / "mod.rs").read_text()
    assert len(text.splitlines()) < 400
    assert "pub trait Scheduler" in text
    assert not re.search(r"^impl Core\b", text, re.M)
