"""The shape of the code: no function in src/ over 60 lines, no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "covid_cxr"
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text(), str(f))
    return out


def test_no_function_longer_than_a_screen():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def _top_level_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of ours imported at module level (function-level imports are deliberate deferrals)."""
    found = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _top_level_imports(n, t, set(mods)) for n, t in mods.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for n in list(graph):
        graph[n] = {d for d in graph[n]} | {p for d in graph[n] for p in _parents(d) if p in graph and p != n
                                            and not n.startswith(p + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_reading_a_bundle_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, covid_cxr.bundle, covid_cxr.serve.app, covid_cxr.core.config, covid_cxr.evaluate.report; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
