"""Layers that hold: the import-linter contracts (.importlinter) and no cycle between packages.

grimp reads every import statement, those inside functions included, so a deferred import cannot
hide an upward dependency here."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("covid_cxr")


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def package_edges(graph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for m in graph.modules:
        for d in graph.find_modules_directly_imported_by(m):
            if d.startswith("covid_cxr") and _package(m) != _package(d):
                edges.setdefault(_package(m), set()).add(_package(d))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_the_contracts_hold():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout or "broken" not in out.stdout.lower(), out.stdout[-2000:]


def test_no_cycle_between_packages(graph):
    assert cycles(package_edges(graph)) == []


def test_the_cycle_finder_finds_a_cycle():
    """The other side: a planted package cycle is reported, so an empty answer means something."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_every_package_has_a_layer(graph):
    """A new package must be placed in the stack, or the layers contract would not see it."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    layers = cfg["importlinter:contract:stack"]["layers"]
    placed = {name.strip().split(".")[1] for line in layers.splitlines() for name in line.replace("|", ":").split(":")
              if name.strip()}
    packages = {_package(m) for m in graph.modules} - {"(root)", "__main__"}
    assert packages - placed == set(), f"packages missing from .importlinter's stack: {packages - placed}"
