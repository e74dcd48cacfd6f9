"""The study's comparison table across every model in a repository (newest version of each)."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.bundle import load_bundle, versions
from covid_cxr.core.errors import DataNotFound
from covid_cxr.core.files import atomic_write_csv, atomic_write_text

COLUMNS = ("Category", "Model", "Precision", "Recall", "F1", "Accuracy")


def comparison_rows(models_dir: Path) -> list[dict]:
    rows = []
    for model_dir in sorted(p for p in Path(models_dir).iterdir() if p.is_dir() and versions(p)):
        b = load_bundle(model_dir)
        m = b.metadata.test_metrics
        if m is None:
            continue
        label = f"{b.name} v{b.version}"
        for c, e in m.per_class.items():
            rows.append({"Category": c, "Model": label, "Precision": round(e.precision, 3),
                         "Recall": round(e.recall, 3), "F1": round(e.f1, 3), "Accuracy": round(m.accuracy, 3)})
    rows.sort(key=lambda r: (r["Category"], r["Model"]))
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_comparison(models_dir: Path, out_dir: Path) -> tuple[list[dict], Path, Path]:
    rows = comparison_rows(models_dir)
    if not rows:
        raise DataNotFound(f"no evaluated model bundles under {models_dir}")
    md, csv_path = Path(out_dir) / "comparison.md", Path(out_dir) / "comparison.csv"
    atomic_write_csv(csv_path, COLUMNS, ([r[c] for c in COLUMNS] for r in rows))
    atomic_write_text(md, to_markdown(rows))
    return rows, md, csv_path
