"""Files the code, tests and docs point at exist: every `benchmarks/*.py`, `tests/**.py` and
`docs/results/*` path named in src/, tests/, benchmarks/, docs/, README.md, the Makefile and deploy/."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|tests|docs/results)/[\w/.-]*\w\.(?:py|md|json|csv|png|txt))")


def _named() -> dict[str, set[str]]:
    files = [REPO / "README.md", REPO / "Makefile", *(REPO / "deploy").rglob("*"),
             *(f for d in ("src", "tests", "benchmarks", "docs") for f in (REPO / d).rglob("*") if f.suffix in (".py", ".md"))]
    out: dict[str, set[str]] = {}
    for f in files:
        if f.is_file() and f != Path(__file__).resolve():
            for p in PATH.findall(f.read_text(errors="replace")):
                out.setdefault(p, set()).add(str(f.relative_to(REPO)))
    return out


def test_every_named_benchmark_test_and_result_file_exists():
    named = _named()
    assert "benchmarks/bench_distributed.py" in named and len(named) >= 20  # the scan finds what it should
    missing = {p: sorted(where) for p, where in named.items() if not (REPO / p).exists()}
    assert not missing, missing


def test_the_scan_reports_a_missing_file(tmp_path):
    assert PATH.findall("timings in benchmarks/bench_nothing.py, see docs/results/none.md.") == \
        ["benchmarks/bench_nothing.py", "docs/results/none.md"]
